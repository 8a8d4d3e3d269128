"""Trainers: centralized (with DP-SGD) and federated, behind one registry (``registry``)."""
