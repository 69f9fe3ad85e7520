"""Results as people read them: a table per policy and task, parquet rows, a score/retention plot."""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet_atomic(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def namm_matched_budget(model, namm_rows: list[dict]) -> tuple[float, float]:
    """(the NAMM's mean retention on full-attention layers, the baseline budget that matches it).

    Sliding-window layers (Gemma 3: five of every six) evict by their window under every
    policy alike, so only the full-attention layers say how much a policy chose to keep.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    retention = _mean([_mean([r["retention_per_layer"][i] for i in full]) for r in namm_rows])
    return retention, max(min(round(retention, 3), 1.0), 0.001)


def summarize(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Per policy: mean score per task, mean over tasks, mean retention, peak KV, seconds."""
    tasks = sorted({r["task"] for r in rows})
    by_policy: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_policy[r["policy"]].append(r)
    summary = []
    for policy, rs in by_policy.items():
        per_task = {t: _mean([r["score"] for r in rs if r["task"] == t]) for t in tasks}
        summary.append({
            "policy": policy, **per_task, "mean": _mean(list(per_task.values())),
            "retention": _mean([r["retention"] for r in rs]),
            "peak_kv_mib": max(r["peak_kv_bytes"] for r in rs) / 2**20,
            "seconds": sum(r["seconds"] for r in rs),
        })
    return tasks, summary


def format_table(rows: list[dict], markdown: bool = False) -> str:
    tasks, summary = summarize(rows)
    header = ["policy", *tasks, "mean", "retention", "peak KV MiB", "seconds"]
    body = [[s["policy"], *[f"{s[t]:.3f}" for t in tasks], f"{s['mean']:.3f}", f"{s['retention']:.3f}",
             f"{s['peak_kv_mib']:.1f}", f"{s['seconds']:.1f}"] for s in summary]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])


def plot_score_vs_retention(rows: list[dict], path, title: str = "") -> Path:
    """One point per policy (mean score over tasks vs mean retention); baselines of one kind joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, summary = summarize(rows)
    families: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for s in summary:
        families[s["policy"].split(":")[0]].append((s["retention"], s["mean"], s["policy"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family, points in sorted(families.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        marker = "*" if family == "namm" else ("s" if family == "full" else "o")
        ax.plot(xs, ys, marker=marker, markersize=12 if marker == "*" else 6, label=family,
                linestyle="-" if len(points) > 1 else "none")
    ax.set_xlabel("mean cache retention (kept / seen)")
    ax.set_ylabel("mean score over tasks")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
