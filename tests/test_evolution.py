"""The orchestrator end to end on a real local Ray cluster and a real MLflow store:
the smoke job, a worker killed mid-generation, the driver killed and resumed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.driver import EvolutionRun

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_job(tmp_path: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["name"] = name
    data["checkpoint"] = {"root": str(tmp_path / "runs"), "keep": 3}
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_job(tmp, "reference"))
    return cfg, EvolutionRun(cfg).run(), tmp


def _client(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def test_smoke_job_end_to_end_with_mlflow(reference_run):
    from namm_core import NAMM

    cfg, summary, tmp = reference_run
    assert summary["generations"] == 3 and not summary["stopped"]
    client = _client(tmp)
    parent = client.get_run(summary["mlflow_parent"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["es.population"] == "6"
    stages = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in stages) == ["stage 0: fidelity", "stage 1: fidelity-longer"]
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "fitness_best")]
    assert sorted(steps) == [0, 1, 2]
    for key in ("fitness_mean", "fitness_median", "fitness_worst", "sigma", "mean_retention", "eval_seconds",
                "failures"):
        assert len(client.get_metric_history(parent.info.run_id, key)) == 3, key
    # per-task scores: stage 0's task for generations 0-1, stage 1's for generation 2
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "score/fidelity:256")] == [0, 1]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "score/fidelity:384")] == [2]
    assert parent.info.artifact_uri.startswith((tmp / "mlartifacts").as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "statistics_failures")] == [(0, 0)]
    assert len(client.get_metric_history(parent.info.run_id, "validation_fitness")) >= 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"namm_best", "namm_latest", "history.parquet", "fitness.png", "retention_per_layer.png"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "namm_best", str(tmp / "dl"))
    assert NAMM.from_pretrained(local).num_params == 4172
    import pyarrow.parquet as pq

    history = pq.read_table(cfg.run_dir / "artifacts" / "history.parquet").to_pylist()
    assert len(history) == 3 * 6 and all(np.isfinite(r["fitness"]) for r in history)


def test_worker_killed_mid_generation_loses_nothing(reference_run, tmp_path):
    ref_cfg, ref, _ = reference_run
    from faulty_actors import CrashOnceActor

    from orchestrator.driver import default_pool_factory

    flag = tmp_path / "crash-once"
    flag.write_text("")
    crashing = type("CrashOnceHere", (CrashOnceActor,), {"flag": str(flag)})
    cfg = load_config(write_job(tmp_path, "crash"))
    run = EvolutionRun(cfg, pool_factory=lambda c: default_pool_factory(c, actor_class=crashing))
    summary = run.run()
    assert not flag.exists(), "a worker crashed"
    history = run.state.history
    assert all(np.isfinite(r["fitness"]) for r in history), "no candidate lost"
    assert np.array_equal(summary["mean"], ref["mean"]), "same result as the run without the fault"


def test_driver_killed_then_resumed_equals_uninterrupted(reference_run, ray_cluster, tmp_path):
    _, ref, _ = reference_run
    job = write_job(tmp_path, "resume")
    cfg = load_config(job)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "namm_cli", "evolve", str(job)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = cfg.run_dir / "checkpoints" / "gen-000001.ckpt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the driver wrote its first checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    summary = EvolutionRun(cfg).run()
    assert summary["generations"] == 3
    assert np.array_equal(summary["mean"], ref["mean"]), "CMA mean bit-identical to the uninterrupted run"
    steps = sorted(m.step for m in _client(tmp_path).get_metric_history(summary["mlflow_parent"], "fitness_best"))
    assert steps == [0, 1, 2], "MLflow steps contiguous, none repeated"


def test_the_in_process_pool_runs_the_same_evolution_without_ray(reference_run, tmp_path):
    """workers.pool: in_process, run by `namm evolve` in a process where Ray cannot even be
    imported: the same fitness values, the same validated mean and a bit-identical CMA mean."""
    ref_cfg, ref, _ = reference_run
    job = write_job(tmp_path, "in-process")
    data = yaml.safe_load(job.read_text())
    data["workers"]["pool"] = "in_process"
    job.write_text(yaml.safe_dump(data))
    code = ("import sys; sys.modules['ray'] = None\n"   # any `import ray` fails
            "from namm_cli.cli import main; sys.exit(main(['evolve', sys.argv[1]]))")
    out = subprocess.run([sys.executable, "-c", code, str(job)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = load_config(job)
    run = EvolutionRun(cfg)
    summary = run.run()   # complete: reads the checkpoint, starts nothing
    assert summary["already_complete"] and summary["generations"] == 3
    assert np.array_equal(summary["mean"], ref["mean"]), "CMA mean bit-identical to the Ray run"
    assert np.array_equal(summary["best_validation"]["vector"], ref["best_validation"]["vector"])
    reference = EvolutionRun(ref_cfg).prepare()
    reference.lock.release()
    assert [r["fitness"] for r in run.state.history] == [r["fitness"] for r in reference.state.history]
    assert len({r["worker_pid"] for r in run.state.history}) == 1, "one process did every job"


def test_resume_with_a_changed_config_is_refused(reference_run):
    cfg, _, _ = reference_run
    cfg.es.sigma0 = 0.5
    with pytest.raises(ValueError, match="different config"):
        EvolutionRun(cfg).run()


def test_smoke_job_logs_to_an_mlflow_tracking_server(ray_cluster, tmp_path):
    """The same job against a real `mlflow server` on a free loopback port (MLFLOW_TRACKING_URI)."""
    import socket

    import psutil
    from mlflow.tracking import MlflowClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                MlflowClient(uri).search_experiments()
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])
                time.sleep(1)
        data = yaml.safe_load(write_job(tmp_path, "served").read_text())
        del data["tracking"]
        path = tmp_path / "served.yaml"
        path.write_text(yaml.safe_dump(data))
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            summary = EvolutionRun(load_config(path)).run()
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
        client = MlflowClient(uri)
        assert summary["tracking_uri"] == uri
        steps = sorted(m.step for m in client.get_metric_history(summary["mlflow_parent"], "fitness_best"))
        assert steps == [0, 1, 2]
        artifacts = {a.path for a in client.list_artifacts(summary["mlflow_parent"])}
        assert {"namm_best", "fitness.png", "history.parquet"} <= artifacts
    finally:
        children = psutil.Process(server.pid).children(recursive=True)
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_two_model_run_on_ray_routes_each_model_to_its_actors_and_equals_the_in_process_run(ray_cluster, tmp_path):
    """transfer_models on real actors (two per model): the same run as in process, per-model metrics in MLflow."""
    from test_transfer_models import smoke_data

    from orchestrator.config import config_from_dict

    data = smoke_data(tmp_path, "two-ray")
    data["workers"] = {**data["workers"], "pool": "ray", "num_actors": 2}
    on_ray = EvolutionRun(config_from_dict(data, base_dir=tmp_path)).run()
    data = smoke_data(tmp_path, "two-local")
    data["workers"] = {**data["workers"], "num_actors": 2}
    cfg = config_from_dict(data, base_dir=tmp_path)
    local = EvolutionRun(cfg).run()
    assert np.array_equal(on_ray["mean"], local["mean"])
    client = _client(tmp_path)
    for m in cfg.models:
        key = f"fitness_mean/{m.label}"
        assert len(client.get_metric_history(on_ray["mlflow_parent"], key)) == 2, key
        assert client.get_metric_history(on_ray["mlflow_parent"], f"validation_fitness/{m.label}")


def test_the_ray_pool_sends_each_job_to_an_actor_of_its_model(ray_cluster):
    import ray

    from orchestrator.dispatch import ActorPool
    from orchestrator.pool import Job

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, model):
            self.model = model

        def location(self):
            return {"pid": os.getpid(), "node": None}

        def which(self, _):
            return self.model

    models = [0, 0, 1]
    pool = ActorPool(lambda i: Holder.remote(models[i]), 3, actor_models=models)
    pool.wait_ready()
    jobs = [Job("which", (i,), model=m) for i, m in enumerate([1, 0, 1, 1, 0, 1])]
    try:
        assert pool.run(jobs) == [1, 0, 1, 1, 0, 1]
        with pytest.raises(ValueError, match=r"model\(s\) \[2\]"):
            pool.run([Job("which", (0,), model=2)])
    finally:
        pool.shutdown()
