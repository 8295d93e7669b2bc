"""Contribution scores of every (micro-batch, subnet) pair, computed before fit."""
