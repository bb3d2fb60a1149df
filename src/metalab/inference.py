"""Use a trained meta-learner: adapt it to a new few-shot task and predict.

    learner = metalab.load_learner("outputs/runs/2026-11-22/10-00-00_...")
    adapted = learner.adapt(support_images, ["cat", "dog", "cat", ...])   # tensors or image paths
    adapted.predict(query_images)  # -> ["dog", "cat", ...];  adapted.logits(query_images) -> [Q, ways]

Loading needs only the run directory: the checkpoint keeps the config and the task's spec (input
shape, ways, scoring, image preprocessing), so no training data is read, from any directory.
Every input is checked first; a bad one is a ConfigError of one sentence.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from metalab.algorithms.catalog import catalog, or_list
from metalab.algorithms.episodic import EpisodicAlgorithm
from metalab.checkpoint import BEST, CHECKPOINT, read_run, state_file, state_mismatch
from metalab.errors import ConfigError, require
from metalab.recorded import UNREBUILDABLE
from metalab.tasks.base import TaskSampler
from metalab.tasks.spec import TaskSpec
from metalab.types import Params

__all__ = ["Learner", "AdaptedLearner", "load_learner", "load_run"]

Examples = Tensor | np.ndarray | str | Path | Sequence[str | Path]


def load_run(
    run_dir: str | Path,
    device: str = "auto",
    overrides: Sequence[str] = (),
    checkpoint: str = "best",
    data: bool = True,
) -> tuple[TaskSampler | TaskSpec, Any, DictConfig]:
    """(task sampler, algorithm with trained meta-parameters, config) of a run directory.
    checkpoint: "best" (best.pt, what the run tested, when validation ran) or "last";
    ``overrides`` are dotlist changes to its saved config (e.g. "algo.eval_inner_steps=20");
    data=False returns the task's spec saved in the checkpoint (``tasks.*`` overrides leave it as it
    is) instead of a sampler, and reads no data. The files are read by ``metalab.checkpoint.read_run``
    (a file that is missing, not a checkpoint or not finite is refused in one sentence), and a state
    that does not fit the algorithm its config builds is refused naming both."""
    tasks, algorithm, cfg, state, source = _built(run_dir, device, overrides, checkpoint, data)
    _load_state(algorithm, state, source, cfg, overrides)
    return tasks, algorithm, cfg


def _built(
    run_dir: str | Path, device: str, overrides: Sequence[str], checkpoint: str, data: bool
) -> tuple[TaskSampler | TaskSpec, Any, DictConfig, dict[str, Any], Path]:
    """``load_run`` before the state is loaded: (tasks, algorithm as its config builds it, config, the
    algorithm state ``checkpoint`` names, the file it came from)."""
    from metalab.app.build import build, resolve_device  # the CLI module imports Hydra; only loading needs it

    if (
        isinstance(overrides, (str, bytes))
        or not isinstance(overrides, Sequence)
        or not all(isinstance(o, str) for o in overrides)
    ):
        raise TypeError(
            f'overrides must be a list of key=value strings, e.g. ["algo.eval_inner_steps=20"], not {overrides!r}.'
        )
    last, state, source = _read(run_dir, checkpoint)
    problems = "; ".join(map(str, last["config"].get(UNREBUILDABLE) or ()))
    require(
        not problems,
        f"{run_dir} was trained from Python objects that metalab cannot rebuild ({problems}): "
        "build them from metalab's classes (your own sampler or algorithm may subclass TaskSampler or Algorithm in an "
        "importable module; a meta-optimizer as functools.partial(torch.optim.Adam, lr=...)), or build the algorithm "
        "again as you trained it and pass it: load_learner(run_dir, algorithm=...).",
    )
    saved = OmegaConf.create(last["config"])
    if saved.get("model") is not None and "norm" not in saved.model and "Conv4" in str(saved.model.get("_target_")):
        saved.model.norm = (
            "transductive"  # runs saved before model.norm existed normalised with each batch's statistics
        )
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides)))
    resolved = resolve_device(device)
    tasks, algorithm = build(cfg, resolved, None if data else _task_spec(last, cfg, resolved))
    return tasks, algorithm, cfg, state, source


def _read(run_dir: str | Path, checkpoint: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(checkpoint.pt's contents, the algorithm state ``checkpoint`` names, the file it came from)."""
    last, chosen = read_run(
        run_dir, f"pass the directory of a training run (the folder with {CHECKPOINT} and .hydra/)", checkpoint
    )
    return last, chosen["algorithm"], state_file(run_dir, checkpoint)


