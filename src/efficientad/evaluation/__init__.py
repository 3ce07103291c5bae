"""Measuring a detector: metrics as plain array functions, test-set evaluation, the HTML report."""
