"""The decoder backbone: small modules, each in a file named after it."""

from mhc_jax.model.transformer import Transformer, count_params, expected_param_count

__all__ = ["Transformer", "count_params", "expected_param_count"]
