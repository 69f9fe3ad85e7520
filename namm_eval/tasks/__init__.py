"""Task suites: synthetic RULER-style tasks, LongBench-format files, and the fidelity task."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import Sample


def task_names() -> list[str]:
    from .synthetic import TASKS

    return sorted(TASKS) + ["fidelity"]


def load_tasks(specs: list[str], tokenizer, num_prompts: int, context_length: int, seed: int,
               templates_file: Optional[str] = None, metric: Optional[str] = None) -> list[Sample]:
    """Samples for each spec: a synthetic task name, `fidelity`, or a .jsonl/.parquet file
    (LongBench format, or a suite saved by `namm tasks`); at most num_prompts per task (for a
    file holding several datasets: per dataset). `metric` overrides a task file's metric."""
    from .fidelity import fidelity_samples
    from .files import load_task_file
    from .synthetic import TASKS, generate_samples, load_samples

    if num_prompts <= 0:
        raise ValueError(f"--num-prompts must be positive, got {num_prompts}")
    samples: list[Sample] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec in TASKS:
            samples += generate_samples(spec, tokenizer, n=num_prompts, length=context_length, seed=seed)
        elif spec == "fidelity":
            samples += fidelity_samples(tokenizer, n=num_prompts, length=context_length, seed=seed)
        elif spec.endswith((".jsonl", ".json", ".parquet")):
            path = Path(spec)
            if path.suffix == ".parquet" and _is_saved_suite(path):
                samples += _first_per_task(load_samples(path), num_prompts)
            else:
                samples += load_task_file(path, templates_file=templates_file, limit=num_prompts, metric=metric)
        else:
            raise ValueError(f"unknown task {spec!r}: expected one of {task_names()} or a .jsonl/.parquet file")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("two tasks produced the same sample ids: list each task or file once")
    return samples


def split_task_file(path, seed: int, holdout: int, pool_size: int, split: str = "train") -> list[Sample]:
    """Disjoint, seeded training and validation sets from one task file: the records shuffled
    with `seed`, the first `holdout` for validation, the next `pool_size` for training."""
    import random

    from .files import load_task_file

    samples = load_task_file(path)
    if holdout + pool_size > len(samples):
        raise ValueError(f"task file {path}: {pool_size} training + {holdout} validation prompts need "
                         f"{holdout + pool_size} records; it has {len(samples)}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    chosen = order[:holdout] if split == "validation" else order[holdout:holdout + pool_size]
    return [samples[i] for i in chosen]


def _first_per_task(samples: list[Sample], n: int) -> list[Sample]:
    counts: dict[str, int] = {}
    out = []
    for s in samples:
        if counts.get(s.task, 0) < n:
            counts[s.task] = counts.get(s.task, 0) + 1
            out.append(s)
    return out


def _is_saved_suite(path: Path) -> bool:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    names = set(pq.read_schema(path).names)
    return {"sample_id", "metric", "template"} <= names
