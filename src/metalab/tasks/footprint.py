"""What one batch of a task sampler holds, stated by the sampler from its config keys alone, so that the
memory check (``metalab.app.memory``) can refuse a configuration before the model, the algorithm or
any batch is allocated.

Each sampler kind declares ``footprints(tasks, trainer)`` beside its ``batch_kind`` (a classmethod:
no data is read): one ``Footprint`` per batch the trainer draws, the training batch and one
evaluation batch. Sizes are Python ints, never torch sizes, so that 10**11 x 10**11 is a number to
compare with the free memory rather than an overflow. The memory check adds what the model and the
algorithm keep beside the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Footprint", "episode_footprints", "evaluation_units", "settings", "train_and_eval"]


@dataclass(frozen=True)
class Footprint:
    """One batch, in float32 elements.

    key: the trainer key that sets how many units the batch has ("trainer.meta_batch_size").
    units: that number (episodes, problems or examples).  noun, detail: the units in words for the
    refusal ("episodes", "of 20 examples").  levers: the config keys, besides ``key``, that make a
    unit larger (e.g. "tasks.dim"), as the refusal names them.
    examples: inputs per unit the model runs on (each: its values, its target, the model's
    activations).  model_copies: copies of the model's parameters trained per unit (an episode's
    adapted parameters).  parameters: parameters of the unit's own function trained per unit (an
    optimizee's).  elements: other values per unit (the data drawn for it, its own activations).
    shared_examples: model inputs the batch holds beside its units (AuxiLearn's "aux" minibatch).
    """

    key: str
    units: int
    noun: str
    detail: str
    levers: tuple[str, ...] = ()
    examples: int = 0
    model_copies: int = 0
    parameters: int = 0
    elements: int = 0
    shared_examples: int = 0


def settings(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``cls(**config)`` would receive: its ``__init__`` defaults, overridden by
    ``config`` (a tasks or algo config group; ``_target_`` and keys it does not take are ignored)."""
    values = {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    values.update({key: config[key] for key in config if key in values})
    return values


def evaluation_units(trainer: Mapping[str, Any]) -> int:
    """Units of the largest evaluation batch: trainer.eval_batch_size, or fewer when no evaluation asks for so many."""
    return min(trainer["eval_batch_size"], max(trainer["eval_tasks"], trainer["test_tasks"], 1))


def train_and_eval(
    trainer: Mapping[str, Any], train: dict[str, Any], evaluation: dict[str, Any] | None = None
) -> list[Footprint]:
    """The training batch (trainer.meta_batch_size units, ``train`` the other fields) and the largest
    evaluation batch (``evaluation``, default the same fields)."""
    return [
        Footprint("trainer.meta_batch_size", trainer["meta_batch_size"], **train),
        Footprint("trainer.eval_batch_size", evaluation_units(trainer), **(evaluation or train)),
    ]


def episode_footprints(tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
    """Episodes of ``ways * (shots + query)`` examples (evaluation: eval_shots, eval_query), each with
    its adapted copy of the model's parameters, from the tasks config keys (a sampler without ways has
    one "way"; query null means shots); none when the config has no shots key."""
    if tasks.get("shots") is None:
        return []
    ways, shots = tasks.get("ways") or 1, tasks["shots"]
    query = shots if tasks.get("query") is None else tasks["query"]
    eval_shots = shots if tasks.get("eval_shots") is None else tasks["eval_shots"]
    eval_query = query if tasks.get("eval_query") is None else tasks["eval_query"]

    def episodes(examples: int) -> dict[str, Any]:
        return dict(
            noun="episodes",
            detail=f"of {examples} examples",
            levers=("the episode sizes",),
            examples=examples,
            model_copies=1,
        )

    return train_and_eval(trainer, episodes(ways * (shots + query)), episodes(ways * (eval_shots + eval_query)))
