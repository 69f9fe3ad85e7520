"""The board: a NAMM against the full cache and every other memory at equal cache size, on held-out prompts.

Each cell is a model, a prompt length, one or more budgets, a number of prompts per task and a
protocol (when the memory runs, namm_eval.evaluator.PROTOCOLS):

    bash scripts/board.sh                                    # the default board (hours on 2 CPU cores; resumable)
    .venv/bin/python bench/namm_board.py --cell smollm2:1024:0.5:4             # a small one
    .venv/bin/python bench/namm_board.py --cell smollm2:1024:0.5,0.25:24:agnostic   # kvpress's protocol

For every cell: the full cache, then for every budget B the NAMM keeping exactly B of the cache
(`namm@B`), every --also NAMM, every --baselines policy at B and, in the chunked protocol, every
--controls scorer run inside the NAMM's own structure (e.g. `tova:B/global/pool=15/sinks=4`:
the NAMM's one model-wide kept set, span pooling and sinks, with a hand-designed score), all on
the same prompts. FastGen has no budget to match (its retention follows from its threshold
T = 0.85): it runs once per chunked cell with its own retention. A NAMM saved with the score >= 0
rule (no budget) runs as saved and the baselines get its measured retention instead.

Protocols: `chunked` (default) evicts every `update_every` tokens while the prompt is read in
chunks; `agnostic` compresses once after a dense read of the context, before the question, and
`aware` once after the whole prompt (kvpress's query-agnostic and query-aware settings). In the
one-shot protocols the peak KV is the full cache's: the table's peak column says so.

Tasks the NAMM was trained on are read from the run config beside it (`evolve.yaml`); the summary
gives every mean over all tasks, without passkey, and over the tasks it never trained on. Every
mean has a bootstrap 95% interval over prompts (stratified by task), and the NAMM is compared
with every other policy paired on the same prompts: a difference whose interval holds 0 is a tie.

The plan (seed, tasks, cells, policies) is written into the result file before the first row is
computed. The work is shared by --workers processes (one model each). Rows are written to the
parquet file as they finish and reused when the same board runs again: a stored row stands for
a new one when model, length, weights dtype, memory settings, protocol, kind of evaluation, the
evaluation code's version (EVAL_VERSION), the policy and its fingerprint (every hyperparameter;
a NAMM's weights) all match.

Writes bench/results/<name>.md, <name>.parquet and <name>_<model>_<length>_<budget>[_<protocol>].png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from namm_core import NAMM, budgeted_baselines, load_model, parse_policy  # noqa: E402
from namm_core.files import text_config, write_text_atomic  # noqa: E402
from namm_core.models import cpu_has_bf16  # noqa: E402
from namm_core.namm import FIELDS_ADDED_LATER as NAMM_FIELDS_ADDED_LATER  # noqa: E402
from namm_core.policies import Budget  # noqa: E402
from namm_eval import report  # noqa: E402
from namm_eval.evaluator import EVAL_VERSION, PROTOCOLS, Evaluator  # noqa: E402
from namm_eval.tasks import load_tasks  # noqa: E402

DEFAULT_BASELINES = budgeted_baselines() + ["expected_attention/epsilon=0.01/adakv"]
DEFAULT_CONTROLS = ["h2o", "tova", "snapkv", "l2"]
FASTGEN = "fastgen:0.85"
DEFAULT_CELLS = ["smollm2:1024:0.5,0.25:24", "smollm2:2048:0.5:12", "gemma3-270m:1024:0.5:24"]
SAVE_EVERY = 8      # rows between parquet writes (and after every batch of policies)


@dataclass
class Cell:
    model: str
    length: int
    budgets: list[str]
    prompts: int
    protocol: str = "chunked"

    @staticmethod
    def parse(text: str) -> "Cell":
        try:
            model, length, budgets, prompts, *rest = text.split(":")
            protocol = rest[0] if rest else "chunked"
            if len(rest) > 1 or protocol not in PROTOCOLS:
                raise ValueError(f"the protocol is one of {', '.join(PROTOCOLS)}")
            return Cell(model, int(length), [str(Budget.parse(b)) for b in budgets.split(",")], int(prompts), protocol)
        except ValueError as e:
            raise SystemExit(f"--cell {text!r}: expected MODEL:LENGTH:B1[,B2...]:PROMPTS_PER_TASK[:PROTOCOL] ({e})") from None

    @property
    def title(self) -> str:
        protocol = "" if self.protocol == "chunked" else f", {self.protocol}"
        return f"{self.model} {self.length}{protocol}"


def fingerprint(policy) -> str:
    """What must match for a stored row to stand for this policy: a NAMM's weights and config, or
    every hyperparameter of any other policy."""
    digest = hashlib.sha256()
    if isinstance(policy, NAMM):
        for tensor in (policy.get_params(), policy.norm_mean, policy.norm_var):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        config = {k: v for k, v in policy.config.to_dict().items() if k != "weights_sha256"}
        for name, default in NAMM_FIELDS_ADDED_LATER.items():   # at their default, older rows still match
            if config.get(name, default) == default:
                config.pop(name, None)
    else:
        config = policy.hyperparameters()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def at_budget(spec: str, budget: str) -> str:
    """'tova/global' at 0.5 -> 'tova:0.5/global'."""
    name, *options = spec.split("/")
    return "/".join([f"{name}:{budget}", *options])


def structure_options(namm: NAMM) -> str:
    """The NAMM's own structure as spec options (what a control scorer runs inside)."""
    c = namm.config
    return "".join([f"/{c.scope}" if c.scope != "head" else "", f"/pool={c.pool}" if c.pool > 1 else "",
                    f"/sinks={c.sinks}" if c.sinks else ""])


