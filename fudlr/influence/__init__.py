"""Influence of training samples on LoRA weights: hooks, EK-FAC curvature, scores, the index."""
