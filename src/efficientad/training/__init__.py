"""Everything that learns: the training loop and losses, calibration, penalty images, teachers and their pretraining.

Deployment, serving and evaluation never import this package (import-linter checks it).
"""
