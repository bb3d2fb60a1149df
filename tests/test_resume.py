"""Resume is safe: refused config changes, applied allowed ones, timings and metrics.jsonl over
segments, a partial last line, which run resume=true picks, run-directory names with = and ,."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time

import pytest
import yaml
from hydra import compose, initialize_config_dir

from metalab.app.cli import CONFIG_DIR
from metalab.app.resume import find_resume_dir, quote_resume_override
from metalab.checkpoint import load_checkpoint
from metalab.errors import ConfigError
from tests.helpers.configs import TINY
from tests.helpers.runs import TRAIN, records, run_dirs, train


@pytest.mark.parametrize(
    "override, keys",
    [
        ("algo.inner_lr=0.02", "algo.inner_lr (0.01 -> 0.02)"),
        ("trainer.meta_optimizer.lr=0.01", "trainer.meta_optimizer.lr (0.001 -> 0.01)"),
        ("seed=7", "seed (0 -> 7)"),
    ],
)
def test_a_change_to_what_defines_the_run_is_refused_naming_the_keys(tiny_config, tmp_path, override, keys):
    cfg = tiny_config("trainer.iterations=3", "trainer.eval_every=0")
    train(cfg, tmp_path, stop_after=2)
    before = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="resume refuses") as error:
        train(tiny_config("trainer.iterations=3", "trainer.eval_every=0", override), tmp_path, resume=True)
    assert keys in str(error.value) and "\n" not in str(error.value)
    assert ((tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()) == before
    with pytest.raises(ConfigError, match="trainer.iterations=1 is below the 2 iterations"):
        train(tiny_config("trainer.iterations=1", "trainer.eval_every=0"), tmp_path, resume=True)


def test_allowed_changes_are_applied_and_timings_add_up_over_segments(tiny_config, tmp_path):
    first_cfg = tiny_config("trainer.iterations=6", "trainer.eval_every=3", "trainer.checkpoint_every=2")
    _, first = train(first_cfg, tmp_path, stop_after=4)
    seconds_at_stop = load_checkpoint(tmp_path / "checkpoint.pt")["train_seconds"]
    assert first["train_seconds"] == seconds_at_stop > 0
    # train longer, test on more tasks, validate more often: applied, not only recorded
    _, resumed = train(
        tiny_config(
            "trainer.iterations=8", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.test_tasks=6"
        ),
        tmp_path,
        resume=True,
    )
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == state["iteration"] == 8 and resumed["test_tasks"] == 6
    assert state["config"]["trainer"]["iterations"] == 8 and resumed["config"]["trainer"]["test_tasks"] == 6
    assert resumed["train_seconds"] > seconds_at_stop
    assert resumed["iterations_per_second"] == pytest.approx(8 / resumed["train_seconds"])
    rows = records(tmp_path)
    val_iterations = [r["iteration"] for r in rows if "val/mse" in r]
    assert val_iterations == [3, 4, 6, 8]  # every 3 until the stop at 4, then every 2 (iteration 4 validated on resume)
    train_iterations = [r["iteration"] for r in rows if "train/loss" in r]
    assert train_iterations == list(range(1, 9))
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)


def test_a_partial_last_line_is_dropped_on_resume_and_the_rows_match_an_uninterrupted_run(tiny_config, tmp_path):
    cfg = tiny_config("trainer.iterations=8", "trainer.eval_every=3", "trainer.checkpoint_every=100")
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "split", stop_after=5)
    with (tmp_path / "split" / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 6, "train/lo')  # a crash or a full disk mid-write
    train(cfg, tmp_path / "split", resume=True)
    assert records(tmp_path / "split") == records(tmp_path / "full")  # the oracle: the same run without a stop


def test_resume_true_refuses_when_the_newest_run_wrote_no_checkpoint(tmp_path):
    outputs, command = tmp_path / "outputs", ["seed=1"]

    def make_run(name, overrides, checkpoint, age):
        run_dir = outputs / "runs" / "2026-01-01" / name
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        files = [run_dir / ".hydra" / "overrides.yaml"]
        if checkpoint:
            (run_dir / "checkpoint.pt").write_bytes(b"x")
            files.append(run_dir / "checkpoint.pt")
        for path in files:
            os.utime(path, (time.time() - age, time.time() - age))
        return run_dir

    finished = make_run("10-00-00_seed=1", command, checkpoint=True, age=300)
    assert find_resume_dir(True, outputs, [*command, "resume=true"]) == finished
    make_run("10-05-00_seed=1", [*command, "resume=true"], checkpoint=False, age=200)  # only records a resume
    make_run("10-06-00_seed=2", ["seed=2"], checkpoint=False, age=150)  # another command
    assert find_resume_dir(True, outputs, [*command, "resume=true"]) == finished
    died = make_run("10-10-00_seed=1", command, checkpoint=False, age=100)
    with pytest.raises(ConfigError) as error:
        find_resume_dir(True, outputs, [*command, "resume=true"])
    assert f"the newest run of this command, {died}, wrote no checkpoint.pt" in str(error.value)
    assert f"pass resume={finished} to continue the older run" in str(error.value)


def test_run_directory_names_with_equals_and_commas_pass_through_hydra():
    name = "outputs/runs/2026-11-22/19-00-00_seed=5,trainer.iterations=30"
    args = quote_resume_override([f"resume={name}", "seed=5", "resume=true", "+resume='already quoted'"])
    assert args == [f"resume='{name}'", "seed=5", "resume=true", "+resume='already quoted'"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert compose(config_name="train", overrides=args[:1]).resume == name


@pytest.mark.slow
def test_resuming_a_finished_run_by_its_pasted_directory_rewrites_nothing(tmp_path):
    first = subprocess.run([*TRAIN, *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "iteration 1: val mse: " in first.stdout  # a line per validation
    assert "tested the best validation checkpoint (best.pt): iteration " in first.stdout
    assert "test mse: " in first.stdout and "test loss" not in first.stdout  # the regression loss is the mse: once
    (run_dir,) = run_dirs(tmp_path)
    assert "=" in run_dir.name and "," in run_dir.name
    saved = {name: (run_dir / name).read_bytes() for name in ("results.json", "metrics.jsonl", "checkpoint.pt")}
    again = subprocess.run(
        [*TRAIN, *TINY, f"resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "already finished at iteration 2: nothing to do" in again.stdout and "test mse:" in again.stdout
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved
    # resume=<dir> alone composes the defaults: refused, naming the keys and the run's own command, which works
    bare = subprocess.run([*TRAIN, f"resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert "trainer.meta_batch_size (2 -> 25)" in bare.stderr
    command = bare.stderr.split("continue it with its own command: python train.py ", 1)[1].strip().rstrip(".")
    suggested = subprocess.run(
        [*TRAIN, *shlex.split(command)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert suggested.returncode == 0, suggested.stderr
    assert "already finished at iteration 2: nothing to do" in suggested.stdout


def test_a_new_null_option_is_no_change_but_a_new_set_one_is():
    """A key a later metalab added (absent from the saved config) at null is no change; set, it is."""
    from metalab.app.resume import changed_keys

    saved = {"algo": {"lr": 0.1}}
    assert changed_keys(saved, {"algo": {"lr": 0.1, "init_rule": None}}) == {}
    assert changed_keys({"algo": {"lr": 0.1, "init_rule": None}}, saved) == {}
    assert changed_keys(saved, {"algo": {"lr": 0.1, "init_rule": "runs/x"}}) == {
        "algo.init_rule": ("<absent>", "runs/x")
    }
    assert changed_keys(saved, {"algo": {"lr": 0.2}}) == {"algo.lr": (0.1, 0.2)}
