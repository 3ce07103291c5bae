"""The collection benchmark: train and evaluate every category of a dataset, set beside the published numbers."""
