"""Every ```python block of the README runs as written (the README is the API's documentation)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


# ------------------------------------------------------------------ the public API section names every export
def _render(obj) -> str:
    """``name(param, param=default, *, kw=default, **kwargs)`` of a public callable, without annotations."""
    import inspect
    parts, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            d = p.default
            if callable(d):
                text = f"F.{d.__name__}" if d.__module__ == "torch.nn.functional" else d.__name__
            elif repr(d).startswith("<"):
                text = "{}"  # a dataclass default_factory (dict)
            else:
                text = repr(d)
            parts.append(f"{p.name}={text}")
    return f"{obj.__name__}({', '.join(parts)})"


def test_public_api_section_gives_every_export_with_its_signature():
    import lcp_meta
    text = README.read_text()
    assert "## Public API" in text
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    missing = []
    for name in lcp_meta.__all__:
        obj = getattr(lcp_meta, name)
        if callable(obj) and getattr(obj, "__name__", None) == name and name != "EquilibriumModel":
            want = _render(obj)
        else:  # constants, and the nn.Module base class whose constructor takes (*args, **kwargs)
            want = f"`{name}`"
        if want not in section:
            missing.append(want)
    assert not missing, "README's Public API section lacks (or misstates): " + "; ".join(missing)
