"""Stage 1: run frozen experts once over a dataset, on Ray, into a feature cache."""
