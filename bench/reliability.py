"""The reliability table: faults injected into real runs, and bad inputs tried, with what happened.

    .venv/bin/python bench/reliability.py                 # both parts (~20 min on 2 cores)
    .venv/bin/python bench/reliability.py --inputs-only   # the bad inputs alone (about a minute)

Faults: each on the smoke job (a tiny random model, 3 generations), started as users start it
(`namm evolve` in a subprocess with a private local Ray and a sqlite MLflow store), against an
uninterrupted reference run: an actor killed in every generation, the driver SIGKILLed and rerun,
the newest or every checkpoint corrupted, SIGINT and SIGTERM, an unreachable tracking server, two
drivers on one run directory; and on a cluster of three Ray nodes (orchestrator/local_cluster.py),
a worker node crashed mid-generation with a new node joining after it. Checked for each: the exit
code, the message, that every candidate was evaluated, that the CMA mean equals the reference's,
that MLflow steps are contiguous with one value each and that no run is left RUNNING.

Bad inputs: run configs with one field wrong, command-line arguments, policy specs, task and
prompt files, NAMM directories; each must fail before any work with one line naming the problem.
Writes bench/results/reliability.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402

PY = sys.executable


# ---------------------------------------------------------------------------------------- inputs
def _config_cases():
    base = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    cases = [
        ("es.sigma0", float("nan")), ("es.sigma0", float("inf")), ("es.sigma0", -0.1), ("es.population", 3),
        ("es.population", "32"), ("es.elite_ratio", 1.5), ("es.populaton", 8), ("model.dtype", "float33"),
        ("model.device", "tpu"), ("namm.head_dim", 0), ("namm.mlp_hidden", ["a"]), ("namm.stats_prompts", 0),
        ("namm.scorer", "transformer"), ("namm.selection", "top_k"), ("namm.budget", 2.5),
        ("workers.num_actors", 0), ("workers.torch_threads", 0), ("workers.cpus_per_actor", 0),
        ("workers.gpus_per_actor", "many"), ("workers.max_retries", -1), ("memory.update_every", 1.5),
        ("memory.chunk_size", 0), ("memory.shared_prefixes", -1), ("fitness.kind", "accuracy"),
        ("fitness.retention_target", 1.5), ("fitness.loglik_target", "oracle"), ("workers.pool", "threads"),
        ("es.warm_start", {"imitate": "full"}), ("es.warm_start", {"imitate": "tova:0.5", "steps": 0}),
        ("stages", []), ("name", "a/b"), ("modell", {}),
    ]
    for path, value in cases:
        data = copy.deepcopy(base)
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        yield f"config `{path}: {value!r}`", data


def _run_cli(args: list[str], cwd: Path) -> tuple[int, str, float]:
    t = time.perf_counter()
    p = subprocess.run([PY, "-m", "namm_cli", *args], cwd=cwd, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"), timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()] or [ln for ln in p.stdout.splitlines() if ln.strip()]
    return p.returncode, (lines[-1] if lines else ""), time.perf_counter() - t


def bad_inputs(tmp: Path) -> list[tuple]:
    from orchestrator.config import ConfigError, config_from_dict

    rows = []
    for label, data in _config_cases():
        t = time.perf_counter()
        try:
            config_from_dict(data, base_dir=ROOT / "jobs")
            outcome, ok = "accepted", False
        except ConfigError as e:
            outcome, ok = str(e).splitlines()[0], True
        rows.append((label, "refused at load", outcome, f"{time.perf_counter() - t:.2f}", "yes" if ok else "NO"))
    (tmp / "bad.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{oops\n')
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00\x80" * 8)
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "namm_bad").mkdir(exist_ok=True)
    (tmp / "namm_bad" / "namm_config.json").write_text("{not json")
    (tmp / "namm_bad" / "namm.safetensors").write_bytes(b"x")
    (tmp / "plain_file").write_text("")
    cli_cases = [
        ("eval --tasks ''", ["eval", "--tasks", "", "--out", str(tmp / "o.parquet")]),
        ("eval --policy h2o:1.5", ["eval", "--policy", "h2o:1.5", "--out", str(tmp / "o.parquet")]),
        ("eval --policy magic:0.5", ["eval", "--policy", "magic:0.5"]),
        ("eval --policy full:0.5", ["eval", "--policy", "full:0.5"]),
        ("eval --policy h2o", ["eval", "--policy", "h2o"]),
        ("eval --policy namm:/no/such/dir", ["eval", "--policy", "namm:/no/such/dir"]),
        ("eval --policy namm:<corrupt dir>", ["eval", "--policy", f"namm:{tmp / 'namm_bad'}"]),
        ("eval --policy namm@2.5", ["eval", "--policy", "namm@2.5"]),
        ("eval --out <under a file>", ["eval", "--out", str(tmp / "plain_file" / "x.parquet")]),
        ("eval --device cuda (no CUDA here)", ["eval", "--device", "cuda", "--out", str(tmp / "o.parquet")]),
        ("eval --baselines-at-namm-retention without a NAMM", ["eval", "--baselines-at-namm-retention"]),
        ("eval --tasks no_such_task", ["eval", "--model", "tiny-random", "--tasks", "no_such_task"]),
        ("eval --tasks <bad JSON file>", ["eval", "--model", "tiny-random", "--tasks", str(tmp / "bad.jsonl")]),
        ("eval --metric nope", ["eval", "--model", "tiny-random", "--tasks", str(tmp / "bad.jsonl"), "--metric", "nope"]),
        ("generate --prompt ''", ["generate", "--prompt", " "]),
        ("generate --prompt-file <directory>", ["generate", "--prompt-file", str(tmp)]),
        ("generate --prompt-file <binary>", ["generate", "--prompt-file", str(tmp / "binary.txt")]),
        ("generate --prompt-file <empty>", ["generate", "--prompt-file", str(tmp / "empty.txt")]),
        ("generate --prompts-file <bad JSON>", ["generate", "--prompts-file", str(tmp / "bad.jsonl")]),
        ("generate --model no/such-model", ["generate", "--prompt", "hi", "--model", str(tmp / "no-model")]),
        ("evolve <missing config>", ["evolve", str(tmp / "missing.yaml")]),
        ("export <no checkpoint>", ["export", str(tmp), str(tmp / "out")]),
        ("import-official <not a checkpoint>", ["import-official", str(tmp / "binary.txt"), str(tmp / "out")]),
    ]
    for label, args in cli_cases:
        code, message, seconds = _run_cli(args, tmp)
        ok = code == 2 and message.startswith("namm ")
        rows.append((f"`namm {label}`", "exit 2, one line", f"exit {code}: {message}", f"{seconds:.1f}",
                     "yes" if ok else "NO"))
    return rows


# ---------------------------------------------------------------------------------------- faults
def _job(tmp: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data.update(name=name, checkpoint={"root": str(tmp / "runs"), "keep": 5},
                tracking={"tracking_uri": f"sqlite:///{tmp}/mlflow-{name}.db", "experiment": "reliability"})
    data.update(changes)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _evolve(job: Path, *extra, wait=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([PY, "-m", "namm_cli", "evolve", str(job), "--num-cpus", "2", *extra], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = p.communicate(timeout=900)
        return p.returncode, out, err
    return p


def _wait_for(path: Path, proc, seconds=600) -> bool:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    return path.exists()


def _inspect(tmp: Path, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator import checkpoint as ckpt
    from orchestrator.state import EvolutionState

    found = ckpt.load_latest(tmp / "runs" / name / "checkpoints")
    state = EvolutionState.from_payload(found[1]) if found else None
    client = MlflowClient(f"sqlite:///{tmp}/mlflow-{name}.db")
    exp = client.get_experiment_by_name("reliability")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parent = state.mlflow.parent if state else None
    steps = sorted(m.step for m in client.get_metric_history(parent, "fitness_best")) if parent else []
    return {"state": state, "steps": steps, "running": sum(r.info.status == "RUNNING" for r in runs),
            "finite": all(np.isfinite(h["fitness"]) for h in state.history) if state else False}


def faults(tmp: Path) -> list[tuple]:
    """Each fault on its own run of the smoke job, judged against an undisturbed run's CMA mean."""
    _evolve(_job(tmp, "reference"))
    reference = _inspect(tmp, "reference")["state"].es.mean

    def verdict(name, expected_generations=3):
        info = _inspect(tmp, name)
        st = info["state"]
        same = st is not None and st.es is not None and np.array_equal(st.es.mean, reference)
        ok = (st is not None and st.global_generation == expected_generations and same and info["finite"]
              and info["steps"] == list(range(expected_generations)) and info["running"] == 0)
        detail = (f"{st.global_generation if st else 0} generations, steps {info['steps']}, "
                  f"same CMA mean: {same}, runs left RUNNING: {info['running']}")
        return ok, detail

    rows = [_actor_killed(tmp, verdict), _driver_killed(tmp, verdict), _newest_checkpoint_corrupt(tmp, verdict),
            _every_checkpoint_corrupt(tmp, verdict)]
    rows += [_interrupted(tmp, verdict, sig, name) for sig, name in ((signal.SIGINT, "sigint"),
                                                                      (signal.SIGTERM, "sigterm"))]
    return rows + [_tracking_down(tmp), _two_drivers(tmp, verdict), _node_lost(tmp)]


