"""``python -m lightning_d2ft [overrides]``: the Hydra app (``--help`` lists the config groups)."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_d2ft.app.config import register_configs


def config_dir() -> str:
    """The YAML configs: inside the installed package (a wheel ships them as ``lightning_d2ft/configs``),
    else ``configs/`` at the root of a source checkout."""
    packaged = files("lightning_d2ft") / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "configs")


register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from lightning_d2ft.app.run import SetupError, print_summary, run

    try:
        result = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except SetupError as err:  # a setting or input refused before training: one line, not a traceback
        print(f"lightning_d2ft: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_summary(result)
    return result["val_acc"]


if __name__ == "__main__":
    main()
