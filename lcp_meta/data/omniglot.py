"""Omniglot (Lake et al. 2015) read straight from its zip files, with class splits and the one-shot runs.

Layout: ``images_background*.zip`` / ``images_evaluation.zip``, each holding ``[TOP/]ALPHABET/characterNN/*.png``
(105x105 1-bit drawings, black ink on white), and ``all_runs.zip`` with the 20 within-alphabet 20-way one-shot
runs ``runNN/training/classNN.png``, ``runNN/test/itemNN.png``, ``runNN/class_labels.txt``.

Image convention: each PNG is converted to 8-bit greyscale, resized to ``image_size`` (28) with PIL's LANCZOS
filter (the convention of the MAML code), then *inverted* so that ink is bright: stored as uint8 with background
0 and ink up to 255 (episodes scale it to [0, 1]).  Rotations by 0/90/180/270 degrees (``torch.rot90``,
counter-clockwise, exact on the square grid) are applied after resizing and make four classes per character.

Characters are identified by ``alphabet/characterNN``; a character found in several zips (Greek and Latin are in
both offline background subsets) is kept once.  Decoded images are cached as a tensor file keyed by the zips'
content hash, so a second load skips the PNG decoding.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils import DataNotFoundError, atomic_save, find_data_root
from ..utils.errors import DataFormatError, UserInputError

_CACHE_VERSION = 1
BACKGROUND_FULL = "images_background.zip"
EVALUATION_FULL = "images_evaluation.zip"
BACKGROUND_SMALL = ("images_background_small1.zip", "images_background_small2.zip")
RUNS_ZIP = "all_runs.zip"
_EXPECTED = (f"{BACKGROUND_FULL} (optionally with {EVALUATION_FULL}) or "
             f"{' + '.join(BACKGROUND_SMALL)} (any images_background*.zip)")
_CHAR_DIR = re.compile(r"^character\d+$")


@dataclass
class OmniglotClasses:
    """Decoded drawings by class: ``images`` uint8 (classes, drawings, S, S) and a name per class (the decoded
    characters, 'alphabet/characterNN', or the rotated classes of one split, 'alphabet/characterNN/rot090')."""

    images: torch.Tensor
    names: List[str]

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device) -> "OmniglotClasses":
        return OmniglotClasses(self.images.to(device), self.names)


@dataclass
class OmniglotSplits:
    train: OmniglotClasses
    val: OmniglotClasses
    test: OmniglotClasses
    protocol: Dict[str, object]


def default_cache_dir() -> Path:
    """``$LCP_META_CACHE`` or ``~/.cache/lcp_meta``: the data root may be read-only, so the cache lives apart."""
    return Path(os.environ.get("LCP_META_CACHE", Path.home() / ".cache" / "lcp_meta"))


def preprocess_png(data: bytes, image_size: int = 28) -> np.ndarray:
    """One Omniglot PNG -> uint8 (S, S), ink bright (see the module docstring for the convention)."""
    from PIL import Image  # Pillow comes with torchvision/matplotlib; imported here to keep `import lcp_meta` light

    with Image.open(io.BytesIO(data)) as img:
        grey = img.convert("L")
        if grey.size != (image_size, image_size):
            grey = grey.resize((image_size, image_size), resample=Image.LANCZOS)
        return 255 - np.asarray(grey, dtype=np.uint8)


def _read_member(zf: zipfile.ZipFile, path: Path, name: "str | zipfile.ZipInfo") -> bytes:
    """One member's bytes; a damaged archive (bad CRC, corrupt deflate stream) is a one-line DataFormatError."""
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        member = name.filename if isinstance(name, zipfile.ZipInfo) else name
        raise DataFormatError(f"{path}: member {member} cannot be read ({exc}); the zip is damaged, replace it "
                              f"with an intact copy ({_EXPECTED})") from None


def _read_png(zf: zipfile.ZipFile, path: Path, name: "str | zipfile.ZipInfo", image_size: int) -> np.ndarray:
    data = _read_member(zf, path, name)
    try:
        return preprocess_png(data, image_size)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError (an OSError), bad chunks
        member = name.filename if isinstance(name, zipfile.ZipInfo) else name
        raise DataFormatError(f"{path}: member {member} is not a readable PNG image ({exc}); the zip is damaged "
                              f"or not the Omniglot archive ({_EXPECTED})") from None


