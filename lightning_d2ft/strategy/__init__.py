"""D2FTStrategy executes the schedule: sharding, per-step ops, checkpoints, step guards, launchers."""
