"""The algorithms and task samplers a user can name (``algo=<name>``, ``tasks=<name>``), each with the
class it builds, so that the sentences refusing a mismatched pair name the pairs that work from what
the classes declare (an algorithm's ``accepts``, ``solvers`` and ``distributed_ok``, a sampler's
``batch_kind``) and never from prose that names them.

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

    def accepting(self, kind: BatchKind) -> list[str]:
        """The algorithms that train on batches of ``kind``."""
        return sorted(name for name, cls in self.algorithms.items() if kind in cls.accepts)

    def yielding(self, kinds: Iterable[BatchKind]) -> list[str]:
        """The samplers whose batches are of one of ``kinds``."""
        kinds = tuple(kinds)
        return sorted(name for name, cls in self.samplers.items() if cls.batch_kind in kinds)

    def supporting(self, solver: str, kind: BatchKind) -> list[str]:
        """The algorithms that train on batches of ``kind`` with ``solver=<solver>``."""
        return sorted(name for name in self.accepting(kind) if solver in self.algorithms[name].solvers)

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
