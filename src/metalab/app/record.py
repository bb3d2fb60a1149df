"""Hydra's record of a run, ``.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), written by metalab
once the run directory is held rather than by Hydra before the task starts (``hydra.output_subdir:
null`` in train.yaml): a process that is refused, a second one on a live run directory or a
``resume=true`` pointed at an existing ``hydra.run.dir``, never overwrites the record of the run it
was refused on, which resume matches and prints. The files are the ones Hydra writes, unchanged.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

__all__ = ["RECORD", "write_record"]

RECORD = ".hydra"


def write_record(run_dir: Path, cfg: DictConfig) -> None:
    """``run_dir/.hydra/``: the composed ``cfg``, Hydra's own config and the command's overrides."""
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    folder = run_dir / RECORD
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_cfg),
        ("overrides.yaml", hydra_cfg.hydra.overrides.task),
    ):
        (folder / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")
