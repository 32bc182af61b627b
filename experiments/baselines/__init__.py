"""PyTorch baselines of the shapca_jax models (the only place outside tests that imports torch)."""
