"""Shared by the benchmark scripts: markdown tables and writing a result file."""
from __future__ import annotations

from pathlib import Path


def markdown_table(header, rows) -> str:
    from namm_eval.report import markdown_table as table

    return table(header, rows)


def write_result(path: Path, text: str) -> None:
    """Write a result table (creating bench/results/) headed by the command and git commit that
    produced it, and show it."""
    from namm_core.files import write_text_atomic
    from namm_eval.report import result_header

    text = result_header() + "\n" + text
    write_text_atomic(path, text)
    print(text, flush=True)
