"""Omniglot from its zips: the offline subsets, a generated miniature, the class split and the one-shot runs."""
import io
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from lcp_meta.data import omniglot as og
from lcp_meta.utils import DataNotFoundError

from conftest import SHARED_DATA as SHARED, drawing_block, drawing_png, write_omniglot_zip

OMNIGLOT = SHARED / "omniglot"


def _need_shared():
    if not (OMNIGLOT / "images_background_small1.zip").is_file():
        pytest.skip(f"offline Omniglot subsets not found in {OMNIGLOT}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One decode cache for the session (shared with test_fewshot_cli): the subsets are decoded once."""
    return tmp_path_factory.getbasetemp() / "omniglot_cache"


# ------------------------------------------------------------------------------- the offline subsets
def test_offline_subsets_242_distinct_characters_4_rotations(cache):
    _need_shared()
    s1, s2 = OMNIGLOT / "images_background_small1.zip", OMNIGLOT / "images_background_small2.zip"
    with zipfile.ZipFile(s1) as z1, zipfile.ZipFile(s2) as z2:
        m1, m2 = og._character_members(z1), og._character_members(z2)
        crc = lambda members: [(m.filename.rsplit("/", 1)[-1], m.CRC) for m in members]  # noqa: E731
        shared = sorted(set(m1) & set(m2))
        # Greek and Latin are in both zips, drawing for drawing identical (same file names and CRC32)
        assert {n.split("/")[0] for n in shared} == {"Greek", "Latin"}
        assert all(crc(m1[n]) == crc(m2[n]) for n in shared)
    assert len(m1) == 136 and len(m2) == 156
    both = og.load_characters([s1, s2], cache_dir=cache)
    assert len(both) == 242 and both.names == sorted(set(m1) | set(m2))  # shared characters counted once
    assert both.images.shape == (242, 20, 28, 28) and both.images.dtype == torch.uint8
    # convention: ink bright on a dark background, using the whole 0..255 range, mostly background
    img = both.images.float() / 255
    assert float(img.max()) == 1.0 and float(img.min()) == 0.0
    assert 0.03 < float(img.mean()) < 0.3
    corners = img[..., :2, :2]
    assert float(corners.mean()) < 0.02
    rotated = og.rotate_classes(both.images, both.names)
    assert len(rotated) == 968 and rotated.images.shape == (968, 20, 28, 28)
    assert torch.equal(rotated.images[242 + 5], torch.rot90(both.images[5], 1, (-2, -1)))
    assert rotated.names[2 * 242 + 5] == both.names[5] + "/rot180"


def test_split_of_the_offline_subsets(cache):
    _need_shared()
    splits = og.load_omniglot_splits(str(SHARED), seed=0, cache_dir=cache)
    base = lambda names: {n.rsplit("/", 1)[0] for n in names}  # noqa: E731
    train, val, test = base(splits.train.names), base(splits.val.names), base(splits.test.names)
    assert len(train) + len(val) + len(test) == 242
    assert not (train & val or train & test or val & test)  # held-out characters, rotations included
    assert len(splits.train) == 4 * len(train) and len(splits.test) == 4 * len(test)
    assert splits.protocol["characters"] == {"train": len(train), "val": len(val), "test": len(test)}
    again = og.load_omniglot_splits(str(SHARED), seed=0, cache_dir=cache)
    other = og.load_omniglot_splits(str(SHARED), seed=1, cache_dir=cache)
    assert again.test.names == splits.test.names and other.test.names != splits.test.names


# ------------------------------------------------------------------------------- a generated miniature
def test_miniature_zip_decoded_exactly_and_cached(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    bg = write_omniglot_zip(root / "omniglot" / "images_background.zip", "images_background", [("Alpha", 3), ("Beta", 2)])
    write_omniglot_zip(root / "omniglot" / "images_evaluation.zip", "images_evaluation", [("Gamma", 2)])
    cache = tmp_path / "cache"
    chars = og.load_characters([bg], image_size=28, cache_dir=cache)
    assert chars.names == ["Alpha/character01", "Alpha/character02", "Alpha/character03",
                           "Beta/character01", "Beta/character02"]
    assert chars.images.shape == (5, 4, 28, 28)
    # each image is the documented conversion of its PNG: LANCZOS to 28x28 of the greyscale, inverted
    for c in range(5):
        for d in range(4):
            ref = Image.open(io.BytesIO(drawing_png(drawing_block(c, d)))).convert("L").resize((28, 28), Image.LANCZOS)
            expect = 255 - torch.from_numpy(np.array(ref, dtype=np.uint8))
            assert torch.equal(chars.images[c, d], expect)
            r0, r1, c0, c1 = (round(v * 28 / 105) for v in drawing_block(c, d))
            # the ink rectangle is bright inside and the background dark far from it
            assert int(chars.images[c, d, (r0 + r1) // 2, (c0 + c1) // 2]) == 255
            assert int(chars.images[c, d, 27, 0]) == 0
    assert len(list(cache.glob("omniglot_*.pt"))) == 1
    # the second load comes from the cache: decoding is not called again
    with monkeypatch.context() as patch:
        patch.setattr(og, "_decode_zips", lambda *a, **k: pytest.fail("decoded again despite the cache"))
        again = og.load_characters([bg], image_size=28, cache_dir=cache)
    assert torch.equal(again.images, chars.images) and again.names == chars.names
    # with images_evaluation.zip the test classes are its characters; background is split train/val
    splits = og.load_omniglot_splits(str(root), seed=0, val_fraction=0.4, cache_dir=tmp_path / "cache2")
    assert {n.split("/")[0] for n in splits.test.names} == {"Gamma"} and len(splits.test) == 8
    assert len(splits.train) + len(splits.val) == 20 and len(splits.val) == 8


def test_data_root_from_environment(tmp_path, monkeypatch):
    write_omniglot_zip(tmp_path / "images_background_small1.zip", "images_background_small1", [("Alpha", 2)])
    monkeypatch.setenv("LCP_META_DATA", str(tmp_path))  # a root that is itself the omniglot folder
    zips, evaluation = og.find_omniglot_zips(None)
    assert [z.name for z in zips] == ["images_background_small1.zip"] and evaluation is None


def test_missing_and_malformed_data_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("LCP_META_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="images_background.zip"):
        og.find_omniglot_zips(None)
    (tmp_path / "omniglot").mkdir()
    with pytest.raises(DataNotFoundError, match="images_background_small1.zip"):
        og.load_omniglot_splits(str(tmp_path), cache_dir=tmp_path / "c")
    (tmp_path / "omniglot" / "images_background.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        og.load_omniglot_splits(str(tmp_path), cache_dir=tmp_path / "c")
    with zipfile.ZipFile(tmp_path / "omniglot" / "images_background.zip", "w") as zf:
        zf.writestr("images/readme.txt", "no drawings here")
    with pytest.raises(ValueError, match=r"ALPHABET/characterNN/\*\.png"):
        og.load_omniglot_splits(str(tmp_path), cache_dir=tmp_path / "c")
    bad = write_omniglot_zip(tmp_path / "uneven.zip", "x", [("Alpha", 2)], skip={("Alpha", 2)})
    with pytest.raises(ValueError, match="same number of drawings"):
        og.load_characters([bad], cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------- the one-shot runs
def _official_answers():
    """Parse class_labels.txt independently of the loader: run -> list of 0-based class indices."""
    answers = {}
    with zipfile.ZipFile(OMNIGLOT / "all_runs.zip") as zf:
        for name in zf.namelist():
            m = re.search(r"(run\d+)/class_labels\.txt$", name)
            if m:
                pairs = [ln.split() for ln in zf.read(name).decode().splitlines() if ln.strip()]
                items = sorted(pairs, key=lambda p: p[0])
                answers[m.group(1)] = [int(re.search(r"class(\d+)", p[1]).group(1)) - 1 for p in items]
    return answers


def test_one_shot_runs_and_scorer():
    _need_shared()
    runs = og.load_one_shot_runs(str(SHARED))
    official = _official_answers()
    assert [r.name for r in runs] == sorted(official) and len(runs) == 20
    for r in runs:
        assert r.train_images.shape == r.test_images.shape == (20, 28, 28)
        assert r.answers.tolist() == official[r.name]
    perfect = [torch.tensor(official[r.name]) for r in runs]
    assert og.score_one_shot_runs(perfect, runs) == [1.0] * 20
    shifted = [(p + 1) % 20 for p in perfect]  # every answer wrong
    assert og.score_one_shot_runs(shifted, runs) == [0.0] * 20
    # right on the first k items of run k (k = 0..19), wrong on the rest
    partial = [torch.cat([p[:k], (p[k:] + 1) % 20]) for k, p in enumerate(perfect)]
    assert og.score_one_shot_runs(partial, runs) == [k / 20 for k in range(20)]
    with pytest.raises(ValueError, match="one prediction vector per run"):
        og.score_one_shot_runs(perfect[:3], runs)
    with pytest.raises(ValueError, match="expected 20 predicted indices"):
        og.score_one_shot_runs([p[:5] for p in perfect], runs)


def test_one_shot_runs_malformed(tmp_path):
    path = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("run01/class_labels.txt", "run01/test/item01.png run01/training/classXX.png\n")
        zf.writestr("run01/training/class01.png", drawing_png(drawing_block(0, 0)))
        zf.writestr("run01/test/item01.png", drawing_png(drawing_block(0, 1)))
    with pytest.raises(ValueError, match="cannot read line"):
        og.load_one_shot_runs(zip_path=path)
    with pytest.raises(DataNotFoundError, match="all_runs.zip"):
        og.load_one_shot_runs(str(tmp_path / "nowhere"))
