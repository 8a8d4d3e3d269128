"""Federated simulation: client training, cohort backends, aggregation, algorithms, DP."""
