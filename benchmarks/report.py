"""What the benchmarks print and write: the run's header, GitHub-markdown tables (readable in a
terminal too, pasted as they are into benchmarks/README.md), MLX-relative ratios, the JSON file.

Pure Python: nothing here measures or imports a framework.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

REFERENCE_SIDE = "mlx"  # the side every ratio is relative to


def header(script: str, machine: dict, threads: int | None = None) -> str:
    """The first lines of every run: the machine, the command as typed, the date."""
    pinned = f"  (threads pinned to {threads})" if threads else ""
    return "\n".join([
        f"machine: {json.dumps(machine)}",
        f"command: python -m {script} {' '.join(sys.argv[1:])}{pinned}",
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ])


def fmt(value, digits: int = 2, unit: str = "") -> str:
    """A number with ``digits`` decimals; ``-`` for a missing one (None, NaN); strings as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub-markdown table; ``align`` one letter a column (l / r), default: first left, rest right."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                                for w, a in zip(widths, align)) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                       for c, w, a in zip(row, widths, align)) + " |")
    return "\n".join(lines)


def advantage(value: float | None, mlx: float | None, higher_is_better: bool = False) -> float | None:
    """How many times better MLX's ``mlx`` is than another side's ``value`` (> 1: MLX better):
    value / mlx for times, mlx / value for rates. None when either is missing or zero."""
    if not value or not mlx:
        return None
    return mlx / value if higher_is_better else value / mlx


def side_table(sides: list[str], rows: list[tuple], suffix: str = "", extra_headers: list[str] = ()) -> str:
    """One row per quantity, one column per side and, after every side but MLX, its ratio to MLX
    (``x`` + ``advantage``). ``rows``: (label, {side: value}, digits, higher_is_better, extra cells);
    ``suffix`` follows each side's name in its header (e.g. " s")."""
    compared = REFERENCE_SIDE in sides
    headers = ["stage"]
    for side in sides:
        headers.append(f"{side}{suffix}")
        if side != REFERENCE_SIDE and compared:
            headers.append(f"{side}/{REFERENCE_SIDE}")
    body = []
    for label, values, digits, higher_is_better, cells in rows:
        row = [label]
        for side in sides:
            row.append(fmt(values[side], digits))
            if side != REFERENCE_SIDE and compared:
                row.append("x" + fmt(advantage(values[side], values[REFERENCE_SIDE], higher_is_better), 2))
        body.append(row + list(cells))
    return table(headers + list(extra_headers), body)


def write_json(path: str | Path | None, data: dict) -> None:
    """Every measurement of the run into ``path`` (``--json``); nothing without one."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1))
