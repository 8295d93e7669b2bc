"""The schedule: the (micro-batch x subnet) ops table, its settings, solvers, capacities and baselines."""
