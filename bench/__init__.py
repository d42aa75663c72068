"""Benchmarks: `engine` (is influence cheap next to training?) and `compare` (FUDLR against
the retraining and reranking baselines, issue 5). Results go to bench/results/."""
