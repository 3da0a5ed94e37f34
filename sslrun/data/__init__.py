"""Datasets, per-image crops, batched photometric augmentation and the DataModule."""
