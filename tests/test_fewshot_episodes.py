"""N-way K-shot episode sampling and the 95% confidence interval."""
import math

import numpy as np
import pytest
import torch

from lcp_meta.data.episodes import EpisodeSampler, mean_ci95


def _coded_images(classes=12, drawings=8):
    """images[c, d] is a 2x2 image filled with 100 c + d: every gathered image says where it came from."""
    code = (100 * torch.arange(classes).view(-1, 1) + torch.arange(drawings).view(1, -1)).double()
    return code.view(classes, drawings, 1, 1).expand(classes, drawings, 2, 2).contiguous()


@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 3), (4, 3, 5), (12, 2, 2)])
def test_episodes_are_well_formed(ways, shots, queries):
    images = _coded_images()
    sampler = EpisodeSampler(images, ways, shots, queries)
    idx = sampler.sample_indices(50, seed=4)
    xs, ys, xq, yq = sampler.gather(idx, dtype=torch.float64)
    assert xs.shape == (50, ways * shots, 2, 2) and xq.shape == (50, ways * queries, 2, 2)
    assert ys.shape == (50, ways * shots) and yq.shape == (50, ways * queries)
    assert ys.dtype == yq.dtype == torch.int64
    for e in range(50):
        classes = idx.classes[e].tolist()
        assert len(set(classes)) == ways  # disjoint classes within an episode
        # labels are 0..N-1, each with K support and Q query examples
        assert torch.equal(torch.bincount(ys[e], minlength=ways), torch.full((ways,), shots))
        assert torch.equal(torch.bincount(yq[e], minlength=ways), torch.full((ways,), queries))
        for x, y in ((xs[e], ys[e]), (xq[e], yq[e])):
            source_class = (x[:, 0, 0] // 100).long()
            # label j always holds images of the episode's j-th class
            assert torch.equal(source_class, torch.tensor(classes)[y])
        for j in range(ways):
            sup = set((xs[e][ys[e] == j][:, 0, 0] % 100).long().tolist())
            qry = set((xq[e][yq[e] == j][:, 0, 0] % 100).long().tolist())
            assert len(sup) == shots and len(qry) == queries and not sup & qry  # distinct drawings


def test_determinism_per_seed_and_variety():
    sampler = EpisodeSampler(_coded_images(), 5, 1, 2)
    a, b, c = (sampler.sample(20, seed=s, dtype=torch.float64) for s in (7, 7, 8))
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.x_support, c.x_support)
    # over many episodes every class and every label position gets used
    idx = sampler.sample_indices(400, seed=0)
    assert set(idx.classes.flatten().tolist()) == set(range(12))
    assert set(idx.support.flatten().tolist()) == set(range(8))


def test_uint8_images_are_scaled_to_unit_range():
    images = torch.randint(0, 256, (6, 5, 3, 3), dtype=torch.uint8)
    images[0, 0] = 255
    sampler = EpisodeSampler(images, 6, 2, 3)
    xs, ys, xq, yq = sampler.sample(3, seed=1)
    assert xs.dtype == torch.float32 and 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0
    idx = sampler.sample_indices(3, seed=1)
    c, d = int(idx.classes[0, 0]), int(idx.support[0, 0, 0])
    torch.testing.assert_close(xs[0, 0], images[c, d].float() / 255.0)


def test_batches_of_a_fixed_set_reassemble_it():
    sampler = EpisodeSampler(_coded_images(), 3, 2, 2)
    idx = sampler.sample_indices(10, seed=2)
    whole = sampler.gather(idx, dtype=torch.float64)
    parts = list(sampler.iter_batches(idx, 4, dtype=torch.float64))
    assert [p.x_support.shape[0] for p in parts] == [4, 4, 2]
    for k in range(4):
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])


@pytest.mark.parametrize("kwargs, match", [
    (dict(ways=13, shots=1, queries=1), "13-way"), (dict(ways=2, shots=5, queries=4), "drawings"),
    (dict(ways=0, shots=1, queries=1), "ways"), (dict(ways=2, shots=1, queries=0), "queries"),
])
def test_impossible_episodes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(_coded_images(), **kwargs)


def test_mean_ci95_matches_its_formula():
    values = np.random.default_rng(0).normal(0.9, 0.05, size=600)
    mean, ci = mean_ci95(values.tolist())
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert ci == pytest.approx(1.96 * values.std(ddof=1) / math.sqrt(600), rel=1e-12)
    assert mean_ci95([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])
