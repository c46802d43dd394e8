"""Experiment configs: one ml_collections file per model family, each with `get_config(arg=None)`."""
