"""The NAMMs shipped with the project, as package data, so an installed wheel carries them.

Each subdirectory is a saved NAMM (`namm.safetensors` + `namm_config.json`, its model card and the
evolution config it was evolved with). `shipped_namm("smollm2")` finds one wherever the package is
installed; `namm:smollm2-warm-start` in a policy spec does the same.
"""
from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
DEFAULT = "smollm2"   # evolved on the embedded default model; what `namm` alone loads


def names() -> list[str]:
    return sorted(p.name for p in DIRECTORY.iterdir() if (p / "namm_config.json").is_file())


def shipped_namm(name: str = DEFAULT) -> Path:
    path = DIRECTORY / name
    if not (path / "namm_config.json").is_file():
        raise ValueError(f"no shipped NAMM named {name!r}; shipped: {', '.join(names())}")
    return path
