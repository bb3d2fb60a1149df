"""scripts/reproduce.py --table: a paper's table laid out from the experiment configs' `paper:` blocks
and the runs found, and the check that every experiment config states its place in a table."""

from __future__ import annotations

import pytest

from tests.helpers.scripts import assert_refused, completed, script, write_job

reproduce = script("reproduce")  # loaded once: its composed paper blocks are cached across the tests


def paper(row: str, order: int, columns: dict, metrics: dict) -> dict:
    return {"table": "t", "row": row, "order": order, "columns": columns, "metrics": metrics, "split": "test"}


PAPERS = {
    "b_20w1s": paper("B", 2, {"accuracy": "20w1s"}, {"accuracy": None}),
    "b_5w1s": paper("B", 2, {"accuracy": "5w1s"}, {"accuracy": "98.3 ± 0.5"}),
    "a_5w5s": paper("A", 1, {"accuracy": "5w5s"}, {"accuracy": "99.9 ± 0.1"}),
    "a_5w1s": paper("A", 1, {"accuracy": "5w1s"}, {"accuracy": "98.7 ± 0.4"}),
}


def test_a_table_has_rows_in_order_columns_in_natural_order_and_names_what_is_missing(tmp_path):
    write_job(tmp_path / "1", ["+experiment=a_5w1s"], completed(0.943, metric="accuracy"))
    write_job(tmp_path / "2", ["+experiment=b_20w1s", "seed=3"], completed(0.9, metric="accuracy"))
    write_job(tmp_path / "3", ["+experiment=b_5w1s"], {"status": "interrupted", "test": {}})  # not finished
    lines = reproduce.table_lines("t", PAPERS, [tmp_path])
    assert lines[:6] == [
        "### t: paper / ours (mean ± 95% CI)",
        "",
        "| | 5w1s | 5w5s | 20w1s |",
        "|---|---|---|---|",
        "| A | 98.7 ± 0.4 / 94.3 ± 10 | 99.9 ± 0.1 / not run |  |",
        "| B | 98.3 ± 0.5 / not run |  | — / 90 ± 10 |",
    ]
    assert lines[6:] == [
        "",
        "not run: a_5w5s (A): python scripts/reproduce.py --run a_5w5s",
        "not run: b_5w1s (B): python scripts/reproduce.py --run b_5w1s",
        f"b_20w1s (B): {(tmp_path / '2').resolve()} ran with seed=3",
    ]


def test_the_columns_of_one_row_keep_the_order_it_lists_them_in(tmp_path):
    rule = {"final_loss": "LSTM", "adam/final_loss": "ADAM", "sgd/final_loss": "SGD"}
    lines = reproduce.table_lines("t", {"s": paper("MNIST", 1, rule, {"final_loss": "below (curve)"})}, [tmp_path])
    assert lines[2] == "| | LSTM | ADAM | SGD |"  # not alphabetical
    assert lines[4] == "| MNIST | below (curve) / not run | — / not run | — / not run |"
    assert lines[6:] == ["not run: s (MNIST): python scripts/reproduce.py --run s"]  # one line per experiment


@pytest.mark.parametrize(
    "args, words",
    [
        (["--table", "nope"], ["no table named nope; choose from ", "imaml_omniglot, ", "maml_sinusoid", ", or all."]),
        (["--table"], ["--table needs the table to lay out; choose from ", "imaml_omniglot", ", or all."]),
    ],
)
def test_a_table_it_does_not_know_is_refused_listing_the_tables(capsys, args, words):
    assert_refused(reproduce.main(args), capsys.readouterr().err, 2, *words)


def test_run_all_with_a_table_runs_that_tables_rows(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(reproduce, "run", lambda name, overrides: started.append(name) or 0)
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--table", "maml_sinusoid", "--run", "all"]) == 0
    assert "maml_sinusoid" in started and not any(name.startswith(("imaml_", "lstm_")) for name in started)


def test_every_experiment_config_has_a_complete_paper_block():
    cells: dict[tuple, str] = {}
    for name in reproduce.experiments():
        block = reproduce.paper_of(name)
        assert block == reproduce.paper_composed(name), f"{name}: the paper block read differs from Hydra's"
        for key, kind in (("table", str), ("row", str), ("order", int), ("columns", dict), ("metrics", dict)):
            assert isinstance(block.get(key), kind), f"{name}: paper.{key} must be a {kind.__name__}"
        assert block["columns"], f"{name}: paper.columns names no metric"
        for metric, label in block["columns"].items():
            assert metric in block["metrics"], f"{name}: paper.columns names {metric}, which paper.metrics lacks"
            cell = (block["table"], block["row"], label)
            assert cells.setdefault(cell, name) == name, f"{name} and {cells[cell]} both fill {cell}"
