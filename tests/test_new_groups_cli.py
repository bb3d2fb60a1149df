"""The reliability trial's commands on the groups beyond episodes, typed as a user types them: each ends in
`error: <one sentence>` and exit status 2, or in a finished run, never in a Python traceback."""

from __future__ import annotations

import json

import pytest

from tests.helpers.configs import TINY
from tests.helpers.runs import run_train

REFUSED = [
    (
        ["tasks=aux_toy", "algo=auxilearn", "algo.combiner=nonlinear", "algo.init_upper=-1"],
        "error: algo.init_upper must be a finite number >= 0 (got -1)",
    ),
    (["algo=lstm_optimizer", "tasks=quadratic", "algo.preprocess=1e6"], "error: algo.preprocess must be in (0, 80]"),
    (
        ["tasks=quadratic", "tasks.baseline_lrs.sgd=inf"],
        "error: tasks.baseline_lrs.sgd must be a finite number (got inf).",
    ),
    (
        ["tasks=aux_toy", "algo.combiner=linear", "algo.weights=[1.0,0.5]"],
        "error: algo.weights has no effect with algo.combiner=linear: it is a setting of algo.combiner=fixed;",
    ),
    (
        ["tasks=quadratic", "algo.unroll=2", "algo.loss_weights=[1.0,-1.0]"],
        "error: algo.loss_weights must be >= 0, not all 0 (got [1.0, -1.0])",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, sentence", REFUSED, ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_a_refused_setting_is_one_sentence_and_exit_status_2(overrides, sentence, tmp_path):
    result = run_train([*TINY, *overrides], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(sentence) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_solver_exact_on_a_singular_hessian_finishes_the_run(tmp_path):
    """No main label and a zero combiner make L_T's Hessian the zero matrix (LU's zero pivot)."""
    overrides = ["tasks=aux_toy", "solver=exact", "algo.init_weight=0", "tasks.main_labels=0", "algo.update_every=1"]
    result = run_train([*TINY, *overrides], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    (results,) = (tmp_path / "outputs").glob("runs/*/*/results.json")
    assert json.loads(results.read_text())["status"] == "completed"
