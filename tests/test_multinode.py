"""The evolution on a Ray cluster of several nodes on this machine (a head without CPUs and worker
nodes of one CPU each, every one its own `ray start`), submitted as users submit it
(`scripts/submit.sh`): the actors spread over the nodes; a node crashed while its actor evaluates a
candidate costs nothing (the candidate goes to the surviving node, the CMA mean equals the
undisturbed run's, MLflow records the lost node and the retries); a node that joins later takes
the lost actor over."""
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray

GENERATIONS = 10    # long enough for a node to join after the crash (~15 s) and still get work


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as c:
        c.add_node(1)
        c.add_node(1)
        yield c


def _job(tmp: Path, name: str) -> Path:
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["name"] = name
    data["stages"] = data["stages"][:1]
    data["stages"][0].update(generations=GENERATIONS, validation_every=GENERATIONS, prompts_per_task=4)
    data["workers"].update(timeout_seconds=120)
    data["checkpoint"] = {"root": str(tmp / "runs"), "keep": GENERATIONS}
    path = tmp / f"{name}.yaml"     # an absolute path: the job's driver runs on this machine
    path.write_text(yaml.safe_dump(data))
    return path


def _submit(cluster, tmp: Path, job: Path) -> subprocess.Popen:
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update({
        "NAMM_RUN_ROOT": str(tmp / "runs"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "NAMM_CACHE": os.environ.get("NAMM_CACHE", str(Path.home() / ".cache" / "namm")),
    })
    env_file = tmp / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}   # as a user's shell has it
    return subprocess.Popen(["bash", str(ROOT / "scripts" / "submit.sh"), str(job), cluster.dashboard,
                             str(env_file)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _state(tmp: Path, name: str):
    from orchestrator import checkpoint as ckpt
    from orchestrator.state import EvolutionState

    found = ckpt.load_latest(tmp / "runs" / name / "checkpoints")
    return EvolutionState.from_payload(found[1])


def _metric(tmp: Path, state, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(state.mlflow.parent, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def undisturbed(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("undisturbed")
    proc = _submit(cluster, tmp, _job(tmp, "multinode"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return tmp, _state(tmp, "multinode")


def test_actors_spread_over_the_nodes(undisturbed):
    tmp, state = undisturbed
    assert state.global_generation == GENERATIONS
    nodes = {h["worker_node"] for h in state.history}
    assert len(nodes) == 2 and "" not in nodes, nodes       # one actor on each worker node
    assert _metric(tmp, state, "nodes_in_use") == [2.0] * GENERATIONS
    assert _metric(tmp, state, "nodes_lost") == [0.0] * GENERATIONS


def test_a_node_lost_mid_generation_then_a_node_joining(cluster, undisturbed, tmp_path):
    _, reference = undisturbed
    victim = cluster.nodes[-1]
    proc = _submit(cluster, tmp_path, _job(tmp_path, "node-loss"))
    try:
        first = tmp_path / "runs" / "node-loss" / "checkpoints" / "gen-000001.ckpt"
        crashed = False
        while proc.poll() is None and not crashed:      # the first generation done, then mid-evaluation
            if first.exists() and victim.busy_with("evaluate"):
                cluster.crash_node(victim)
                crashed = True
            time.sleep(0.05)
        assert crashed, "the run ended before the node could be crashed"
        joined = cluster.add_node(1)         # takes the lost actor over once the cluster counts it
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    state = _state(tmp_path, "node-loss")
    assert state.global_generation == GENERATIONS
    assert all(np.isfinite(h["fitness"]) for h in state.history), "a candidate was lost"
    np.testing.assert_array_equal(state.es.mean, reference.es.mean)
    lost = _metric(tmp_path, state, "nodes_lost")
    assert lost[0] == 0 and lost[-1] == 1, lost
    assert sum(_metric(tmp_path, state, "failures")) >= 1
    assert _metric(tmp_path, state, "nodes_in_use")[-1] == 2, "the joined node took no actor"
    # the later generations ran on the surviving node and the one that joined
    late = {h["worker_node"] for h in state.history if h["generation"] == GENERATIONS - 1}
    early = {h["worker_node"] for h in state.history if h["generation"] == 0}
    assert len(late) == 2 and len(late - early) == 1, (early, late)
    assert joined.proc.poll() is None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    files = [f.path for f in client.list_artifacts(state.mlflow.parent, "failures")]
    assert files, "no failure report in MLflow"
    text = Path(client.download_artifacts(state.mlflow.parent, files[0], str(tmp_path))).read_text()
    assert "(node " in text, text     # what failed (a job, or the node under an idle actor), and where

