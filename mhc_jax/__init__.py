"""mhc-jax: decoder-only language models with DeepSeek's mHC residual and Engram memory, in JAX/Flax NNX."""

__version__ = "0.1.0"
