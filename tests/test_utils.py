"""Devices, atomic checkpoints with RNG state, data-root lookup errors."""
import random

import numpy as np
import pytest
import torch

from lcp_meta.utils import (DataNotFoundError, atomic_save, find_data_root, load_checkpoint, resolve_device,
                            rng_state, set_rng_state)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_checkpoint_roundtrip_restores_every_rng(tmp_path):
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    state = rng_state()
    path = atomic_save({"rng": state, "w": torch.arange(3.0)}, tmp_path / "ck" / "last.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck = load_checkpoint(path)
    set_rng_state(ck["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(ck["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = atomic_save({"a": 1}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        atomic_save({"bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"a": 1}
    assert len(list(tmp_path.iterdir())) == 1


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "none.pt")


def test_find_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LCP_META_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="--data-root"):
        find_data_root(None, "mnist", ["a.gz"])
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "a.gz").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="missing b.gz"):
        find_data_root(str(tmp_path), "mnist", ["a.gz", "b.gz"])
    monkeypatch.setenv("LCP_META_DATA", str(tmp_path))
    assert find_data_root(None, "mnist", ["a.gz"]) == tmp_path / "mnist"


def test_atomic_write_text(tmp_path):
    from lcp_meta.utils import atomic_write_text
    path = atomic_write_text('{"a": 1}\n', tmp_path / "sub" / "r.json")
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
