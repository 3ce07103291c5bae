"""Everything that runs a trained model: the fused module, runtimes, export formats and the Inferencer."""
