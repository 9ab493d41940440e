"""Video data: sources -> sampler -> clips -> workers -> loader (docs/data.md), plus decoding,
augmentation, shot cuts, list files, dataset preparation, the bundled-dataset generator, and the
fine-tuning and evaluation loaders."""
