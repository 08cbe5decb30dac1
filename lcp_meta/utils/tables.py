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


def escape_latex(cell: str) -> str:
    """One cell as LaTeX text: specials escaped, ``**x**`` as ``\\textbf{x}``."""
    parts = re.split(r"\*\*(.+?)\*\*", cell.replace("+-", "±"))  # odd indices were bold; '+-' is our ASCII ±
    out = []
    for k, part in enumerate(parts):
        text = "".join(_ESCAPES.get(ch, ch) for ch in part)
        out.append(r"\textbf{" + text + "}" if k % 2 else text)
    return "".join(out)


def _numeric(cell: str) -> bool:
    """A cell that reads as a number (possibly ``mean ± ci``, a ratio ``a/b``, a sign or a percent): right-aligned."""
    core = cell.replace("**", "").replace("+-", " ").replace("±", " ").replace("/", " ").replace("%", " ").split()
    return bool(core) and all(_NUMBER.fullmatch(t) or t in ("-", "n/a", "nan") for t in core)


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
             " & ".join(escape_latex(c) for c in head) + r" \\", r"\midrule"]
    body += [" & ".join(escape_latex(c) for c in row) + r" \\" for row in rows]
    body += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(body) + "\n"
