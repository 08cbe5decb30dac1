"""Sinusoid regression tasks: the task family, seeding, devices and bad input."""
import math

import pytest
import torch

from lcp_meta.data.sinusoid import SinusoidTasks


def test_shapes_ranges_and_targets_follow_the_task_parameters():
    tasks = SinusoidTasks(shots=7, queries=11)
    batch = tasks.sample(64, seed=3, dtype=torch.float64)
    xs, ys, xq, yq = batch.tasks
    assert xs.shape == ys.shape == (64, 7, 1) and xq.shape == yq.shape == (64, 11, 1)
    amp, phase = batch.amplitude, batch.phase
    assert float(amp.min()) >= 0.1 and float(amp.max()) <= 5.0
    assert float(phase.min()) >= 0.0 and float(phase.max()) <= math.pi
    assert float(torch.cat([xs, xq], dim=1).abs().max()) <= 5.0
    # the targets are exactly A sin(x - phase) of each task (computed independently, elementwise)
    for t in range(64):
        for x, y in ((xs[t], ys[t]), (xq[t], yq[t])):
            ref = torch.tensor([float(amp[t]) * math.sin(float(v) - float(phase[t])) for v in x.flatten()],
                               dtype=torch.float64)
            torch.testing.assert_close(y.flatten(), ref, rtol=0, atol=1e-12)


def test_task_distribution_covers_its_ranges():
    batch = SinusoidTasks(shots=50).sample(4000, seed=0, dtype=torch.float64)
    amp, phase = batch.amplitude, batch.phase
    # uniform: means near the centres, extremes near the ends (4000 draws: loose, but fails for a wrong range)
    assert abs(float(amp.mean()) - 2.55) < 0.1 and abs(float(phase.mean()) - math.pi / 2) < 0.07
    assert float(amp.min()) < 0.2 and float(amp.max()) > 4.9
    x = batch.tasks.x_support
    assert abs(float(x.mean())) < 0.05 and float(x.min()) < -4.99 and float(x.max()) > 4.99


def test_seeded_reproducible_and_seeds_differ():
    tasks = SinusoidTasks(shots=5)
    a, b, c = tasks.sample(8, seed=1), tasks.sample(8, seed=1), tasks.sample(8, seed=2)
    for ta, tb in zip(a.tasks, b.tasks):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.tasks.x_support, c.tasks.x_support)
    # a generator continues the stream: two draws of 4 differ from each other
    gen = torch.Generator().manual_seed(5)
    first, second = tasks.sample(4, generator=gen), tasks.sample(4, generator=gen)
    assert not torch.equal(first.amplitude, second.amplitude)


def test_task_parameters_do_not_depend_on_the_query_count():
    """Amplitude and phase do not; the inputs do (drawn as one (T, K + Q) block), except the first task's support
    points.  (This test was named for the support points, which it never compared.)"""
    a = SinusoidTasks(shots=5, queries=5).sample(6, seed=9)
    b = SinusoidTasks(shots=5, queries=20).sample(6, seed=9)
    assert torch.equal(a.amplitude, b.amplitude) and torch.equal(a.phase, b.phase)
    assert torch.equal(a.tasks.x_support[0], b.tasks.x_support[0])
    assert not torch.equal(a.tasks.x_support[1], b.tasks.x_support[1])


def test_dtype_and_device_placement():
    tasks = SinusoidTasks(shots=4)
    b32 = tasks.sample(3, seed=0)
    b64 = tasks.sample(3, seed=0, dtype=torch.float64)
    assert b32.tasks.x_support.dtype == torch.float32 and b64.tasks.x_support.dtype == torch.float64
    torch.testing.assert_close(b32.tasks.y_query.double(), b64.tasks.y_query, rtol=1e-6, atol=1e-6)
    if torch.cuda.is_available():  # the same tasks on the GPU (drawn on the CPU, then moved)
        gpu = tasks.sample(3, seed=0, device="cuda")
        assert gpu.tasks.x_support.device.type == "cuda"
        assert torch.equal(gpu.tasks.x_support.cpu(), b32.tasks.x_support)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shots=0), "shots"), (dict(shots=3, queries=0), "queries"),
    (dict(shots=2, amplitude=(5.0, 0.1)), "amplitude"), (dict(shots=2, x_range=(0, float("nan"))), "x_range"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidTasks(**kwargs)


def test_bad_task_count():
    with pytest.raises(ValueError, match="num_tasks"):
        SinusoidTasks(shots=2).sample(0)


def test_one_task_type_from_the_sources_to_the_methods():
    """The sources produce the one task type (lcp_meta.TaskBatch); it unpacks like the 4-tuple, and a method
    given it, its 4-tuple or its ((xs, ys), (xq, yq)) form computes the same meta-gradient."""
    import torch.nn.functional as F

    import lcp_meta
    from lcp_meta.data import TaskBatch, TaskTensors
    from lcp_meta.fewshot.tasks import SinusoidSource
    from conftest import gaussian_tasks, sine_tasks, tanh_mlp
    assert lcp_meta.TaskBatch is TaskBatch is TaskTensors
    source = SinusoidSource(4, 6, 3, 0, 2, 2, torch.device("cpu"), torch.float64)
    batch = source.train_batch(0)
    assert type(batch) is TaskBatch and batch.num_tasks == 3 and batch[2] is batch.x_query
    assert [t.shape for t in batch] == [(3, 4, 1), (3, 4, 1), (3, 6, 1), (3, 6, 1)]
    assert all(torch.equal(a, b) for a, b in zip(batch.slice(1, 3), (t[1:3] for t in batch)))
    grads = []
    for form in (batch, tuple(batch), ((batch[0], batch[1]), (batch[2], batch[3]))):
        model = tanh_mlp((8,))
        lcp_meta.make_method("maml", model, F.mse_loss, inner_lr=0.05, inner_steps=3).meta_backward(form)
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))
    # the shared test builders give reproducible batches of the same type
    for build in (sine_tasks, gaussian_tasks):
        a, b = build(seed=4), build(seed=4)
        assert type(a) is TaskBatch and all(torch.equal(s, t) for s, t in zip(a, b))
