"""`ray job submit` against a real Ray head started with `ray start --head` on free loopback
ports, stopped afterwards by its process id."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    port, dash, agent = free_port(), free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           "--num-cpus=4", f"--temp-dir={tmp / 'ray'}", "--include-dashboard=true"]
    head = subprocess.Popen(cmd, env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail("ray start --head exited:\n" + (tmp / "head.log").read_text()[-3000:])
        probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        pytest.fail("the Ray head did not come up:\n" + (tmp / "head.log").read_text()[-3000:])
    yield address, env
    children = psutil.Process(head.pid).children(recursive=True)
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    for child in children:  # anything the head left behind, by process id
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


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
