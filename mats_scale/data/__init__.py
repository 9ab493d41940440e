"""Video data: in-memory clips, decoding, augmentation, datasets."""
