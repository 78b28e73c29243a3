"""Heads fine-tuned from a pretrained encoder (segmentation, re-identification), their evaluation, and the
recipes that chain pretraining and fine-tuning (the demo and the benchmarks run them)."""
