"""Plain-text tables and result files shared by the CLI, reports and benchmarks."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence


def format_table(rows: Sequence[Sequence[Any]], header_rule: bool = True) -> str:
    """Left-aligned columns; the first row is the header."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    if header_rule and len(lines) > 1:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: str, payload: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
