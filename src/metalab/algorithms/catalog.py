"""The algorithms and task samplers a user can name (``algo=<name>``, ``tasks=<name>``), each with the
class it builds, so that the sentences refusing a mismatched pair name the pairs that work from what
the classes declare (an algorithm's ``accepts``, ``task_kinds``, ``solvers`` and ``distributed_ok``, a
sampler's ``batch_kind`` and ``kind``) and never from prose that names them.

The application fills it: ``metalab.app.build`` installs, at import, a source that reads the configs
on Hydra's search path (configs/algo/*.yaml and configs/tasks/*.yaml, each ``_target_`` to its
class), so an algorithm added as one .py and one .yaml is named here with the others. Without the
application (an algorithm constructed by hand) the catalog is empty and the sentences say what to
look for instead of naming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from metalab.tasks.base import BatchKind

__all__ = ["Catalog", "catalog", "or_list", "set_catalog_source"]


@dataclass(frozen=True)
class Catalog:
    """algorithms: {config name: Algorithm subclass}; samplers: {config name: TaskSampler subclass}
    (typed as plain classes: ``metalab.algorithms.base`` imports this module). Every query returns
    config names, sorted."""

    algorithms: Mapping[str, type] = field(default_factory=dict)
    samplers: Mapping[str, type] = field(default_factory=dict)

    def accepting(self, kind: BatchKind, task_kind: str | None = None) -> list[str]:
        """The algorithms that train on batches of ``kind`` (of tasks of ``task_kind``, when given)."""
        return sorted(
            name
            for name, cls in self.algorithms.items()
            if kind in cls.accepts and (task_kind is None or cls.task_kinds is None or task_kind in cls.task_kinds)
        )

    def yielding(self, kinds: Iterable[BatchKind], task_kinds: Iterable[str] | None = None) -> list[str]:
        """The samplers whose batches are of one of ``kinds`` (of tasks of one of ``task_kinds``, when given)."""
        kinds, task_kinds = tuple(kinds), None if task_kinds is None else tuple(task_kinds)
        return sorted(
            name
            for name, cls in self.samplers.items()
            if cls.batch_kind in kinds and (task_kinds is None or getattr(cls, "kind", None) in task_kinds)
        )

    def supporting(self, solver: str, kind: BatchKind, task_kind: str | None = None) -> list[str]:
        """The algorithms that train on batches of ``kind`` (of tasks of ``task_kind``, when given) with
        ``solver=<solver>``."""
        return sorted(name for name in self.accepting(kind, task_kind) if solver in self.algorithms[name].solvers)

    def parallel(self) -> list[str]:
        """The algorithms that train under several processes (``distributed_ok``)."""
        return sorted(name for name, cls in self.algorithms.items() if cls.distributed_ok)


_source: Callable[[], Catalog] = Catalog


def set_catalog_source(source: Callable[[], Catalog]) -> None:
    """Where ``catalog()`` comes from: a function called each time a sentence needs it (an error
    path), so that it sees the search path of the command being run."""
    global _source
    _source = source


def catalog() -> Catalog:
    """The algorithms and samplers a user can name now."""
    return _source()


def or_list(names: Iterable[str]) -> str:
    """ "a", "a or b", "a, b or c"."""
    names = list(names)
    return "".join(names) if len(names) <= 1 else f"{', '.join(names[:-1])} or {names[-1]}"
