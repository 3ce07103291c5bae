"""EfficientAD: accurate visual anomaly detection at millisecond-level latencies."""

__version__ = "0.1.0"