def _sha256(paths: Sequence[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserInputError(f"{path} is not a readable zip file ({exc}); expected {_EXPECTED}") from exc


def _character_members(zf: zipfile.ZipFile) -> Dict[str, List[zipfile.ZipInfo]]:
    """Group the PNG members of a zip by 'alphabet/characterNN' (whatever top folder precedes them)."""
    chars: Dict[str, List[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        parts = info.filename.rstrip("/").split("/")
        if info.is_dir() or len(parts) < 3 or not parts[-1].lower().endswith(".png"):
            continue
        alphabet, character = parts[-3], parts[-2]
        if _CHAR_DIR.match(character) and not alphabet.startswith("__MACOSX"):
            chars.setdefault(f"{alphabet}/{character}", []).append(info)
    for members in chars.values():
        members.sort(key=lambda i: i.filename)
    return chars


def _decode_zips(paths: Sequence[Path], image_size: int, progress: bool) -> OmniglotClasses:
    from ..utils.progress import progress as progress_bar

    seen: Dict[str, Tuple[Path, List[zipfile.ZipInfo]]] = {}
    zips = {p: _open_zip(p) for p in paths}
    try:
        for path, zf in zips.items():
            chars = _character_members(zf)
            if not chars:
                raise UserInputError(f"{path} holds no ALPHABET/characterNN/*.png drawings; expected the standard "
                                 f"Omniglot layout ({_EXPECTED})")
            for key, members in chars.items():
                if key in seen:
                    # the same character in two zips (Greek/Latin in the offline subsets): keep one copy, but
                    # say so if the two copies are not byte-identical (the CRCs stored in the zips differ)
                    first = [(m.filename.rsplit("/", 1)[-1], m.CRC) for m in seen[key][1]]
                    again = [(m.filename.rsplit("/", 1)[-1], m.CRC) for m in members]
                    if first != again:
                        warnings.warn(f"Omniglot character {key} differs between {seen[key][0].name} and "
                                      f"{path.name}; keeping the copy from {seen[key][0].name}")
                    continue
                seen[key] = (path, members)
        names = sorted(seen)
        counts = {len(seen[k][1]) for k in names}
        if len(counts) != 1:
            bad = [f"{k}: {len(seen[k][1])}" for k in names if len(seen[k][1]) != max(counts)]
            raise UserInputError(f"Omniglot characters must all have the same number of drawings; "
                             f"found {sorted(counts)} ({', '.join(bad[:5])})")
        drawings = counts.pop()
        images = np.empty((len(names), drawings, image_size, image_size), dtype=np.uint8)
        for c, key in enumerate(progress_bar(names, desc="decoding Omniglot", disable=not progress, leave=False)):
            path, members = seen[key]
            for d, info in enumerate(members):
                images[c, d] = _read_png(zips[path], path, info, image_size)
    finally:
        for zf in zips.values():
            zf.close()
    return OmniglotClasses(torch.from_numpy(images), names)


def load_characters(zip_paths: Sequence["str | os.PathLike"], image_size: int = 28,
                    cache_dir: "str | os.PathLike | None" = None, progress: bool = False) -> OmniglotClasses:
    """Decode (or load from the cache) the distinct characters of the given Omniglot zips."""
    paths = [Path(p) for p in zip_paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"Omniglot zip(s) not found: {', '.join(missing)}; expected {_EXPECTED}")
    if not isinstance(image_size, int) or image_size < 1:
        raise UserInputError(f"image_size must be a positive integer, got {image_size!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _sha256(paths, f"omniglot-v{_CACHE_VERSION}-{image_size}")
    cache_file = cache / f"omniglot_{key[:20]}.pt"
    if cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            return OmniglotClasses(blob["images"], list(blob["names"]))
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable Omniglot cache {cache_file}: {exc}")
    chars = _decode_zips(paths, image_size, progress)
    try:
        atomic_save({"images": chars.images, "names": chars.names}, cache_file)
    except OSError as exc:  # a read-only cache dir only costs speed
        warnings.warn(f"could not write the Omniglot cache {cache_file}: {exc}")
    return chars


def omniglot_folder(data_root: Optional[str]) -> Path:
    """``<data_root>/omniglot`` (or ``$LCP_META_DATA/omniglot``; a root that is itself the folder also works)."""
    try:
        folder = find_data_root(data_root, "omniglot", [])
    except DataNotFoundError as exc:
        raise DataNotFoundError(f"{exc}{_EXPECTED}") from None
    if not folder.is_dir() and list(folder.parent.glob("images_background*.zip")):
        folder = folder.parent  # the root given is itself the Omniglot folder
    return folder


def find_omniglot_zips(data_root: Optional[str]) -> Tuple[List[Path], Optional[Path]]:
    """The background zips and, when present, the evaluation zip, with a clear error when none is there."""
    folder = omniglot_folder(data_root)
    background = sorted(folder.glob("images_background*.zip"))
    if not background:
        raise DataNotFoundError(f"no Omniglot data in {folder}: expected {_EXPECTED}")
    evaluation = folder / EVALUATION_FULL
    return background, (evaluation if evaluation.is_file() else None)


def download_omniglot(data_root: "str | os.PathLike") -> Path:
    """Download the full background and evaluation zips into ``<data_root>/omniglot`` (needs torchvision and a
    network; never used by the tests).  URLs and checksums are torchvision's, so they stay in one place."""
    from torchvision.datasets import Omniglot
    from torchvision.datasets.utils import download_url

    folder = Path(data_root) / "omniglot"
    for stem, md5 in Omniglot.zips_md5.items():
        download_url(f"{Omniglot.download_url_prefix}/{stem}.zip", str(folder), filename=f"{stem}.zip", md5=md5)
    return folder


def rotate_classes(images: torch.Tensor, names: Sequence[str],
                   rotations: Sequence[int] = (0, 90, 180, 270)) -> OmniglotClasses:
    """Each character at each rotation as its own class (rotation-major order: all characters at 0, at 90, ...)."""
    out, out_names = [], []
    for deg in rotations:
        if deg % 90:
            raise UserInputError(f"rotations must be multiples of 90 degrees, got {deg}")
        out.append(torch.rot90(images, k=(deg // 90) % 4, dims=(-2, -1)))
        out_names += [f"{n}/rot{deg:03d}" for n in names]
    return OmniglotClasses(torch.cat(out, 0).contiguous(), out_names)


def split_indices(num: int, fractions: Sequence[float], seed: int) -> List[torch.Tensor]:
    """A seeded partition of ``range(num)`` into consecutive blocks of the given fractions (the last gets the rest)."""
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise UserInputError(f"split fractions must be non-negative and sum to at most 1, got {list(fractions)}")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(int(seed)))
    sizes = [int(round(f * num)) for f in fractions]
    parts, start = [], 0
    for size in sizes:
        parts.append(perm[start:start + size].sort().values)
        start += size
    parts.append(perm[start:].sort().values)
    return parts


def load_omniglot_splits(data_root: Optional[str] = None, seed: int = 0, val_fraction: float = 0.15,
                         test_fraction: float = 0.25, image_size: int = 28, rotations: bool = True,
                         cache_dir: "str | os.PathLike | None" = None, progress: bool = False) -> OmniglotSplits:
    """Train / validation / test classes.

    With ``images_evaluation.zip`` present (the full data set) the test classes are its characters and the
    background characters are split seeded into train and validation (``val_fraction``).  With background zips
    only (the offline subsets) the distinct background characters are split seeded into train, validation
    (``val_fraction``) and test (``test_fraction``).  The split is by character, before rotation, so no
    rotated copy of a held-out character is ever trained on.
    """
    background, evaluation = find_omniglot_zips(data_root)
    chars = load_characters(background, image_size=image_size, cache_dir=cache_dir, progress=progress)
    rot = (0, 90, 180, 270) if rotations else (0,)
    if evaluation is not None:
        val_idx, train_idx = split_indices(len(chars), [val_fraction], seed)
        test_chars = load_characters([evaluation], image_size=image_size, cache_dir=cache_dir, progress=progress)
        test = rotate_classes(test_chars.images, test_chars.names, rot)
        test_source = evaluation.name
    else:
        val_idx, test_idx, train_idx = split_indices(len(chars), [val_fraction, test_fraction], seed)
        test = rotate_classes(chars.images[test_idx], [chars.names[i] for i in test_idx], rot)
        test_source = "held-out background characters"
    train = rotate_classes(chars.images[train_idx], [chars.names[i] for i in train_idx], rot)
    val = rotate_classes(chars.images[val_idx], [chars.names[i] for i in val_idx], rot)
    for name, split in (("train", train), ("validation", val), ("test", test)):
        if len(split) == 0:
            raise UserInputError(f"the Omniglot {name} split is empty: {len(chars)} characters with "
                             f"val_fraction={val_fraction}, test_fraction={test_fraction}")
    protocol = {
        "zips": [p.name for p in background] + ([evaluation.name] if evaluation is not None else []),
        "distinct_background_characters": len(chars), "split_seed": seed,
        "characters": {"train": len(train_idx), "val": len(val_idx),
                       "test": len(test) // len(rot)},
        "classes": {"train": len(train), "val": len(val), "test": len(test)},
        "rotations": list(rot), "test_source": test_source, "image_size": image_size,
        "preprocessing": "greyscale, PIL LANCZOS resize, inverted (ink=1, background=0), values in [0, 1]",
    }
    return OmniglotSplits(train, val, test, protocol)


# ----------------------------------------------------------------------------------------------------------
# The 20 official within-alphabet 20-way one-shot runs
# ----------------------------------------------------------------------------------------------------------
class OneShotRun(NamedTuple):
    """One run: 20 training images (one per class), 20 test items, and the answer for each test item.

    train_images, test_images: uint8 (20, S, S), ordered classNN / itemNN (index = NN - 1).
    answers: int64 (20,), the 0-based index of the correct training image for each test item.
    """

    name: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    answers: torch.Tensor


_RUN_LINE = re.compile(r"^\s*(\S*?)(run\d+)/test/item(\d+)\.png\s+(\S*?)(run\d+)/training/class(\d+)\.png\s*$")


def _parse_labels(text: str, run: str) -> Dict[int, int]:
    answers: Dict[int, int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _RUN_LINE.match(line)
        if not m or m.group(2) != run or m.group(5) != run:
            raise UserInputError(f"{run}/class_labels.txt: cannot read line {line.strip()!r}; expected "
                             f"'{run}/test/itemNN.png {run}/training/classNN.png'")
        answers[int(m.group(3)) - 1] = int(m.group(6)) - 1
    return answers


def load_one_shot_runs(data_root: Optional[str] = None, image_size: int = 28,
                       zip_path: "str | os.PathLike | None" = None) -> List[OneShotRun]:
    """Read the one-shot runs from ``<data_root>/omniglot/all_runs.zip`` (or ``zip_path``)."""
    path = Path(zip_path) if zip_path is not None else find_data_root(data_root, "omniglot", [RUNS_ZIP]) / RUNS_ZIP
    if not path.is_file():
        raise DataNotFoundError(f"one-shot runs not found: expected {path} ({RUNS_ZIP})")
    runs: List[OneShotRun] = []
    with _open_zip(path) as zf:
        files = {info.filename: info for info in zf.infolist() if not info.is_dir()}
        label_files = sorted(f for f in files if re.search(r"(^|/)run\d+/class_labels\.txt$", f))
        if not label_files:
            raise UserInputError(f"{path} holds no runNN/class_labels.txt; expected the all_runs.zip layout "
                             f"runNN/training/classNN.png, runNN/test/itemNN.png, runNN/class_labels.txt")
        for label_file in label_files:
            prefix = label_file[: -len("class_labels.txt")]
            run = prefix.rstrip("/").rsplit("/", 1)[-1]
            answers = _parse_labels(_read_member(zf, path, files[label_file]).decode("utf-8", "replace"), run)

            def images(kind: str, stem: str) -> torch.Tensor:
                names = sorted(f for f in files if f.startswith(f"{prefix}{kind}/{stem}") and f.endswith(".png"))
                numbers = [int(re.search(r"(\d+)\.png$", f).group(1)) for f in names]
                if numbers != list(range(1, len(names) + 1)):
                    raise UserInputError(f"{path}: {run}/{kind} must hold {stem}01.png .. {stem}NN.png, "
                                     f"found {[f.rsplit('/', 1)[-1] for f in names]}")
                return torch.from_numpy(np.stack([_read_png(zf, path, files[f], image_size) for f in names]))

            train, test = images("training", "class"), images("test", "item")
            if sorted(answers) != list(range(len(test))) or not all(0 <= a < len(train) for a in answers.values()):
                raise UserInputError(f"{path}: {run}/class_labels.txt must give one training class (1..{len(train)}) "
                                 f"for each of the {len(test)} test items")
            runs.append(OneShotRun(run, train, test, torch.tensor([answers[i] for i in range(len(test))])))
    return runs


def score_one_shot_runs(predictions: Sequence, runs: Sequence[OneShotRun]) -> List[float]:
    """Accuracy of each run: ``predictions[r][i]`` is the predicted 0-based training-image index of test item i."""
    if len(predictions) != len(runs):
        raise UserInputError(f"need one prediction vector per run: {len(runs)} runs, got {len(predictions)}")
    scores = []
    for pred, run in zip(predictions, runs):
        pred = torch.as_tensor(pred).detach().to("cpu", torch.int64).flatten()
        if pred.shape != run.answers.shape:
            raise UserInputError(f"{run.name}: expected {run.answers.numel()} predicted indices, got {pred.numel()}")
        scores.append(float((pred == run.answers).double().mean()))
    return scores
