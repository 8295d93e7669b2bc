"""Fixed micro-batches, and the bundled offline data sets (digits, Fashion-MNIST)."""
