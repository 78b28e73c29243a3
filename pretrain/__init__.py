"""Contrastive pretraining on unlabelled data: losses, heads, methods, encoders, domain views, trainer."""
