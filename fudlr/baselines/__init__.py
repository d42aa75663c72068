"""IFairLRS baselines (Jiang et al., 2024) that FUDLR is benchmarked against.

Reweighting retrains with per-sample weights; reranking changes no weight and moves
over-recommended groups down the grounding ranking instead.
"""
