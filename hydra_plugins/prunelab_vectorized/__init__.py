"""Hydra launcher ``hydra/launcher=vectorized``: the jobs of a multirun with their training vectorised."""