def trained_tasks(namm_dir: Path) -> set[str] | None:
    """The tasks of the evolution run recorded beside a NAMM (its `evolve.yaml`), if any."""
    config = namm_dir / "evolve.yaml"
    if not config.is_file():
        return None
    import yaml

    stages = (yaml.safe_load(config.read_text()) or {}).get("stages") or []
    return {t["task"] for stage in stages for t in stage.get("tasks", []) if isinstance(t, dict) and "task" in t}


# --- one worker: a model, the cell's prompts and an Evaluator --------------------------------
_WORKER: dict = {}


def start_worker(model_name: str, dtype: str, threads: int, tasks: list[str], prompts: int, length: int, seed: int,
                 update_every: int, chunk_size: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model, tok = load_model(model_name, dtype=dtype)
    _WORKER["samples"] = load_tasks(tasks, tok, prompts, length, seed)
    _WORKER["evaluator"] = Evaluator(model, tok, update_every=update_every, chunk_size=chunk_size)


def evaluate(policy_blob: bytes, sample_index: int, kind: str = "score", protocol: str = "chunked") -> dict:
    """One prompt under one policy: the task score of the decoded reply ("score") or the
    teacher-forced log-likelihood of the reference answer ("loglik")."""
    # policies travel as plain pickles (no shared-memory tensors per task), unpickled once per worker
    policies = _WORKER.setdefault("policies", {})
    if policy_blob not in policies:
        policies[policy_blob] = pickle.loads(policy_blob)
    sample, evaluator = _WORKER["samples"][sample_index], _WORKER["evaluator"]
    if kind == "loglik":
        return evaluator.run_loglik(sample, policies[policy_blob], protocol=protocol).to_row()
    return evaluator.run_sample(sample, policies[policy_blob], protocol=protocol).to_row()


class _Deferred:
    """A future of --workers 1: runs when its result is asked for, so rows are saved as they come."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)

    def cancel(self):
        return True


class InProcess:
    """The executor of --workers 1: the same worker functions, in this process."""

    def __init__(self, initializer, initargs):
        initializer(*initargs)

    def submit(self, fn, *args):
        return _Deferred(fn, args)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False):
        pass


class CellRunner:
    """Evaluates policies on one cell's prompts with a pool of workers; resumes from and saves to the parquet.

    A stored row stands for a new one when model, length, weights dtype, memory settings (update
    interval, chunk size), protocol, evaluation version, kind of evaluation, policy and fingerprint
    are all the same."""

    def __init__(self, cell: Cell, args, update_every: int, chunk_size: int, rows: list[dict], parquet: Path):
        self.cell, self.args, self.rows, self.parquet = cell, args, rows, parquet
        self.settings = {"model": cell.model, "context_length": cell.length, "dtype": args.dtype,
                         "update_every": update_every, "chunk_size": chunk_size, "protocol": cell.protocol,
                         "eval_version": EVAL_VERSION}
        tasks = args.tasks.split(",")
        initargs = (cell.model, args.dtype, args.threads, tasks, cell.prompts, cell.length, args.seed,
                    update_every, chunk_size)
        if args.workers == 1:
            self.pool = InProcess(start_worker, initargs)
            self.sample_ids, self.model_config = _cell_facts()
        else:
            import multiprocessing

            self.pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=start_worker, initargs=initargs)
            self.sample_ids, self.model_config = self.pool.submit(_cell_facts).result()
        self.index = {self.key(r.get("kind") or "score", r["policy"], r.get("fingerprint") or "", r["sample_id"]): r
                      for r in rows if all(r.get(k) == v for k, v in self.settings.items())}

    @staticmethod
    def key(kind: str, policy_name: str, print_: str, sample_id: str) -> tuple:
        return kind, policy_name, print_, sample_id

    def run(self, policies: list, bar: tqdm, kind: str = "score") -> list[list[dict]]:
        """Every policy on every prompt; returns each policy's rows in prompt order."""
        prints = [fingerprint(p) for p in policies]
        futures, submitted = {}, set()
        for policy, print_ in zip(policies, prints):
            blob = pickle.dumps(policy)
            for i, sample_id in enumerate(self.sample_ids):
                key = self.key(kind, policy.describe(), print_, sample_id)
                if key in self.index or key in submitted:   # stored, or the same policy twice in a batch
                    bar.update(1)
                    continue
                submitted.add(key)
                futures[self.pool.submit(evaluate, blob, i, kind, self.cell.protocol)] = print_
        unsaved = 0
        try:
            done = as_completed(futures) if isinstance(self.pool, ProcessPoolExecutor) else list(futures)
            for future in done:
                row = dict(future.result(), **self.settings, seed=self.args.seed, fingerprint=futures[future], kind=kind)
                self.rows.append(row)
                self.index[self.key(kind, row["policy"], row["fingerprint"], row["sample_id"])] = row
                bar.update(1)
                bar.set_postfix_str(f"{row['policy']} {row['task']} {row['score']:.2f}")
                unsaved += 1
                if unsaved >= SAVE_EVERY:
                    report.write_parquet_atomic(self.rows, self.parquet)
                    unsaved = 0
        finally:   # an error or Ctrl-C: keep what finished, drop the queue instead of running it
            report.write_parquet_atomic(self.rows, self.parquet)
            if any(not f.done() for f in futures if hasattr(f, "done")):
                self.pool.shutdown(wait=False, cancel_futures=True)
        return [[self.index[self.key(kind, p.describe(), f, s)] for s in self.sample_ids]
                for p, f in zip(policies, prints)]

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _cell_facts() -> tuple[list[str], object]:
    """The prompts' ids and the model's text config (which layers attend to everything), from a worker."""
    return [s.sample_id for s in _WORKER["samples"]], text_config(_WORKER["evaluator"].model)


def cell_policies(cell: Cell, namm: NAMM, others: list[NAMM], baselines: list[str], controls: list[str],
                  budget: str) -> list:
    """The NAMM at `budget`, then every other NAMM, baseline and (chunked protocol) structure control."""
    specs = [at_budget(b, budget) for b in baselines]
    if cell.protocol == "chunked":
        specs += [at_budget(c, budget) + structure_options(namm) for c in controls]
    return [namm.with_budget(budget)] + [o.with_budget(budget) for o in others] + [parse_policy(s) for s in specs]


def run_cell(cell: Cell, runner: CellRunner, namm: NAMM, others: list[NAMM], baselines: list[str], controls: list[str],
             fastgen: bool = True):
    """Returns ({budget: (the NAMM as run, the section's rows)}, full rows, FastGen rows, prompts)."""
    n = len(runner.sample_ids)
    fixed = [parse_policy("full")] + ([parse_policy(FASTGEN)] if fastgen and cell.protocol == "chunked" else [])
    # a score >= 0 NAMM keeps what it keeps: one section, the baselines at its measured retention
    as_saved = namm.config.budget is None and namm.config.selection == "threshold"
    per_budget = {b: cell_policies(cell, namm, others, baselines, controls, b)
                  for b in (cell.budgets[:1] if as_saved else cell.budgets)}
    total = n * (len(fixed) + sum(len(p) for p in per_budget.values()))
    with tqdm(total=total, desc=cell.title, unit="prompt") as bar:
        if as_saved:
            results = runner.run(fixed + [namm], bar)
            _, matched = report.namm_matched_budget(runner.model_config, results[-1])
            budget = str(matched)
            rest = cell_policies(cell, namm, others, baselines, controls, budget)[1:]
            per_budget = {budget: [namm] + rest}
            results = results[:-1] + [results[-1]] + runner.run(rest, bar)
        else:
            results = runner.run(fixed + sum(per_budget.values(), []), bar)   # one batch: no worker waits
    parts, at = {}, len(fixed)
    for budget, policies in per_budget.items():
        parts[budget] = (policies[0], sum(results[at:at + len(policies)], []))
        at += len(policies)
    return parts, results[0], results[1] if len(fixed) > 1 else [], n


def namm_at_b(namm: NAMM) -> str:
    """`source@B` and the NAMM's options (`/layers=6`), as the plan names it."""
    return namm.with_budget("0.5").describe().removeprefix("namm:").replace("@0.5", "@B", 1)


def split_variants(text: str) -> list[str]:
    """`layers=6,layers=5,12,28` -> ['layers=6', 'layers=5,12,28']: a part without `=` continues
    the option before it (a list of layer indices)."""
    variants: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part and variants:
            variants[-1] += "," + part
        else:
            variants.append(part)
    return variants


def variant(namm: NAMM, option: str) -> NAMM:
    """The NAMM with one option of its policy spec (`layers=6`), under its own source name."""
    parsed = parse_policy(f"namm@0.5/{option}").config
    return namm.scoring_from(parsed.score_layers).with_bam_window(parsed.bam_window, parsed.bam_window_keys) \
        .reading_rows(parsed.observe_rows).observing_in(parsed.observe_dtype)


def family(label: str) -> str:
    """A policy's name and options without its budget (FastGen keeps its threshold): one row of the summary."""
    if label.startswith("namm:") or label == "namm":
        return re.sub(r"@[0-9.]+(?=/|$)", "", label)
    if label.startswith("fastgen") or ":" not in label:
        return label
    return report.without_budget(label)


def task_groups(tasks: list[str], trained: set[str] | None) -> list[tuple[str, set[str]]]:
    """(label, tasks) of each mean the summary gives."""
    groups = [("all tasks", set(tasks))]
    if "passkey" in tasks and len(tasks) > 1:
        groups.append(("without passkey", set(tasks) - {"passkey"}))
    if trained is not None:
        unseen = set(tasks) - trained
        if unseen and unseen != set(tasks):
            groups.append((f"tasks it never trained on ({', '.join(sorted(unseen))})", unseen))
    return groups


def summary(sections: list[tuple[str, str, list[dict]]], groups: list[tuple[str, set[str]]]) -> str:
    """Every section side by side, per task group: each policy's mean [95% interval], then the
    NAMM against each policy."""
    out = ["### All sections\n"]
    for label, tasks in groups:
        kept = [(title, namm_label, [r for r in rows if r["task"] in tasks]) for title, namm_label, rows in sections]
        names = list(dict.fromkeys(family(r["policy"]) for _, _, rows in kept for r in rows))
        cells = {}
        for title, namm_label, rows in kept:
            for s in report.summarize(rows)[1]:
                cells[(family(s["policy"]), title)] = f"{s['mean']:.3f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
            for other in dict.fromkeys(r["policy"] for r in rows):
                if other != namm_label:
                    d = report.paired_difference(rows, namm_label, other)
                    cells[("vs", family(other), title)] = (f"{d['verdict']} ({d['difference']:+.3f} "
                                                           f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}])")
        titles = [t for t, _, _ in kept]
        means = [[n, *[cells.get((n, t), "") for t in titles]] for n in names]
        namm_name = family(kept[0][1])
        verdicts = [[n, *[cells.get(("vs", n, t), "") for t in titles]] for n in names if n != namm_name]
        out.append(f"#### Mean over {label}\n\n" + report.markdown_table(["policy", *titles], means)
                   + f"\n\n{namm_name} against each policy, paired on the same prompts (tie: the interval holds 0):\n\n"
                   + report.markdown_table(["policy", *titles], verdicts) + "\n")
    return "\n".join(out)


