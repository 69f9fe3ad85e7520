"""Shared by the benchmark scripts: markdown tables and writing a result file."""
from __future__ import annotations

from pathlib import Path


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(path: Path, text: str) -> None:
    """Write a result table (creating bench/results/) headed by the command and git commit that
    produced it, and show it."""
    from workers.report import result_header

    path.parent.mkdir(parents=True, exist_ok=True)
    text = result_header() + "\n" + text
    path.write_text(text)
    print(text, flush=True)
