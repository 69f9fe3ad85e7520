"""Results as people read them: a table per policy and task, parquet rows, a score/retention plot."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from namm_core.files import atomic_path, text_config


def write_parquet_atomic(rows: list[dict], path) -> Path:
    # every key of every row becomes a column (pyarrow takes the columns from the first row alone)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), tmp)
    return Path(path)


def namm_matched_budget(model, namm_rows: list[dict]) -> tuple[float, float]:
    """(the NAMM's mean retention on full-attention layers, the baseline budget that matches it).

    Sliding-window layers (Gemma 3: five of every six) evict by their window under every
    policy alike, so only the full-attention layers say how much a policy chose to keep.
    """
    config = text_config(model)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    retention = _mean([_mean([r["retention_per_layer"][i] for i in full]) for r in namm_rows])
    return retention, max(min(round(retention, 3), 1.0), 0.001)


BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def summarize(rows: list[dict], seed: int = 0) -> tuple[list[str], list[dict]]:
    """Per policy: mean score per task, mean over tasks with a bootstrap 95% interval, the
    number of prompts, mean retention, peak KV, seconds."""
    tasks = sorted({r["task"] for r in rows})
    by_policy: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_policy[r["policy"]].append(r)
    summary = []
    for policy, rs in by_policy.items():
        per_task = {t: _mean([r["score"] for r in rs if r["task"] == t]) for t in tasks}
        lo, hi = bootstrap_interval(rs, seed=seed)
        summary.append({
            "policy": policy, **per_task, "mean": _mean(list(per_task.values())), "ci_low": lo, "ci_high": hi,
            "prompts": len(rs), "retention": _mean([r["retention"] for r in rs]),
            "peak_kv_mib": max(r["peak_kv_bytes"] for r in rs) / 2**20,
            "seconds": sum(r["seconds"] for r in rs),
        })
    return tasks, summary


def bootstrap_interval(rows: list[dict], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over tasks of the per-task mean score,
    resampling prompts within each task (each task keeps its number of prompts)."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(float(r["score"]))
    return _interval(_resampled_means(by_task, resamples, seed))


def _resampled_means(by_task: dict[str, list[float]], resamples: int, seed: int):
    """[resamples] mean over tasks of each task's mean, its values drawn with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for values in by_task.values():
        x = np.asarray(values)
        means += x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return means / max(1, len(by_task))


def _interval(samples) -> tuple[float, float]:
    import numpy as np

    alpha = (1 - CONFIDENCE) / 2
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))


def paired_difference(rows: list[dict], policy: str, other: str, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
    """Mean-over-tasks score of `policy` minus `other` on the prompts both ran, with a paired
    bootstrap 95% interval (the same resampled prompts for both). Verdict: 'better' or 'worse'
    when the interval excludes 0, else 'tie'."""
    import numpy as np

    score = {(r["policy"], r["sample_id"]): float(r["score"]) for r in rows}
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["policy"] == policy and (other, r["sample_id"]) in score:
            by_task[r["task"]].append(score[(policy, r["sample_id"])] - score[(other, r["sample_id"])])
    if not by_task:
        raise ValueError(f"{policy} and {other} share no prompts")
    lo, hi = _interval(_resampled_means(by_task, resamples, seed))
    mean = float(np.mean([np.mean(v) for v in by_task.values()]))
    verdict = "better" if lo > 0 else ("worse" if hi < 0 else "tie")
    return {"policy": policy, "other": other, "difference": mean, "ci_low": lo, "ci_high": hi,
            "prompts": sum(len(v) for v in by_task.values()), "verdict": verdict}


def format_table(rows: list[dict], markdown: bool = False) -> str:
    tasks, summary = summarize(rows)
    header = ["policy", *tasks, "mean", "95% CI", "prompts", "retention", "peak KV MiB", "seconds"]
    body = [[s["policy"], *[f"{s[t]:.3f}" for t in tasks], f"{s['mean']:.3f}",
             f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]", str(s["prompts"]), f"{s['retention']:.3f}",
             f"{s['peak_kv_mib']:.1f}", f"{s['seconds']:.1f}"] for s in summary]
    return _render(header, body, markdown)


