"""Shared test configuration.

- Slow reproduction runs are marked ``@pytest.mark.slow`` and skipped unless ``LCP_META_SLOW=1``.
- ``shared_data`` is the offline data folder beside the checkout (``../shared/data``); tests that need it skip
  with a reason when it is absent.
"""
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The suite is dominated by tiny float64 problems, for which intra-op threads cost far more than they
# give (measured: a tiny conv-DEQ controller step 84 ms with 2 threads on a loaded 2-core machine,
# under 2 ms with 1).  Tests that train on MNIST set their own thread count where it pays.
torch.set_num_threads(int(os.environ.get("LCP_META_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LCP_META_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow reproduction run; set LCP_META_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# ------------------------------------------------------------------------------------- shared test builders
# Plain functions (``from conftest import ...``): tests build the same tiny problems and files in one way.
DT = torch.float64


def one_error_line(capsys, *needles, command: str = "lcp-meta ") -> str:
    """The command's stderr is exactly one line, without traceback, starting with ``command`` and holding every
    needle (the contract of a user-input error: one clear line, exit code 2)."""
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith(command), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def sine_tasks(T: int = 2, n: int = 6, *, n_query: int = None, x_range=(-2.0, 2.0), amplitude=(1.0, 1.0),
               phase=(0.0, 3.0), seed: int = 0, dtype=DT):
    """T sinusoid regression tasks ``a sin(x + p)`` as a TaskBatch (x, y of shape (T, n, 1)), drawn from a
    generator seeded by ``seed`` (the global RNG is left alone)."""
    from lcp_meta.data.tasks import TaskBatch
    g = torch.Generator().manual_seed(seed)
    u = lambda shape, lo, hi: lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)  # noqa: E731
    a, p = u((T, 1, 1), *amplitude), u((T, 1, 1), *phase)
    xs, xq = u((T, n, 1), *x_range), u((T, n if n_query is None else n_query, 1), *x_range)
    return TaskBatch(xs, a * torch.sin(xs + p), xq, a * torch.sin(xq + p))


def gaussian_tasks(T: int = 2, n: int = 5, n_query: int = 7, d_in: int = 2, d_out: int = 1, *, seed: int = 1,
                   x_scale: float = 0.5, y_scale: float = 0.3, dtype=DT):
    """T regression tasks with Gaussian inputs and targets (small scales keep the inner problems strongly convex
    for lam of a few units)."""
    from lcp_meta.data.tasks import TaskBatch
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return TaskBatch(x_scale * r(T, n, d_in), y_scale * r(T, n, d_out), x_scale * r(T, n_query, d_in),
                     y_scale * r(T, n_query, d_out))


def tanh_mlp(hidden=(8,), in_features: int = 1, out_features: int = 1, *, seed: int = 0, dtype=DT):
    """The smooth learner of the exactness tests: ``MetaMLP`` with tanh, initialised from ``seed``."""
    from lcp_meta.models.fewshot import MetaMLP
    torch.manual_seed(seed)
    return MetaMLP(in_features, tuple(hidden), out_features, activation="tanh").to(dtype)


def drawing_png(block=None, size: int = 105, value: int = None) -> bytes:
    """A PNG image: Omniglot-like 1-bit (white, one black rectangle ``block`` = (r0, r1, c0, c1)), or, with
    ``value``, a uniform grey ``size`` x ``size`` image."""
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    if value is not None:
        Image.new("L", (size, size), value).save(buf, format="PNG")
    else:
        arr = np.ones((size, size), dtype=bool)
        r0, r1, c0, c1 = block
        arr[r0:r1, c0:c1] = False
        Image.fromarray(arr).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def drawing_block(c: int, d: int):
    """The rectangle of character ``c``, drawing ``d`` in :func:`write_omniglot_zip` (distinct per pair)."""
    return 5 + 3 * c, 40 + 3 * c, 10 + 4 * d, 60 + 2 * d


def write_omniglot_zip(path: Path, top: str = "images_background", alphabets=(("Alpha", 2),), drawings: int = 4,
                       skip=(), image=None, replace=None) -> Path:
    """An Omniglot-style zip: ``top/ALPHABET/characterNN/NNNN_DD.png``, character c (counted over all alphabets)
    drawing d (from 0) drawn by ``image(c, d)`` (default: a distinct rectangle per (c, d)).

    skip: (alphabet, character number) pairs that get one drawing fewer; replace: {(c, d): bytes} members whose
    content is replaced (corrupt files)."""
    import zipfile
    image = image or (lambda c, d: drawing_png(drawing_block(c, d)))
    with zipfile.ZipFile(path, "w") as zf:
        c = 0
        for alphabet, n_chars in alphabets:
            for k in range(1, n_chars + 1):
                for d in range(drawings - (1 if (alphabet, k) in skip else 0)):
                    data = (replace or {}).get((c, d)) or image(c, d)
                    zf.writestr(f"{top}/{alphabet}/character{k:02d}/{1000 + c:04d}_{d + 1:02d}.png", data)
                c += 1
    return path
