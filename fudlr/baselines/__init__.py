"""IFairLRS baselines (Jiang et al., 2024) that FUDLR is benchmarked against, and the
most-popular reference that gives their accuracy and unfairness a scale.

Reweighting retrains with per-sample weights; reranking changes no weight and moves
over-recommended groups down the grounding ranking instead.
"""