def _load_state(
    algorithm: Any,
    state: dict[str, Any],
    source: Path,
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    built: str | None = None,
) -> None:
    """Load ``state`` (read from ``source``) into ``algorithm`` (``built``: what it is, in words; by default
    the algorithm ``cfg`` builds), refusing in one sentence a state that does not fit it (another algorithm's
    or model's, saved over this run's file, or ``overrides`` that change the model)."""
    remedy = f"restore the run's own {source.name}" + (', pass checkpoint="last"' if source.name == BEST else "")
    if built is not None:
        remedy = "build the algorithm and its model as the run trained them"
    built = built or f"the {cfg.algo._target_.rsplit('.', 1)[-1]} its config builds"
    if overrides:
        built += f" with the overrides {list(overrides)}"
        remedy += ", or drop the overrides that change the model or the algorithm's parameters"
    mismatch = state_mismatch(state, algorithm.state_dict())
    require(mismatch is None, f"{source} does not hold the state of {built} ({mismatch}): {remedy}.")
    try:  # what state_mismatch does not compare (an optimizer's groups) the algorithm's own loading checks
        algorithm.load_state_dict(state)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as error:
        detail = " ".join(str(error).split())
        raise ConfigError(f"{source} does not hold the state of {built} ({detail}): {remedy}.") from None


def _task_spec(state: dict[str, Any], cfg: DictConfig, device: torch.device) -> TaskSpec:
    """The spec the checkpoint keeps; for a run saved before checkpoints kept it, the one its config
    describes, or (when that depends on the data, as MiniImageNet's normalisation) its sampler's."""
    if state.get("task_spec") is not None:
        return TaskSpec.from_state_dict(state["task_spec"])
    from hydra.utils import get_class

    from metalab.app.build import instantiate

    keys = {k: v for k, v in OmegaConf.to_container(cfg.tasks, resolve=True).items() if not k.startswith("_")}
    spec = get_class(cfg.tasks._target_).describe(**keys)
    return instantiate(cfg.tasks, device=device).spec if spec is None else spec


@dataclass
class AdaptedLearner:
    """The task-specific parameters after adaptation, the support examples (the context that
    normalises predictions) and the support set's label names (None for regression)."""

    learner: Learner
    params: Params
    labels: list[Hashable] | None
    x_support: Tensor

    def logits(self, x_query: Examples) -> Tensor:
        """Model outputs [Q, ways] (or [Q, 1] for regression) for the query examples; with the
        default normalisation a query's output does not depend on the other queries."""
        x = self.learner.examples(x_query, "query")
        with torch.no_grad():
            return self.learner.algorithm.predict(self.params, x, context=self.x_support)

    def predict(self, x_query: Examples) -> list[Hashable] | Tensor:
        """Predicted labels (in the support set's label names) for classification; values [Q] for regression."""
        outputs = self.logits(x_query)
        if self.labels is None:
            return outputs.squeeze(-1)
        return [self.labels[i] for i in outputs.argmax(-1).tolist()]


