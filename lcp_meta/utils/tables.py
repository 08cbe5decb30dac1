"""Result tables for a paper: a markdown table (the form every results file here is written in) as a LaTeX
``booktabs`` table, with the cells' special characters escaped and ``±`` (or ASCII ``+-``) as ``$\\pm$``.

The markdown stays the source of truth; the LaTeX is derived from it, so the two never disagree.
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

from .errors import UserInputError

__all__ = ["markdown_table_cells", "latex_table", "escape_latex"]

_SEPARATOR = re.compile(r"\|(\s*:?-+:?\s*\|)+")
# characters LaTeX treats specially in text mode, and symbols our tables use that need math mode
_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$",
            "≤": r"$\leq$", "≥": r"$\geq$", "−": r"$-$"}
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def markdown_table_cells(text: str) -> Tuple[List[str], List[List[str]]]:
    """``(header, rows)`` of the first markdown table in ``text`` (cells stripped; ``**bold**`` kept)."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and _SEPARATOR.fullmatch(lines[i + 1].replace(" ", "")):
            cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
            head, rows = cells(lines[i]), []
            for ln in lines[i + 2:]:
                if not ln.startswith("|"):
                    break
                row = cells(ln)
                if len(row) != len(head):
                    raise UserInputError(f"table row has {len(row)} cells, its header {len(head)}: {ln!r}")
                rows.append(row)
            return head, rows
    raise UserInputError("no markdown table found (expected a header row and a |---| separator)")


def _plain(text: str) -> str:
    text = "".join(_ESCAPES.get(ch, ch) for ch in text)
    return text.replace("--", "-{}-")  # (LaTeX would typeset -- as an en dash: flags such as --resume stay flags)


def escape_latex(cell: str) -> str:
    """One cell as LaTeX text: specials escaped, ``**x**`` as ``\\textbf{x}``, a backticked ``x`` as
    ``\\texttt{x}``, ``a +- b`` (our ASCII form) as ``a $\\pm$ b``."""
    cell = cell.replace(" +- ", " ± ")
    out = []
    for k, part in enumerate(re.split(r"\*\*(.+?)\*\*", cell)):  # odd pieces were bold
        pieces = re.split(r"`([^`]+)`", part)  # odd pieces were code
        text = "".join(r"\texttt{" + _plain(q) + "}" if j % 2 else _plain(q) for j, q in enumerate(pieces))
        out.append(r"\textbf{" + text + "}" if k % 2 else text)
    return "".join(out)


_NEUTRAL = {"-", "n/a", "nan", "inf", "-inf", "best"}  # cells that say "no number" in a numeric column


def _numeric(cell: str) -> bool:
    """A cell that reads as a number (``mean ± ci``, a ratio ``a/b``, a percent, a sign) or says there is none
    (``-``, ``n/a``): its column is right-aligned when every cell is."""
    tokens = cell.replace("**", "").replace(" +- ", " ").replace("±", " ").split()
    if not tokens:
        return False
    for t in tokens:
        t = t.strip("%()")  # ('(best)' reads as 'best')
        if t.lower() in _NEUTRAL:
            continue
        if not all(_NUMBER.fullmatch(part) for part in t.split("/")):
            return False
    return True


def _row(cells) -> str:
    line = " & ".join(escape_latex(c) for c in cells)
    # ('{}' keeps a row that starts with '[' from being read as an optional length of the previous row's \\)
    return ("{}" + line if line.startswith("[") else line) + r" \\"


def latex_table(markdown: str, caption: Optional[str] = None, label: Optional[str] = None) -> str:
    """The first table of ``markdown`` as a LaTeX ``table`` with ``booktabs`` rules (``\\usepackage{booktabs}``):
    numeric columns right-aligned, text columns left-aligned; ``caption``/``label`` when given."""
    head, rows = markdown_table_cells(markdown)
    align = "".join("r" if rows and all(_numeric(r[j]) for r in rows) else "l" for j in range(len(head)))
    body = [r"\begin{table}[t]", r"\centering"]
    if caption:
        body.append(r"\caption{" + escape_latex(caption) + "}")
    if label:
        body.append(r"\label{" + label + "}")
    body += [r"\begin{tabular}{" + align + "}", r"\toprule",
             _row(head), r"\midrule"]
    body += [_row(row) for row in rows]
    body += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(body) + "\n"
