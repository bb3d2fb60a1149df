"""Run directories read back as objects, at the application boundary: the trained rule of a
learned-optimizer run. Optimizers, samplers and algorithms receive the objects and never read files."""

from __future__ import annotations

from pathlib import Path

from metalab.checkpoint import CHECKPOINT, has_checkpoint, read_run, state_file, state_mismatch
from metalab.errors import ConfigError, require
from metalab.optim.lstm_rule import CoordinatewiseLSTM

__all__ = ["RULE_KEYS", "load_rule", "resolve_rules"]

#: algo keys whose value is a learned-optimizer run directory, loaded into its rule by ``build``
RULE_KEYS = ("inner_rule", "init_rule")

_RULE_KEYS = ("hidden_size", "num_layers", "preprocess", "output_scale")


def load_rule(run_dir: str | Path, checkpoint: str = "best") -> CoordinatewiseLSTM:
    """The rule a ``algo=lstm_optimizer`` run trained: its shape from the run's config (in
    checkpoint.pt), its weights from best.pt (``checkpoint="best"``: the best on validation, when
    the run kept one) or checkpoint.pt (``"last"``). The files are read by
    ``metalab.checkpoint.read_run`` (missing, not a checkpoint, not finite, not a learned-optimizer
    run: one sentence each), and weights that do not fit the rule the config describes are refused."""
    remedy = "pass the directory of a finished `python train.py algo=lstm_optimizer ...` run"
    last, chosen = read_run(run_dir, remedy, checkpoint, algorithm="LSTMOptimizer")
    algo = last["config"]["algo"]
    source = state_file(run_dir, checkpoint)
    try:
        rule = CoordinatewiseLSTM(**{key: algo[key] for key in _RULE_KEYS if key in algo})
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"the rule settings in {source.parent / CHECKPOINT} are invalid ({str(error).rstrip('.')}): {remedy}."
        ) from None
    weights = chosen["algorithm"]["meta_parameters"]
    mismatch = state_mismatch(weights, rule.state_dict(), "the rule")
    require(
        mismatch is None,
        f"the weights in {source} do not fit the rule its config describes ({mismatch}): {remedy}.",
    )
    rule.load_state_dict(weights)
    return rule


def resolve_rules(algo_config: dict) -> dict[str, CoordinatewiseLSTM]:
    """The rules that ``algo_config`` names by run directory (its ``RULE_KEYS``), loaded, by key;
    a directory that holds no learned-optimizer run is refused in one sentence naming the key."""
    rules = {}
    for key in RULE_KEYS:
        run_dir = algo_config.get(key)
        if isinstance(run_dir, (str, Path)):
            require(
                has_checkpoint(Path(run_dir)),
                f"algo.{key}={run_dir} holds no {CHECKPOINT}: train the rule first (`python train.py "
                "algo=lstm_optimizer ...`; the generalisation experiments read the run of `python "
                "scripts/reproduce.py --run lstm_mnist`), or point it at a learned-optimizer run directory.",
            )
            rules[key] = load_rule(run_dir)
    return rules