def format_comparisons(rows: list[dict], policy: str, markdown: bool = False) -> str:
    """`policy` against every other policy, paired on the same prompts (see paired_difference)."""
    others = [p for p in dict.fromkeys(r["policy"] for r in rows) if p != policy]
    header = ["policy", "vs", "difference", "95% CI", "prompts", "verdict"]
    body = []
    for other in others:
        d = paired_difference(rows, policy, other)
        body.append([policy, other, f"{d['difference']:+.3f}", f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                     str(d["prompts"]), d["verdict"]])
    return _render(header, body, markdown)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        return markdown_table(header, body)
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def result_header(argv: Optional[list[str]] = None) -> str:
    """The exact command and git commit that produced a result file (first lines of every bench/ result)."""
    import shlex
    import subprocess
    import sys

    argv = sys.argv if argv is None else argv
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout.splitlines()
        # results being written (a board's parquet between commits) are data, not the code that ran
        dirty = [line for line in status if not line[3:].startswith("bench/results/")]
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    script = Path(argv[0])
    if script.is_absolute() and script.is_relative_to(root):
        script = script.relative_to(root)
    command = " ".join(shlex.quote(a) for a in [str(script), *argv[1:]])
    return (f"Command: `{command}`  \nCommit: `{commit}`{' (with uncommitted changes)' if dirty else ''}  \n"
            f"Machine: {machine_description()}\n")


# CPU instruction sets that decide how fast bf16 matmuls and attention run
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_description() -> str:
    """What a timing depends on: the CPU (model, cores, its bf16 instructions), the GPU if any, torch.
    The ratio of a memory's cost to the full cache's changes with these (docs/memory.md)."""
    import os
    import platform

    import torch

    try:   # a result is written at the end of a long run: describing the machine must not fail it
        try:
            model, flags = cpu_from_cpuinfo(Path("/proc/cpuinfo").read_text())
        except OSError:
            model, flags = "", set()
        model = model or platform.processor() or platform.machine()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        listed = [f for f in _CPU_FLAGS if f in flags]
        text = (f"{model}, {cpus} CPUs ({', '.join(listed) if listed else 'flags unknown'}), "
                f"{torch.get_num_threads()} torch threads")
        if torch.cuda.is_available():
            # the name only where CUDA is already up: asking for it would start a context here
            name = torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else "not initialised"
            text += f", {torch.cuda.device_count()} CUDA device(s) ({name})"
        return text + f", torch {torch.__version__}"
    except Exception as error:   # noqa: BLE001
        return f"unknown ({type(error).__name__}: {error})"


def cpu_from_cpuinfo(text: str) -> tuple[str, set]:
    """(model name, instruction flags) of the first processor in /proc/cpuinfo's text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def _plot_family(policy: str) -> str:
    """The curve a policy belongs to: its kind and options without the budget; each NAMM
    directory its own."""
    if policy.startswith("namm:"):
        return "namm " + Path(policy[len("namm:"):].rpartition("@")[0] or policy[len("namm:"):]).name
    if policy.startswith("fastgen"):
        return "fastgen"
    return without_budget(policy).split("@")[0]


def without_budget(policy: str) -> str:
    """'tova:0.5/global/pool=15' -> 'tova/global/pool=15': a policy's name and options."""
    head, *options = policy.split("/")
    return "/".join([head.split(":")[0], *options])


def plot_score_vs_retention(rows: list[dict], path, title: str = "") -> Path:
    """One point per policy (mean score over tasks vs mean retention); baselines of one kind joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, summary = summarize(rows)
    families: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for s in summary:
        family = _plot_family(s["policy"])
        families[family].append((s["retention"], s["mean"], s["policy"], s["ci_low"], s["ci_high"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, points in sorted(families.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        err = [[p[1] - p[3] for p in points], [p[4] - p[1] for p in points]]
        marker = "*" if family.startswith("namm") else ("s" if family == "full" else "o")
        ax.errorbar(xs, ys, yerr=err, marker=marker, markersize=12 if marker == "*" else 6, label=family,
                    linestyle="-" if len(points) > 1 else "none", capsize=3, elinewidth=1)
    ax.set_xlabel("mean cache retention (kept / seen)")
    ax.set_ylabel("mean score over tasks (bars: bootstrap 95% interval)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
