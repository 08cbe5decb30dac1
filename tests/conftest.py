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
