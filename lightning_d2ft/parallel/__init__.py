"""Tensor and data parallelism: mesh, placement, group layout, sharding, collectives, replicas."""
