"""Stage 2: train the small parts of a method against a feature cache, and evaluate them."""
