"""FUDLR: find the training samples behind a recommender's bias and unlearn them from its LoRA."""

__version__ = "0.1.0"
