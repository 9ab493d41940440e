"""Stand-alone tools over finished runs (``python -m mats_scale.tools.<tool>``): nothing here is imported
by training; each tool reads checkpoints through the same loaders and verification as the trainer."""
