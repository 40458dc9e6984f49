"""Federated orchestration: client training, aggregation rules, strategies and the one loop."""
