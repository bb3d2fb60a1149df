import math

import torch

from metalab.tasks.episodic.sinusoid import Sinusoid


def test_shapes_ranges_and_the_sine_law():
    tasks = Sinusoid(shots=5, query=7, eval_shots=3, eval_query=11)
    batch = tasks.sample(64, "train", tasks.generator(0))
    assert batch.x_support.shape == (64, 5, 1) and batch.y_support.shape == (64, 5)
    assert batch.x_query.shape == (64, 7, 1) and batch.y_query.shape == (64, 7)
    test = tasks.sample(4, "test", tasks.generator(0))
    assert test.x_support.shape == (4, 3, 1) and test.x_query.shape == (4, 11, 1)
    x = torch.cat([batch.x_support, batch.x_query], 1).squeeze(-1)
    y = torch.cat([batch.y_support, batch.y_query], 1)
    assert x.min() >= -5 and x.max() <= 5
    # Recover A and phase from two points per task and check every point obeys y = A sin(x - phase).
    # y = a sin x - b cos x with a = A cos(phase), b = A sin(phase): a 2x2 solve per task.
    design = torch.stack([torch.sin(x[:, :2]), -torch.cos(x[:, :2])], -1).double()
    coef = torch.linalg.solve(design, y[:, :2].double())
    amplitude, phase = coef.norm(dim=-1), torch.atan2(coef[:, 1], coef[:, 0])
    assert torch.all(amplitude >= 0.1 - 1e-4) and torch.all(amplitude <= 5 + 1e-4)
    assert torch.all(phase >= -1e-4) and torch.all(phase <= math.pi + 1e-4)
    predicted = amplitude[:, None] * torch.sin(x.double() - phase[:, None])
    torch.testing.assert_close(predicted, y.double(), atol=1e-4, rtol=1e-4)


def test_deterministic_under_a_seed_and_tasks_differ():
    tasks = Sinusoid()
    a = tasks.sample(8, "train", tasks.generator(3))
    b = tasks.sample(8, "train", tasks.generator(3))
    c = tasks.sample(8, "train", tasks.generator(4))
    assert torch.equal(a.y_query, b.y_query) and torch.equal(a.x_support, b.x_support)
    assert not torch.equal(a.y_query, c.y_query)
    # distinct tasks within a batch: no two tasks share their support targets
    assert torch.cdist(a.y_support, a.y_support).add(torch.eye(8) * 1e9).min() > 1e-3
