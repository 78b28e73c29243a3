"""Heads fine-tuned from a pretrained encoder: segmentation, re-identification, evaluation protocols."""
