"""Parallelism applied from outside the model (STYLE.md 1): activation checkpointing, then sharding."""
