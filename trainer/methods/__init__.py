"""Methods trained against the feature cache: one module per method."""
