"""Devices, atomic checkpoints with RNG state, data-root lookup errors."""
import random

import numpy as np
import pytest
import torch

from lcp_meta.utils import (DataNotFoundError, UserInputError, atomic_save, find_data_root, load_checkpoint, resolve_device,
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


# ------------------------------------------------------------------ flags generated from config dataclasses
# the flags of each command as they were before they were generated (stable API), plus --activation (issue 10)
# and supervised --no-plots (its learning-curve plot, 2026-11-29)
STABLE_FLAGS = {
    "supervised": "batch-size checkpoint-every checkpoint-minutes data-root dataset device epochs grad-clip lr lr-final max-batches max-iter "
                  "max-skipped method model model-set no-plots no-progress optimizer out overwrite preset resume seed set "
                  "solver test-subset tol weight-decay",
    "fewshot": "activation beta cache-dir checkpoint-every checkpoint-minutes data-root device dtype hidden inner-lr inner-steps lam "
               "log-every max-skipped meta-batch meta-steps methods no-plots no-progress out outer-lr overwrite "
               "queries resume seed set shots split-seed stop-after task test-episodes threads val-episodes "
               "val-every ways",
    "demo": "beta checkpoint-every checkpoint-minutes device dtype hidden inner-lr inner-steps lam log-every max-skipped meta-batch "
            "meta-steps methods no-plots no-progress out outer-lr overwrite resume seed set stop-after test-episodes "
            "threads val-episodes val-every",
}


def _subparsers():
    from lcp_meta.cli import build_parser
    action = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_generated_flags_are_the_stable_ones():
    for command, parser in _subparsers().items():
        flags = {o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        assert flags == set(STABLE_FLAGS[command].split()), command


def test_flags_reach_the_config_and_absent_flags_keep_the_one_source_of_defaults():
    import dataclasses
    from lcp_meta.fewshot import defaults
    from lcp_meta.fewshot.cli import config_from_args
    from lcp_meta.fewshot.config import FewShotConfig
    from lcp_meta.supervised.trainer import RunConfig
    from lcp_meta.utils.cliargs import config_kwargs
    parsers = _subparsers()
    # nothing given: the CLI's config is the Python default, completed from defaults.TASKS
    for task in ("sinusoid", "omniglot"):
        cfg = config_from_args(parsers["fewshot"].parse_args(["--task", task])).validate()
        assert cfg == FewShotConfig(task=task).validate()
        assert {k: getattr(cfg, k) for k in defaults.TASKS[task]} == defaults.TASKS[task]
    demo = config_from_args(parsers["demo"].parse_args([]), defaults.DEMO).validate()
    assert {k: getattr(demo, k) for k in defaults.DEMO} == defaults.DEMO and demo.shots == defaults.TASKS["sinusoid"]["shots"]
    # given flags win, with their types and conversions
    cfg = config_from_args(parsers["fewshot"].parse_args(
        ["--lam", "3", "--meta-steps", "7", "--methods", "lcp, maml", "--set", "lcp.beta=0.2", "--no-plots"]))
    assert (cfg.lam, cfg.meta_steps, cfg.methods, cfg.method_options, cfg.plots) == \
        (3.0, 7, ("lcp", "maml"), {"lcp": {"beta": 0.2}}, False)
    sup = RunConfig(**config_kwargs(parsers["supervised"].parse_args(
        ["--set", "alpha=0.1", "--model-set", "hidden=5", "--no-progress", "--epochs", "2"]), RunConfig))
    assert (sup.method_kwargs, sup.model_kwargs, sup.progress, sup.epochs) == ({"alpha": 0.1}, {"hidden": 5}, False, 2)
    assert dataclasses.replace(sup, method_kwargs={}, model_kwargs={}, progress=True, epochs=None) == RunConfig()


# ------------------------------------------------------------------------------------- the experiment harness
def test_harness_run_folder_and_checkpoint(tmp_path):
    from lcp_meta.utils import CheckpointError, RunFolderError, UserInputError, harness
    out = tmp_path / "run"
    held = [out / "result.json", out / "checkpoint.pt"]
    assert harness.prepare_run_folder(out, held, resume=False, overwrite=False) == out and out.is_dir()
    (out / "result.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"already holds a run \(result.json\)"):
        harness.prepare_run_folder(out, held, resume=False, overwrite=False)
    with pytest.raises(UserInputError, match="exclude each other"):
        harness.prepare_run_folder(out, held, resume=True, overwrite=True)
    harness.prepare_run_folder(out, held, resume=False, overwrite=True)
    assert not (out / "result.json").exists() and (out / "notes.txt").read_text() == "mine"  # only the run's files

    torch.manual_seed(5)
    harness.save_checkpoint({"step": 3, "config": {"lam": 0.5, "seed": 0}}, out / "checkpoint.pt")
    expected = torch.rand(3)
    torch.manual_seed(99)
    ck = harness.load_run_checkpoint(out / "checkpoint.pt", ("step",), "test", settings={"lam": 0.5, "seed": 0})
    assert ck["step"] == 3 and torch.equal(torch.rand(3), expected)  # the RNG is where it was saved
    with pytest.raises(UserInputError, match=r"different settings: lam was 0.5, now 2.0$"):
        harness.load_run_checkpoint(out / "checkpoint.pt", ("step",), "test", settings={"lam": 2.0, "seed": 0})
    with pytest.raises(CheckpointError, match="not a checkpoint of test .missing epoch"):
        harness.load_run_checkpoint(out / "checkpoint.pt", ("step", "epoch"), "test")
    where = harness.provenance(torch.device("cpu"), ["prog", "--x"])
    assert where["command"] == "prog --x" and where["torch_version"] == torch.__version__ and where["world_size"] == 1


def test_progress_writes_plain_lines_when_the_stream_is_not_a_terminal():
    import io
    from lcp_meta.utils.progress import PlainProgress, progress
    buf = io.StringIO()  # not a terminal
    bar = progress(total=4, desc="lcp meta-training", initial=1, file=buf, interval=0.0, leave=False)
    assert isinstance(bar, PlainProgress)
    bar.update(1)
    bar.set_postfix(loss="0.52")
    bar.update(2)
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and len(lines) == 3
    assert lines[0].startswith("lcp meta-training: 2/4 (50%), 0:00 elapsed, ~0:00 left")
    assert lines[1].startswith("lcp meta-training: 4/4 (100%)") and lines[1].endswith("loss=0.52")
    assert "left" not in lines[1]
    quiet = io.StringIO()  # lines are rate-limited: none between the start and the end within the interval
    assert list(progress(range(3), desc="decode", file=quiet, interval=3600)) == [0, 1, 2]
    assert quiet.getvalue().splitlines() == ["decode: 3/3 (100%), 0:00 elapsed"]


def test_progress_is_a_tqdm_bar_on_a_terminal_and_silent_when_disabled():
    import io
    from tqdm.auto import tqdm
    from lcp_meta.utils.progress import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert isinstance(progress(total=2, file=Terminal()), tqdm)
    buf = io.StringIO()
    bar = progress(total=2, file=buf, disable=True)
    bar.update(2)
    bar.close()
    assert buf.getvalue() == ""


# ------------------------------------------------------------------------------------------- LaTeX tables
def test_latex_table_escapes_cells_and_aligns_numbers():
    from lcp_meta.utils.tables import latex_table
    md = ("Intro line.\n\n| method | test accuracy (%) mean ± CI95 | skipped | memory | settings |\n|---|---|---|---|---|\n"
          "| lcp_di | **97.52 ± 0.10** | 0/300 | n/a | lam=10, 50% & #1 |\n"
          "| rbp | 97.56 +- 0.45 | 2/300 (0.7%) | 12.5 | {x}^2 ~ y, `--resume`, C++-style |\n"
          "| [x] | (best) | - | - | \\ |\n\n"
          "| a second | table |\n|---|---|\n| not | read |\n")
    tex = latex_table(md, caption="Omniglot 5-way: mean ± CI", label="tab:x")
    lines = tex.splitlines()
    assert lines[:5] == [r"\begin{table}[t]", r"\centering", r"\caption{Omniglot 5-way: mean $\pm$ CI}",
                         r"\label{tab:x}", r"\begin{tabular}{lrrrl}"]
    body = lines[lines.index(r"\toprule") + 1:lines.index(r"\bottomrule")]
    assert body == [r"method & test accuracy (\%) mean $\pm$ CI95 & skipped & memory & settings \\", r"\midrule",
                    r"lcp\_di & \textbf{97.52 $\pm$ 0.10} & 0/300 & n/a & lam=10, 50\% \& \#1 \\",
                    r"rbp & 97.56 $\pm$ 0.45 & 2/300 (0.7\%) & 12.5 & \{x\}\textasciicircum{}2 \textasciitilde{} y, "
                    r"\texttt{-{}-resume}, C++-style \\",
                    r"{}[x] & (best) & - & - & \textbackslash{} \\"]
    assert lines[-2:] == [r"\end{tabular}", r"\end{table}"]


def test_latex_table_refuses_text_without_a_table_or_with_a_ragged_row():
    from lcp_meta.utils.tables import latex_table
    with pytest.raises(UserInputError, match="no markdown table"):
        latex_table("just prose | with a bar\n")
    with pytest.raises(UserInputError, match="2 cells, its header 3"):
        latex_table("| a | b | c |\n|---|---|---|\n| 1 | 2 |\n")
