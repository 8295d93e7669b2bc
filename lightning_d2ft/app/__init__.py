"""The Hydra app: config, the ready LightningModule, pretraining, run directory and sweep summary."""
