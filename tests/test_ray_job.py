"""`ray job submit` against a real Ray head started with `ray start --head` on free loopback
ports (orchestrator/local_cluster.py), stopped afterwards by its process id."""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("head"), head_cpus=4) as cluster:
        yield cluster.dashboard, cluster.env


def test_ray_job_submit_runs_the_smoke_job(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update({
        "NAMM_RUN_ROOT": str(tmp_path / "runs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "NAMM_CACHE": os.environ.get("NAMM_CACHE", str(Path.home() / ".cache" / "namm")),
    })
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    # exactly the README's command (scripts/submit.sh: token auth, the project's interpreter)
    client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "submit.sh"), "jobs/smoke.yaml", address, str(env_file)],
                         env=client_env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "finished after 3 generations" in log
    run_dir = tmp_path / "runs" / "smoke"
    assert (run_dir / "artifacts" / "namm_best" / "namm.safetensors").exists()
    assert list((run_dir / "checkpoints").glob("gen-*.ckpt"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("namm-evolution").experiment_id])
    assert any(r.info.run_name == "smoke" and r.info.status == "FINISHED" for r in runs)
