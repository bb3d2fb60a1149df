"""The trainer's autotune: it times every execution the algorithm offers, keeps the fastest of the times
it records (the untuned one unless the fastest wins every round of a final and beats it by MARGIN in
the median, so that lucky steps do not decide), skips a candidate that fails, says so in
results.json and on the console, changes no number of the run, runs again at a resume (a change a
resume accepts) unless no iteration is left, and trainer.autotune must be a bool."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metalab.errors import ConfigError
from metalab.training import autotune as autotune_module
from metalab.training import trainer as trainer_module
from metalab.training.autotune import CONFIRM, MARGIN, STEPS, choose
from tests.helpers.runs import records, train

#: a meta-batch of 5 sinusoid tasks: candidates vmap, vmap/2, vmap/4 (neither divides 5) and loop
RUN = ("trainer.iterations=6", "trainer.meta_batch_size=5", "trainer.eval_every=3", "trainer.checkpoint_every=100")
TUNED = (*RUN, "trainer.autotune=true")


def execution(run_dir):
    return json.loads((run_dir / "results.json").read_text())["execution"]


def assert_same_records(got, want):
    assert [sorted(row) for row in got] == [sorted(row) for row in want]
    for row, expected in zip(got, want):
        for key, value in expected.items():
            assert math.isclose(row[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, row[key], value)


def test_autotune_times_every_candidate_keeps_the_fastest_and_changes_no_number(tiny_config, tmp_path, capsys):
    train(tiny_config(*TUNED), tmp_path / "tuned")
    console = capsys.readouterr().out
    train(tiny_config(*RUN, "trainer.autotune=false"), tmp_path / "plain")
    tuned, plain = execution(tmp_path / "tuned"), execution(tmp_path / "plain")
    times = tuned["candidates"]
    assert set(times) == {"vmap", "vmap/2", "vmap/4", "loop"}
    assert all(isinstance(seconds, float) and seconds > 0 for seconds in times.values())
    fastest = min(times, key=times.get)  # the fastest steps; a final of medians decides against the untuned
    assert tuned["chosen"] in {"vmap", fastest} and (tuned["chosen"] == "vmap" or times[fastest] < times["vmap"])
    assert list(times)[0] == "vmap" and tuned["autotune"] is True
    assert tuned["tuning_seconds"] >= sum(times.values())  # each candidate's time is one of its steps'
    assert f"autotune: chose {tuned['chosen']} (" in console and "autotune" not in capsys.readouterr().out
    assert plain == {"autotune": False, "chosen": None, "candidates": {}, "tuning_seconds": 0.0}
    # tuning took 16 steps of the same meta-optimizer: the run would show them, had it not been restored
    assert_same_records(records(tmp_path / "tuned"), records(tmp_path / "plain"))


def test_a_resume_tunes_again_accepts_a_change_of_autotune_and_stays_exact(tiny_config, tmp_path, monkeypatch):
    tunings, autotune = [], trainer_module.autotune

    def counted(*args, **kwargs):
        tunings.append(autotune(*args, **kwargs))
        return tunings[-1]

    monkeypatch.setattr(trainer_module, "autotune", counted)
    train(tiny_config(*RUN, "trainer.autotune=false"), tmp_path / "full")
    assert tunings == []
    train(tiny_config(*TUNED), tmp_path / "split", stop_after=2)
    train(tiny_config(*TUNED), tmp_path / "split", stop_after=4, resume=True)
    assert len(tunings) == 2 and execution(tmp_path / "split")["chosen"] == tunings[1].chosen.name
    train(tiny_config(*RUN, "trainer.autotune=false"), tmp_path / "split", resume=True)  # an allowed change
    assert len(tunings) == 2 and execution(tmp_path / "split")["autotune"] is False
    assert_same_records(records(tmp_path / "split"), records(tmp_path / "full"))
    train(tiny_config(*TUNED), tmp_path / "full", resume=True)  # finished: evaluated again, nothing to train
    assert len(tunings) == 2 and execution(tmp_path / "full") == {
        "autotune": True,
        "chosen": None,
        "candidates": {},
        "tuning_seconds": 0.0,
    }


def test_autotune_must_be_a_bool(tiny_config, tmp_path):
    with pytest.raises(ConfigError) as error:
        train(tiny_config("trainer.autotune=notabool"), tmp_path)
    assert "trainer.autotune" in str(error.value) and "true or false" in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "results.json").exists()


class Timed(torch.nn.Module):
    """An algorithm whose executions are names with preset seconds per step (or an error to raise)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.model, self.execution = seconds, torch.nn.Linear(1, 1), None

    def executions(self, batch):
        return [Named(name) for name in self.seconds]

    def use(self, execution):
        self.execution = execution


class Named:
    def __init__(self, name):
        self.name = name


@pytest.mark.parametrize(
    "seconds, kept",
    [
        ({"vmap": 1.0, "vmap/2": 1.0 / (1 + MARGIN / 2), "loop": 2.0}, "vmap"),  # within the margin: untuned
        ({"vmap": 1.0, "vmap/2": 0.9, "loop": 0.8}, "loop"),
        ({"vmap": 1.0, "vmap/2": "out of memory", "loop": 0.5}, "loop"),
        ({"vmap": "out of memory", "vmap/2": 0.7, "loop": 0.9}, "vmap/2"),
    ],
)
def test_the_fastest_is_kept_unless_the_first_is_within_the_margin_and_a_failure_is_skipped(seconds, kept, monkeypatch):
    def step_time(algorithm, batch, cuda):
        value = algorithm.seconds[algorithm.execution.name]
        if isinstance(value, str):
            raise RuntimeError(value)
        return value

    monkeypatch.setattr(autotune_module, "_step_seconds", step_time)
    algorithm = Timed(seconds)
    tuning = choose(algorithm, batch=object(), device=torch.device("cpu"))
    assert tuning.chosen.name == kept and algorithm.execution.name == kept
    expected = {k: v if isinstance(v, float) else f"RuntimeError: {v}" for k, v in seconds.items()}
    assert tuning.candidates == expected


@pytest.mark.parametrize(
    "challenger, kept",
    [
        ([1.0, 0.7] + [1.2] * (STEPS - 1 + CONFIRM), "vmap"),  # one lucky step, a slower median: loses the final
        ([1.0] + [0.8] * (STEPS + CONFIRM), "vmap/2"),  # faster at every step: wins it
        ([1.0] + [0.8] * (STEPS + CONFIRM - 1) + [1.1], "vmap"),  # a better median, a lost round
    ],
)
def test_a_challenger_replaces_the_untuned_execution_only_by_winning_the_final_of_medians(
    challenger, kept, monkeypatch
):
    steps = {"vmap": iter([1.0] * (1 + STEPS + CONFIRM)), "vmap/2": iter(challenger), "loop": iter([3.0] * 2)}

    def step_time(algorithm, batch, cuda):
        return next(steps[algorithm.execution.name])

    monkeypatch.setattr(autotune_module, "_step_seconds", step_time)
    algorithm = Timed({"vmap": 0.0, "vmap/2": 0.0, "loop": 0.0})
    tuning = choose(algorithm, batch=object(), device=torch.device("cpu"))
    assert tuning.chosen.name == kept and algorithm.execution.name == kept
    assert tuning.candidates == {"vmap": 1.0, "vmap/2": min(challenger[1:]), "loop": 3.0}
    assert all(next(left, None) is None for left in steps.values())  # each took its warm-up, rounds and final