def plan(args, cells: list[Cell], namm: NAMM, others: list[NAMM], trained: set[str] | None) -> str:
    """What the board will run, written before the first row is computed."""
    tasks = args.tasks.split(",")
    label = lambda t: t if trained is None else f"{t} ({'trained on' if t in trained else 'never trained on'})"  # noqa: E731
    controls = ", ".join(f"`{at_budget(c, 'B')}{structure_options(namm)}`" for c in args.controls) or "none"
    return (f"Plan: seed {args.seed}; tasks {', '.join(label(t) for t in tasks)}; cells "
            + ", ".join(f"`{c.model}:{c.length}:{','.join(c.budgets)}:{c.prompts}:{c.protocol}`" for c in cells)
            + f". Policies at each budget B: `{namm_at_b(namm)}`"
            + "".join(f", `{namm_at_b(o)}`" for o in others)
            + "".join(f", `{at_budget(b, 'B')}`" for b in args.baselines)
            + f"; in the chunked protocol also hand-designed scorers in the NAMM's own structure: {controls}"
            + (f", and `{FASTGEN}`" if getattr(args, "fastgen", True) else "")
            + f". Evaluation version {EVAL_VERSION}.\n\n")


def cell_section(cell: Cell, budget: str, budgeted, table_rows: list[dict], n: int, args, update_every: int) -> str:
    """One cell at one budget: its table, the paired comparisons and a plot of score vs retention."""
    protocol = "" if cell.protocol == "chunked" else f", {cell.protocol}"
    title = f"{cell.model}, {cell.length} tokens, budget {budget}{protocol}, {n} held-out prompts"
    suffix = "" if cell.protocol == "chunked" else f"_{cell.protocol}"
    plot = args.out_dir / f"{args.name}_{cell.model}_{cell.length}_{budget}{suffix}.png"
    report.plot_score_vs_retention(table_rows, plot, title=title)
    when = (f"updates every {update_every} tokens" if cell.protocol == "chunked" else
            "one compression after a dense read of the "
            + ("context, before the question" if cell.protocol == "agnostic" else "whole prompt, question included")
            + "; the peak KV is the full cache's")
    return (f"### {cell.model}, {cell.length} tokens, {budget} of the cache, {cell.protocol} protocol "
            f"({cell.prompts} prompts per task, seed {args.seed}; {when})\n\n"
            + report.format_table(table_rows, markdown=True) + "\n\n"
            + f"{budgeted.describe()} against each policy, paired on the same prompts:\n\n"
            + report.format_comparisons(table_rows, budgeted.describe(), markdown=True)
            + f"\n\n![{title}]({plot.name})\n")


