"""scripts/benchmark.py compares like with like: its per-task loops take the vmapped step's
meta-update (float64, to 1e-10), and its torch-layers model is Conv4 with torch's batch norm."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call

from metalab.algorithms import MAML
from metalab.hypergrad import unroll
from metalab.models import Conv4
from tests.helpers.scripts import script

benchmark = script("benchmark")


def tiny_maml(norm: str) -> MAML:
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), 5, hidden_channels=4, norm=norm).double()
    return MAML(
        model,
        benchmark.RandomImages(torch.device("cpu"), 5),
        unroll(),
        functools.partial(torch.optim.SGD, lr=0.1),
        inner_lr=0.4,
        inner_steps=2,
    )


def double(batch):
    return type(batch)(batch.x_support.double(), batch.y_support, batch.x_query.double(), batch.y_query)


def test_the_loop_takes_the_vmapped_steps_meta_update():
    batch = double(benchmark.image_batch(5, 3, 4, torch.device("cpu")))
    after = []
    for step in (benchmark.vmap_step, benchmark.loop_step):
        algo = tiny_maml("support")
        step(algo, batch)
        after.append({k: v.detach().clone() for k, v in algo.meta_parameters().items()})
        assert any(not torch.equal(v, tiny_maml("support").meta_parameters()[k]) for k, v in after[-1].items())
    for key in after[0]:
        torch.testing.assert_close(after[1][key], after[0][key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("norm", ["transductive", "support"])
def test_the_torch_layers_model_is_conv4_with_torchs_batch_norm(norm):
    """The peers' model computes Conv4's function under either protocol: the query rows normalised by
    their own statistics, or by the support rows' (``context``)."""
    algo = tiny_maml(norm)
    generator = torch.Generator().manual_seed(1)
    x, context = (torch.rand(n, 1, 28, 28, dtype=torch.float64, generator=generator) for n in (7, 5))
    params = algo.initial_params()
    with torch.no_grad():
        for value in params.values():  # away from the initial norm weights 1 and biases 0
            value.add_(0.1 * torch.randn_like(value))
        torch.testing.assert_close(
            benchmark.torch_layers(params, x, context, algo.model),
            functional_call(algo.model, params, (x,), {"context": context}),
            rtol=1e-12,
            atol=1e-12,
        )