class Learner:
    """A meta-trained algorithm that adapts to new tasks (MAML and iMAML alike: any episodic
    algorithm); ``spec`` says what its examples look like and how they are scored."""

    def __init__(self, algorithm: EpisodicAlgorithm, spec: TaskSpec, device: torch.device | str = "cpu"):
        if not isinstance(algorithm, EpisodicAlgorithm):
            episodic = sorted(name for name, cls in catalog().algorithms.items() if issubclass(cls, EpisodicAlgorithm))
            named = f" (algo={or_list(episodic)})" if episodic else ""
            raise ConfigError(
                f"load_learner needs a run of an episodic algorithm{named}; this run used {type(algorithm).__name__}."
            )
        self.algorithm, self.spec, self.device = algorithm, spec, torch.device(device)

    def examples(self, x: Examples, role: str = "input") -> Tensor:
        """A float tensor [N, *input_shape] on the device from a tensor or array [N, *input_shape]
        or image paths (read with the training preprocessing); ``role`` names them in errors."""
        shape = tuple(self.spec.input_shape)
        if isinstance(x, (str, os.PathLike)):
            x = [x]
        if isinstance(x, np.ndarray):
            require(x.dtype.kind in "biuf", f"the {role} examples are an array of {x.dtype}: pass numbers.")
            x = torch.from_numpy(x)
        if isinstance(x, Tensor):
            require(
                x.ndim == len(shape) + 1 and tuple(x.shape[1:]) == shape,
                f"the {role} examples have shape {list(x.shape)} but the model takes "
                f"[N, {', '.join(map(str, shape))}]: "
                "pass a tensor [N, *input_shape] (one row per example) or image paths.",
            )
            require(
                x.dtype != torch.bool and not x.is_complex(), f"the {role} examples are {x.dtype}: pass real numbers."
            )
            require(
                x.dtype != torch.uint8 or self.spec.image_format is None,
                f"the {role} examples are uint8 pixels: pass image paths (read with the training preprocessing) "
                "or float tensors normalised as the training images were.",
            )
            x = x.to(self.device, torch.get_default_dtype())
        else:
            require(
                isinstance(x, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in x),
                f"the {role} examples are a {type(x).__name__}: "
                "pass a tensor [N, *input_shape] or a list of image paths.",
            )
            require(len(x) > 0, f"the {role} set is empty: pass at least one example.")
            x = self.spec.load_examples(list(x), self.device)
        require(len(x) > 0, f"the {role} set is empty: pass at least one example.")
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        require(
            not bad, f"the {role} examples at positions {bad[:5]} hold NaN or infinite values: pass finite numbers."
        )
        return x

    def targets(self, y: Tensor | Sequence[Any], count: int) -> tuple[Tensor, list[Hashable] | None]:
        """(targets [count] on the device, class names or None): classification labels may be any
        hashable names, which, sorted, are mapped to the outputs 0..ways-1 (0..N-1 map to themselves)."""
        names = y.tolist() if isinstance(y, (Tensor, np.ndarray)) else y
        require(
            isinstance(names, Sequence) and not isinstance(names, (str, bytes)),
            f"the support labels are a {type(y).__name__}: pass one label per example, as a list or a tensor [N].",
        )
        require(len(names) == count, f"{count} support examples but {len(names)} labels: give one label per example.")
        if self.spec.kind == "classification":
            for name in names:
                try:
                    hash(name)
                except TypeError:
                    raise ConfigError(
                        f"the support label {name!r} is a {type(name).__name__}, which cannot name a class: "
                        "give one hashable label (a string or an integer) per example."
                    ) from None
            try:  # sorted: the same support set in any order adapts the same way
                classes = sorted(set(names))
            except TypeError:  # names that do not sort: order of first appearance
                classes = list(dict.fromkeys(names))
            ways = self.spec.output_dim
            require(
                len(classes) == ways,
                f"the support set has {len(classes)} classes but the model was trained "
                f"{ways}-way: give examples of exactly {ways} classes.",
            )
            index = {name: i for i, name in enumerate(classes)}
            return torch.tensor([index[n] for n in names], device=self.device), classes
        try:
            values = torch.tensor(names, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                "the regression targets are not numbers: give one number per example, a tensor or list of shape [N]."
            ) from None
        if values.shape == (count, 1):
            values = values.view(count)
        require(
            values.shape == (count,),
            f"the regression targets have shape {list(values.shape)}: give one number per "
            f"example, shape [{count}] (or [{count}, 1]).",
        )
        require(
            bool(torch.isfinite(values).all()),
            "the regression targets hold NaN or infinite values: pass finite numbers.",
        )
        return values.to(self.device), None

    def adapt(self, x_support: Examples, y_support: Tensor | Sequence[Any], steps: int | None = None) -> AdaptedLearner:
        """Adapt to one task's support set with the algorithm's inner loop (``eval_inner_steps`` by default).
        Classification needs examples of exactly ``ways`` classes, named by any hashable labels."""
        require(
            steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0),
            f"steps must be an integer >= 0 or None for the run's eval_inner_steps (got {steps!r}).",
        )
        x = self.examples(x_support, "support")
        y, labels = self.targets(y_support, len(x))
        steps = self.algorithm.eval_inner_steps if steps is None else steps
        with torch.no_grad():  # torch.func.grad inside adapt still works; nothing is kept for backward
            params = self.algorithm.adapt(self.algorithm.initial_params(), x, y, steps)
        params = {k: v.detach() for k, v in params.items()}
        require(
            all(bool(torch.isfinite(v).all()) for v in params.values()),
            f"adaptation diverged (non-finite parameters after {steps} inner steps): use fewer steps.",
        )
        return AdaptedLearner(self, params, labels, x)


def load_learner(
    run_dir: str | Path, device: str = "auto", checkpoint: str = "best", algorithm: EpisodicAlgorithm | None = None
) -> Learner:
    """The trained learner of a run directory (the folder holding checkpoint.pt), from any working
    directory and without its training data: by default the meta-parameters the run tested (best
    on validation), ``checkpoint="last"`` for the final ones. The algorithm is rebuilt from the run's
    config (a run trained from Python records one, ``metalab.recorded``); ``algorithm``, for a run
    whose objects no config describes (your own model, say), is that algorithm built again as it was
    trained: the run's meta-parameters are loaded into it, and it stays on its own device."""
    from metalab.app.build import resolve_device

    if algorithm is None:
        spec, algorithm, cfg, state, source = _built(run_dir, device, (), checkpoint, data=False)
        learner = Learner(algorithm, spec, resolve_device(device))  # refuses a run of a non-episodic algorithm first
        _load_state(algorithm, state, source, cfg)
        return learner
    last, state, source = _read(run_dir, checkpoint)
    cfg = OmegaConf.create(last["config"])
    episodic = isinstance(algorithm, EpisodicAlgorithm)
    where = next(iter(algorithm.meta_parameters().values())).device if episodic else torch.device("cpu")
    learner = Learner(algorithm, _task_spec(last, cfg, where), where)
    _load_state(algorithm, state, source, cfg, built=f"the {type(algorithm).__name__} passed as algorithm")
    return learner
