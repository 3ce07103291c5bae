"""Many models at once on Ray (``efficientad train-many``): a manifest of rows, one Ray task per row.

``train_many(manifest, out)`` runs on this machine or, given an address, on a Ray cluster unchanged.
Ray is an optional extra (``pip install "efficientad[ray]"``) and is imported only when rows run.
"""

from .manifest import Row, read_manifest
from .results import RowResult
from .run import train_many

__all__ = ["Row", "RowResult", "read_manifest", "train_many"]
