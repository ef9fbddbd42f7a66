"""Tracking: the MLflow run of every command, `simcot compare`, and the plots."""
