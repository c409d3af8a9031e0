"""Experiment tracking: the JSON results are the source of truth; MLflow is a view of them."""
