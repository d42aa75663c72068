"""Benchmarks: `engine` (is influence cheap next to training?) and `compare` (FUDLR against
the retraining and reranking baselines). Results go to bench/results/."""
