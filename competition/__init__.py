"""Carvana Image Masking: data, folds, RLE, metrics, models, training and inference."""
