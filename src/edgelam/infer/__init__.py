"""Collaborative inference: model modules as services, pipelines across nodes, and their coordinators."""
