"""Reproducible studies run as `python -m mhc_jax.experiments.<name>`."""
