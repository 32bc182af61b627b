"""shapca-jax: Shap-CA (Shapley value-based contrastive alignment) in JAX/Flax."""

__version__ = "0.1.0"
