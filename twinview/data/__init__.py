"""Readers for the standard data layouts, layout inspection and synthetic data generators."""
