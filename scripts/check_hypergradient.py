"""How good is iMAML's implicit meta-gradient? For each linear solver, on a few training batches:
its cosine similarity with the meta-gradient obtained by backpropagating through the same inner loop
(unrolled), its norm relative to that one, and the two residuals the trainer logs (how well the inner
problem and the linear system were solved).

    python scripts/check_hypergradient.py                                   # the defaults, at initialisation
    python scripts/check_hypergradient.py --train 300 algo.inner_steps=32   # after 300 meta-updates
    python scripts/check_hypergradient.py --solvers cg,exact tasks=omniglot tasks.root=... model.norm=support

Trailing key=value arguments override the config as on the train.py command line (algo=imaml is
implied). --train meta-trains with the configured solver first, so that the check sees a
meta-learned initialisation as well as a random one.
"""

from __future__ import annotations

import argparse
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalab.app.build import build, instantiate, resolve_device
from metalab.app.cli import CONFIG_DIR
from metalab.errors import MetalabError
from metalab.hypergrad import tree_ravel


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-30)).item()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solvers", default="cg,gmres,neumann,exact", help="comma-separated configs/solver names")
    parser.add_argument("--batches", type=int, default=4, help="training batches to average over")
    parser.add_argument("--train", type=int, default=0, help="meta-updates before the check")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["algo=imaml", *args.overrides])
            solvers = {
                name: compose(config_name="train", overrides=[f"solver={name}"]).solver
                for name in args.solvers.split(",")
            }
        device = resolve_device(cfg.trainer.device)
        tasks, algorithm = build(cfg, device)
        generator = tasks.generator(cfg.seed)
        for _ in range(args.train):
            algorithm.train_step(tasks.sample(cfg.trainer.meta_batch_size, "train", generator))
        batches = [tasks.sample(cfg.trainer.meta_batch_size, "train", generator) for _ in range(args.batches)]
        unrolled = [tree_ravel(algorithm.unrolled_meta_gradient(batch))[0] for batch in batches]
        print(
            f"iMAML on {type(tasks).__name__}: lam={algorithm.lam} inner_lr={algorithm.inner_lr} "
            f"inner_steps={algorithm.inner_steps}, after {args.train} meta-updates, {args.batches} batches of "
            f"{cfg.trainer.meta_batch_size}; against backpropagation through the same inner loop:"
        )
        print(f"{'solver':<28} {'cosine':>8} {'norm ratio':>11} {'inner residual':>15} {'linear residual':>16}")
        for name, node in solvers.items():
            algorithm.solver = instantiate(node)
            rows = []
            for batch, reference in zip(batches, unrolled):
                meta_grad, _, _, inner, linear = algorithm.meta_gradient(batch, residuals=True)
                flat = tree_ravel(meta_grad)[0]
                rows.append(
                    (
                        cosine(flat, reference),
                        (flat.norm() / reference.norm()).item(),
                        inner.mean().item(),
                        linear.mean().item(),
                    )
                )
            means = [sum(column) / len(column) for column in zip(*rows)]
            options = ",".join(f"{k}={v}" for k, v in OmegaConf.to_container(node).items() if k != "_target_")
            print(f"{name + ' ' + options:<28} {means[0]:>8.3f} {means[1]:>11.3f} {means[2]:>15.3f} {means[3]:>16.3g}")
    except MetalabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