def _node_lost(tmp: Path) -> tuple:
    """A worker node of a three-node cluster (orchestrator/local_cluster.py) crashed while its actor
    evaluates a candidate, a new node joining right after; judged against an undisturbed run of the
    same job on the same cluster (10 generations, so the new node joins while the run goes on)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.local_cluster import LocalCluster

    generations = 10    # the new node joins (~15 s) while the run goes on
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["stages"] = data["stages"][:1]
    data["stages"][0].update(generations=generations, validation_every=generations, prompts_per_task=4)
    with LocalCluster(tmp / "cluster") as cluster:
        cluster.add_node(1)
        victim = cluster.add_node(1)
        env = dict(cluster.env, RAY_ADDRESS=cluster.address, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")

        def start(name):
            path = _job(tmp, name, **{k: v for k, v in data.items() if k not in ("name", "checkpoint", "tracking")})
            return subprocess.Popen([PY, "-m", "namm_cli", "evolve", str(path)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        start("nodes-reference").communicate(timeout=900)
        proc = start("node-lost")
        first = tmp / "runs" / "node-lost" / "checkpoints" / "gen-000001.ckpt"
        crashed = False
        while proc.poll() is None and not crashed:
            if first.exists() and victim.busy_with("evaluate"):
                cluster.crash_node(victim)
                crashed = True
            time.sleep(0.05)
        joined = cluster.add_node(1) if crashed else None
        proc.communicate(timeout=900)
    reference, lost = _inspect(tmp, "nodes-reference")["state"], _inspect(tmp, "node-lost")
    st = lost["state"]
    same = st is not None and np.array_equal(st.es.mean, reference.es.mean)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow-node-lost.db")

    def metric(key):
        if st is None:
            return []
        return [x.value for x in sorted(client.get_metric_history(st.mlflow.parent, key), key=lambda x: x.step)]

    nodes_lost, in_use, failures = metric("nodes_lost"), metric("nodes_in_use"), metric("failures")
    reports = [f.path for f in client.list_artifacts(st.mlflow.parent, "failures")] if st else []
    early = {h["worker_node"] for h in st.history if h["generation"] == 0} if st else set()
    late = {h["worker_node"] for h in st.history if h["generation"] == generations - 1} if st else set()
    ok = (crashed and st is not None and st.global_generation == generations and same and lost["finite"]
          and lost["steps"] == list(range(generations)) and nodes_lost[-1:] == [1.0] and reports
          and in_use[-1:] == [2.0] and len(late - early) == 1 and joined is not None)
    return ("a worker node crashed (raylet and all its processes SIGKILLed) mid-evaluation in generation 2, "
            "a new node joining right after",
            f"{st.global_generation if st else 0} of {generations} generations, every candidate evaluated: "
            f"{lost['finite']}, same CMA mean as the undisturbed run: {same}; MLflow: failures {sum(failures):.0f}, "
            f"nodes_lost {nodes_lost[-1:] and int(nodes_lost[-1])}, failure report {reports[:1]}; nodes in use "
            f"at the end {in_use[-1:] and int(in_use[-1])}, the new node ran the last generation: "
            f"{len(late - early) == 1}", "yes" if ok else "NO")


def _actor_killed(tmp: Path, verdict) -> tuple:
    """An actor SIGKILLed while it evaluates a candidate, once per generation."""
    import psutil

    proc = _evolve(_job(tmp, "actor-kill"), wait=False)
    killed, seen = 0, set()
    while proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                title = " ".join(child.cmdline())   # Ray names a busy worker ray::<Class>.<method>
                if "ray::" in title and ".evaluate" in title and child.pid not in seen:
                    ckpts = list((tmp / "runs" / "actor-kill" / "checkpoints").glob("gen-*.ckpt"))
                    if len(ckpts) > killed:          # one kill per generation
                        seen.add(child.pid)
                        child.kill()
                        killed += 1
            except psutil.Error:
                pass
        time.sleep(0.3)
    ok, detail = verdict("actor-kill")
    return ("an evolution actor SIGKILLed mid-evaluation, once per generation", f"{killed} kills; {detail}",
            "yes" if ok and killed >= 2 else "NO")


def _driver_killed(tmp: Path, verdict) -> tuple:
    """The driver SIGKILLed after its first generation, then the same command again."""
    job = _job(tmp, "driver-kill")
    proc = _evolve(job, wait=False)
    _wait_for(tmp / "runs" / "driver-kill" / "checkpoints" / "gen-000001.ckpt", proc)
    proc.kill()
    proc.wait()
    code, _, _ = _evolve(job)
    ok, detail = verdict("driver-kill")
    return ("the driver SIGKILLed after generation 1, rerun", f"exit {code}; {detail}", "yes" if ok else "NO")


def _newest_checkpoint_corrupt(tmp: Path, verdict) -> tuple:
    job = _job(tmp, "corrupt-newest")
    _evolve(job, "--stop-after", "2")
    newest = tmp / "runs" / "corrupt-newest" / "checkpoints" / "gen-000002.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    code, _, _ = _evolve(job)
    ok, detail = verdict("corrupt-newest")
    moved = list((tmp / "runs" / "corrupt-newest").glob("corrupt-*/gen-000002.ckpt"))
    return ("the newest checkpoint truncated to half, rerun", f"exit {code}; {detail}; moved aside: {bool(moved)}",
            "yes" if ok and moved else "NO")


def _every_checkpoint_corrupt(tmp: Path, verdict) -> tuple:
    """--resume refuses; a plain rerun starts over, the corrupt files kept aside."""
    job = _job(tmp, "corrupt-all")
    _evolve(job, "--stop-after", "1")
    for p in (tmp / "runs" / "corrupt-all" / "checkpoints").glob("gen-*.ckpt"):
        p.write_bytes(b"garbage")
    code, _, err = _evolve(job, "--resume")
    line = err.strip().splitlines()[-1] if err.strip() else ""
    code2, _, _ = _evolve(job)
    ok, detail = verdict("corrupt-all")
    moved = list((tmp / "runs" / "corrupt-all").glob("corrupt-*/gen-*.ckpt"))
    return ("every checkpoint corrupt: `--resume`, then a plain rerun",
            f"--resume: exit {code} ({line}); rerun: exit {code2}, {detail}; {len(moved)} files moved aside",
            "yes" if code == 2 and ok and moved else "NO")


def _interrupted(tmp: Path, verdict, sig, name: str) -> tuple:
    job = _job(tmp, name)
    proc = _evolve(job, wait=False)
    _wait_for(tmp / "runs" / name / "checkpoints" / "gen-000001.ckpt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    info = _inspect(tmp, name)
    clean = proc.returncode == 130 and "Traceback" not in err and info["running"] == 0
    _evolve(job)
    ok, detail = verdict(name)
    return (f"{sig.name} during generation 2, rerun", f"exit {proc.returncode}, no traceback: "
            f"{'Traceback' not in err}, runs RUNNING after: {info['running']}; rerun: {detail}",
            "yes" if clean and ok else "NO")


def _tracking_down(tmp: Path) -> tuple:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _job(tmp, "tracking-down", tracking={"tracking_uri": f"http://127.0.0.1:{port}", "experiment": "x"})
    t = time.perf_counter()
    code, _, err = _evolve(job)
    seconds = time.perf_counter() - t
    line = err.strip().splitlines()[-1] if err.strip() else ""
    return ("the MLflow tracking server unreachable", f"exit {code} after {seconds:.0f} s: {line}",
            "yes" if code == 2 and seconds < 60 else "NO")


def _two_drivers(tmp: Path, verdict) -> tuple:
    job = _job(tmp, "two-drivers")
    first = _evolve(job, wait=False)
    _wait_for(tmp / "runs" / "two-drivers" / "driver.lock", first)
    time.sleep(1)
    code, _, err = _evolve(job)
    first.communicate(timeout=900)
    line = err.strip().splitlines()[-1] if err.strip() else ""
    ok, detail = verdict("two-drivers")
    return ("a second driver on the same run directory", f"second: exit {code} ({line}); first: {detail}",
            "yes" if code == 2 and "in use by pid" in line and ok else "NO")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs-only", action="store_true", help="skip the fault runs")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="namm-reliability-") as d:
        tmp = Path(d)
        parts = []
        if not args.inputs_only:
            rows = faults(tmp)
            parts.append(f"## Faults injected ({sum(r[-1] == 'yes' for r in rows)} of {len(rows)} as expected)\n\n"
                         "Smoke job (tiny random model, 3 generations, population 6, 2 actors), each against an "
                         "uninterrupted reference run.\n\n" + markdown_table(("fault", "outcome", "as expected"), rows))
        rows = bad_inputs(tmp)
        parts.append(f"## Bad inputs ({sum(r[-1] == 'yes' for r in rows)} of {len(rows)} refused as expected)\n\n"
                     + markdown_table(("input", "expected", "outcome", "seconds", "as expected"), rows))
    write_result(args.out, "\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
