"""``python -m lightning_d2ft [overrides]``: the Hydra app (``--help`` lists the config groups)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


@hydra.main(config_path=CONFIGS, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from lightning_d2ft.app import print_summary, run

    result = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print_summary(result)
    return result["val_acc"]


if __name__ == "__main__":
    main()
