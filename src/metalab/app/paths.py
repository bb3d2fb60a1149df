"""Where metalab reads data and writes runs, whatever the working directory.

* ``${data_root:ENV,relative/path}`` (an OmegaConf resolver, used by the task configs): ``$ENV``
  when it is set; else ``relative/path`` under the working directory when it exists there; else
  under the repository checkout holding this package when it exists there (so that
  ``python /path/to/train.py`` finds ``../shared/data`` from any directory); else under the
  working directory (the sampler then says where it looked). Always absolute, so that a run's
  saved config is usable from anywhere.
* ``check_writable(directory, how)``: one sentence, before anything is built, when runs cannot be
  written there; ``OutputDirCheck`` runs it as a Hydra callback on ``hydra.run.dir`` /
  ``hydra.sweep.dir`` before Hydra itself creates them (which would end in a traceback).
* ``${run_name:${hydra.job.override_dirname}}`` (a resolver, used by train.yaml's run directory):
  the overrides as Hydra joins them, a ``/`` of a value written ``%2F`` (a folder name never holds a
  path separator, so ``tasks.root=/data/omniglot`` nests no folders), cut to ``RUN_NAME_LIMIT``
  characters with a hash of the whole when longer, since a file name has at most 255 bytes (resume
  matches runs by the overrides metalab saves in ``.hydra/``, never by the folder name).
* ``runs_root(hydra_cfg)``: the folder under which Hydra puts every run of the command line,
  where ``resume=true`` looks for earlier runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from metalab.errors import ConfigError

__all__ = ["CHECKOUT", "OutputDirCheck", "RUN_NAME_LIMIT", "check_writable", "data_root", "run_name", "runs_root"]

#: The repository checkout when metalab is installed from one (editable); unused otherwise.
CHECKOUT = Path(__file__).resolve().parents[3]


def data_root(env: str, relative: str) -> str:
    """The data folder named by ``$env``, or ``relative`` found from the working directory or the checkout."""
    if os.environ.get(env):
        return str(Path(os.environ[env]).expanduser().resolve())
    path = Path(relative).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (Path.cwd(), CHECKOUT):
        if (base / path).exists():
            return str((base / path).resolve())
    return str((Path.cwd() / path).resolve())


RUN_NAME_LIMIT = 180  # characters of a run folder's name; with the time prefix well under 255 bytes


def run_name(overrides: str) -> str:
    """``overrides`` as one folder name (``%`` and ``/`` percent-encoded) when short enough, else
    its start and a hash of the whole."""
    overrides = overrides.replace("%", "%25").replace("/", "%2F")
    if len(overrides.encode()) <= RUN_NAME_LIMIT:
        return overrides
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:10]
    head = overrides.encode()[: RUN_NAME_LIMIT - 12].decode(errors="ignore")
    return f"{head}_{digest}"


def check_writable(directory: str | Path, how: str) -> None:
    """Raise ConfigError unless ``directory`` can be written (or, when absent, created: its nearest
    existing parent is a writable folder), creating nothing; ``how`` says
    how the user chooses another place, e.g. "set hydra.run.dir=<dir>"."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())  # nothing is created here
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")  # strerror as mkdir would give it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"cannot write runs to {directory} ({reason}): {how}, or make it writable.") from None


def runs_root(hydra_cfg: DictConfig, base: str | Path = ".") -> Path:
    """The folder under which Hydra puts every run of this command line: the fixed leading folders
    of ``hydra.run.dir`` (``hydra.sweep.dir`` in a multirun) before the first interpolation, e.g.
    ``outputs/runs`` for ``outputs/runs/${now:%Y-%m-%d}/...``, made absolute against ``base``."""
    multirun = str(hydra_cfg.get("mode")).endswith("MULTIRUN")
    node = hydra_cfg.sweep if multirun else hydra_cfg.run
    parts = Path(str(OmegaConf.to_container(node, resolve=False)["dir"])).parts
    fixed = parts[: next((i for i, part in enumerate(parts) if "${" in part), len(parts))]
    return (Path(base) / Path(*fixed)).resolve() if fixed else Path(base).resolve()


class OutputDirCheck(Callback):
    """Hydra callback: before Hydra creates the run (or sweep) directory, make sure it can, and
    stop with one sentence (exit status 2) when it cannot."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, key: str) -> None:
        try:
            check_writable(directory, f"run from a writable directory or set {key}=<writable dir>")
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)


if not OmegaConf.has_resolver("data_root"):
    OmegaConf.register_new_resolver("data_root", data_root)
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_name)