def parse_args(argv=None) -> argparse.Namespace:
    """The board's arguments, with defaults resolved for this machine; bad specs fail here, before any model loads."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namm", type=Path, default=ROOT / "namms" / "smollm2", help="the NAMM directory")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another NAMM directory run at the same budgets (e.g. the warm start the NAMM was evolved "
                        "from); repeatable")
    p.add_argument("--namm-variants", default="",
                   help="the NAMM run again with these options, comma-separated NAME=VALUE (e.g. layers=6: it scores "
                        "from six layers evenly spaced; layers=6,layers=5,12,28: also from layers 5, 12 and 28; "
                        "window=256: its BAM attends to the 256 newest tokens; window=256/keys=band: to the 255 right "
                        "after each token), each at every budget and compared with the NAMM")
    p.add_argument("--cell", action="append", help="MODEL:LENGTH:BUDGETS:PROMPTS[:PROTOCOL], repeatable; PROTOCOL is "
                   f"one of {', '.join(PROTOCOLS)} (default chunked). Default cells: {DEFAULT_CELLS}")
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey,qa")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help="policy specs without a budget, each run at every budget (e.g. snapkv/window=64,kvzip)")
    p.add_argument("--controls", default=",".join(DEFAULT_CONTROLS),
                   help="scorers also run inside the NAMM's own structure (its scope, pooling and sinks), in chunked "
                        "cells; empty for none")
    p.add_argument("--no-fastgen", dest="fastgen", action="store_false",
                   help=f"leave out {FASTGEN} (it keeps what its rule needs, not the budget): for a board that "
                        "compares NAMM variants")
    p.add_argument("--seed", type=int, default=7, help="prompt seed (evolution uses seed 0 and its validation seed)")
    p.add_argument("--update-every", type=int, default=None, help="default: the NAMM's recorded interval")
    p.add_argument("--chunk-size", type=int, default=None, help="default: the NAMM's recorded chunk size")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one model each (default: 1 on a GPU, else up to 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPUs / workers)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="model weights (default: bfloat16 where the CPU has bf16 instructions or on CUDA, else "
                        "float32); every policy of a board uses the same")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="namm_board", help="file name stem of the results")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.workers is None:
        args.workers = 1 if cuda else min(2, os.cpu_count() or 1)
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit("--workers and --threads must be at least 1")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.dtype is None:
        args.dtype = "bfloat16" if cpu_has_bf16() or cuda else "float32"
    args.namm_variants = split_variants(args.namm_variants)
    for v in args.namm_variants:
        try:
            parse_policy(f"namm@0.5/{v}")
        except ValueError as e:
            raise SystemExit(f"--namm-variants: {e}") from None
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    args.controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    for spec in args.baselines + args.controls:   # bad specs fail before any model loads
        try:
            parse_policy(at_budget(spec, "0.5"))
        except ValueError as e:
            raise SystemExit(f"--baselines/--controls: {e}") from None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import pyarrow.parquet as pq

    cells = [Cell.parse(c) for c in (args.cell or DEFAULT_CELLS)]

    def load(directory: Path) -> NAMM:
        loaded = NAMM.from_pretrained(directory)
        resolved = directory.resolve()
        loaded.source = str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(directory)
        return loaded

    namm, others = load(args.namm), [load(d) for d in args.also]
    others += [variant(namm, v) for v in args.namm_variants]
    trained = trained_tasks(args.namm)
    label = namm.source
    from namm_core.generation import resolve_memory_settings

    update_every, chunk_size = resolve_memory_settings(namm, update_every=args.update_every,
                                                       chunk_size=args.chunk_size)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    parquet = args.out_dir / f"{args.name}.parquet"
    rows = pq.read_table(parquet).to_pylist() if parquet.exists() else []
    sections, summaries = [], []
    also = "".join(f" Also: `{family(o.describe())}`." for o in others)
    header = report.result_header(None if argv is None else [str(Path(__file__).resolve().relative_to(ROOT)), *argv])
    head = (header + f"\nNAMM: `{label}`.{also} Weights in {args.dtype}; {args.workers} worker "
            f"process(es) x {args.threads} thread(s)."
            + (" FastGen (T = 0.85) keeps what its rule needs; its retention is its own, not the budget."
               if args.fastgen else "") + "\n\n" + plan(args, cells, namm, others, trained))
    markdown = args.out_dir / f"{args.name}.md"
    write_text_atomic(markdown, head + "(no cell finished yet)\n")
    groups = task_groups(args.tasks.split(","), trained)
    for cell in cells:
        runner = CellRunner(cell, args, update_every, chunk_size, rows, parquet)
        try:
            parts, full, fastgen, n = run_cell(cell, runner, namm, others, args.baselines, args.controls,
                                               fastgen=args.fastgen)
        finally:
            runner.close()
        for budget, (budgeted, part) in parts.items():
            table_rows = full + part + fastgen
            sections.append(cell_section(cell, budget, budgeted, table_rows, n, args, update_every))
            summaries.append((f"{cell.title} @{budget}", budgeted.describe(), table_rows))
            write_text_atomic(markdown, head + summary(summaries, groups) + "\n" + "\n".join(sections))
    print(head + summary(summaries, groups) + "\n" + "\n".join(sections), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
