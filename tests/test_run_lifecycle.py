"""Runs that survive and tell the truth: resume after a corrupt checkpoint keeps MLflow steps unique,
corrupt checkpoints are never overwritten, one driver per run directory, SIGTERM stops cleanly,
an unreachable tracking server fails in seconds, a finished run is not started again."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from namm_cli.cli import main as cli
from orchestrator.config import load_config
from orchestrator.driver import EvolutionRun
from orchestrator.runlock import RunLock, RunLocked

ROOT = Path(__file__).resolve().parent.parent


def write_job(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["name"] = name
    data["checkpoint"] = {"root": str(tmp_path / "runs"), "keep": 5}
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"}
    data.update(changes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.ray
def test_corrupt_newest_checkpoint_then_resume_keeps_steps_unique_and_runs_ended(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config(write_job(tmp_path, "steps"))
    reference = EvolutionRun(load_config(write_job(tmp_path / "ref", "ref"))).run()
    stopped = EvolutionRun(cfg, stop_after=2).run()
    assert stopped["stopped"] and stopped["generations"] == 2
    newest = cfg.run_dir / "checkpoints" / "gen-000002.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])          # the newest checkpoint is corrupt
    summary = EvolutionRun(cfg).run()                    # resumes from gen-000001: step 1 is re-run
    assert summary["generations"] == 3
    assert np.array_equal(summary["mean"], reference["mean"]), "same CMA mean as an uninterrupted run"
    moved = list(cfg.run_dir.glob("corrupt-*/gen-000002.ckpt"))
    assert len(moved) == 1 and moved[0].read_bytes() == data[: len(data) // 2], "kept aside, not overwritten"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = summary["mlflow_parent"]
    assert sorted(m.step for m in client.get_metric_history(parent, "fitness_best")) == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(parent, "sigma")) == [0, 1, 2]
    old = client.get_run(stopped["mlflow_parent"])
    assert old.info.status == "KILLED" and "namm.superseded" in old.data.tags
    assert client.get_run(parent).data.tags["namm.resumed_from"] == stopped["mlflow_parent"]
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert "RUNNING" not in statuses.values(), statuses
    stages = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in stages) == ["stage 0: fidelity", "stage 1: fidelity-longer"]
    assert all(r.info.status == "FINISHED" for r in stages)


def test_every_checkpoint_corrupt_resume_refuses_and_a_fresh_start_keeps_them(tmp_path):
    job = write_job(tmp_path, "corrupt")
    cfg = load_config(job)
    ckpts = cfg.run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "gen-000001.ckpt").write_bytes(b"NAMMCKPT1 deadbeef 10\ngarbage")
    t = time.time()
    assert cli(["evolve", str(job), "--resume"]) == 2
    assert time.time() - t < 30, "refused before Ray or a model started"
    assert (ckpts / "gen-000001.ckpt").exists()
    run = EvolutionRun(cfg).prepare()           # without --resume: a fresh start, the file moved aside
    try:
        assert not (ckpts / "gen-000001.ckpt").exists()
        assert [p.name for p in cfg.run_dir.glob("corrupt-*/*")] == ["gen-000001.ckpt"]
        assert run.state.global_generation == 0
    finally:
        run.lock.release()


def test_a_second_driver_on_the_same_run_directory_is_refused(tmp_path):
    cfg = load_config(write_job(tmp_path, "locked"))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from orchestrator.runlock import RunLock\n"
        "lock = RunLock(%r).acquire(); print('held', flush=True); time.sleep(60)") % (str(ROOT), str(cfg.run_dir))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            EvolutionRun(cfg).prepare()
    finally:
        holder.kill()
        holder.wait()
    run = EvolutionRun(cfg).prepare()            # the holder died: the lock went with it
    run.lock.release()
    lock = RunLock(cfg.run_dir).acquire()
    lock.release()


def test_unreachable_tracking_server_fails_in_seconds(tmp_path, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    job = write_job(tmp_path, "offline", tracking={"tracking_uri": uri, "experiment": "x"})
    t = time.time()
    assert cli(["evolve", str(job)]) == 2
    assert time.time() - t < 30
    err = capsys.readouterr().err
    assert uri in err and "not reachable" in err and err.count("\n") == 1


@pytest.mark.ray
def test_sigterm_stops_cleanly_and_marks_runs_killed(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    job = write_job(tmp_path, "term")
    cfg = load_config(job)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "namm_cli", "evolve", str(job)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = cfg.run_dir / "checkpoints" / "gen-000001.ckpt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "resumes from gen-" in err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert runs and all(r.info.status == "KILLED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    summary = EvolutionRun(cfg).run()            # and it resumes to the end
    assert summary["generations"] == 3


@pytest.mark.ray
def test_rerun_of_a_finished_run_exits_before_starting_anything(ray_cluster, tmp_path, capsys):
    job = write_job(tmp_path, "done")
    EvolutionRun(load_config(job)).run()
    t = time.time()
    assert cli(["evolve", str(job)]) == 0
    assert time.time() - t < 15
    assert "already complete" in capsys.readouterr().out


def test_a_checkpoint_root_that_is_a_file_or_read_only_is_refused_before_ray(tmp_path):
    (tmp_path / "afile").write_text("")
    cfg = load_config(write_job(tmp_path, "rootfile", checkpoint={"root": str(tmp_path / "afile"), "keep": 2}))
    with pytest.raises(ValueError, match="checkpoint.root: .*afile is a file"):
        EvolutionRun(cfg).prepare()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    (readonly / "rootro").mkdir()
    os.chmod(readonly / "rootro", 0o500)
    try:
        if not os.access(readonly / "rootro", os.W_OK):      # root ignores permissions
            cfg = load_config(write_job(tmp_path, "rootro", checkpoint={"root": str(readonly), "keep": 2}))
            with pytest.raises(ValueError, match="not writable"):
                EvolutionRun(cfg).prepare()
    finally:
        os.chmod(readonly / "rootro", 0o700)


def test_the_pool_starts_the_costliest_jobs_first_and_returns_results_in_job_order(ray_cluster):
    """candidate_jobs prices a job by its prompts' tokens; one actor shows the order jobs start in."""
    import numpy as np
    import ray

    from orchestrator.dispatch import ActorPool
    from orchestrator.driver import candidate_jobs

    @ray.remote(num_cpus=0)
    class Echo:
        def location(self):
            return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

        def evaluate(self, vector, norm, requests, tasks):
            return {"first": float(vector[0]), "requests": list(requests)}

    tasks = [{"key": "short", "context_length": 256}, {"key": "long", "context_length": 2048}]
    requests = [("short", 0), ("short", 1), ("long", 0), ("long", 1)]
    candidates = [np.full(3, float(i)) for i in range(2)]
    jobs, sizes = candidate_jobs(candidates, None, requests, tasks, prompts_per_job=2)
    assert sizes == [2, 2] and [j.cost for j in jobs] == [512, 4096, 512, 4096]
    pool = ActorPool(lambda i: Echo.remote(), 1)
    assert pool.wait_ready() and pool.nodes[0] and pool.node_report()["nodes_in_use"] == 1
    order = []
    submit = pool.actors[0].evaluate.remote

    class Spy:
        def remote(self, *args):
            order.append((args[0][0], args[2][0][0]))
            return submit(*args)

    pool.actors[0].evaluate = Spy()
    results = pool.run(jobs)
    pool.shutdown()
    assert order == [(0.0, "long"), (1.0, "long"), (0.0, "short"), (1.0, "short")]
    assert [(r["first"], r["requests"][0][0]) for r in results] == [(0.0, "short"), (0.0, "long"),
                                                                    (1.0, "short"), (1.0, "long")]
