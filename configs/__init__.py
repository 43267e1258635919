"""Configurations: `configs.model` (the model) and `configs.experiment` (everything train.py needs)."""
