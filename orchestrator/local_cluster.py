"""A Ray cluster in miniature on one machine: a head and worker nodes, each its own `ray start`
process with its own CPUs, temp directory and loopback ports, stopped by process id (never with
Ray's own stop command, which ends every Ray cluster on the machine).

    python -m orchestrator.local_cluster --nodes 2 --cpus-per-node 1

prints the addresses to submit to (`bash scripts/submit.sh jobs/smoke.yaml <dashboard>`), then
waits; Ctrl-C or SIGTERM stops what it started. The tests and `bench/reliability.py` use it to run an
evolution over several nodes, to lose a node mid-generation and to add one mid-run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayNode:
    """One `ray start --block` process and the Ray processes under it (raylet, workers, agents)."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path):
        self.name, self.proc, self.log = name, proc, log

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def busy_with(self, method: str) -> bool:
        """Whether an actor on this node is running `method` (Ray titles a busy worker ray::Class.method)."""
        for p in self.processes():
            try:
                if f".{method}" in " ".join(p.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    def crash(self) -> None:
        """The node dies as a machine would: its raylet and every process under it SIGKILLed at once."""
        victims = self.processes()
        for p in victims + [psutil.Process(self.proc.pid)]:
            _kill(p)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            leftovers = self.processes()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            for p in leftovers:   # whatever `ray start` left behind, by process id
                _kill(p)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class LocalCluster:
    """A head (no CPUs by default: actors go to worker nodes, the head keeps the job's driver) and
    worker nodes added with `add_node`. Use as a context manager: leaving it stops every node."""

    def __init__(self, root: Path, head_cpus: int = 0, env: Optional[dict] = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.head_cpus = head_cpus
        env = dict(os.environ if env is None else env)
        env.pop("RAY_ADDRESS", None)
        env["RAY_AUTH_MODE"] = "token"    # Ray 2.60 heads authenticate with a token
        # a dead node is noticed in seconds, not the default ~30 s
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "3")
        env["PATH"] = f"{Path(RAY).parent}:{env.get('PATH', '')}"
        self.env = env
        self.port, self.dashboard_port, self._client_port = free_ports(3)
        # Ray's sockets live under its temp dir and a socket path may not exceed 107 bytes
        self.ray_temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        """The GCS address (`RAY_ADDRESS` for a driver, `--address` for a joining node)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The address `ray job submit` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> "LocalCluster":
        self._start("head", self.head_cpus, ["--head", f"--port={self.port}", "--include-dashboard=true",
                                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                             f"--ray-client-server-port={self._client_port}",
                                             f"--temp-dir={self.ray_temp}"])
        self.wait_for_nodes(1, timeout)
        deadline = time.time() + timeout     # the job API answers a little after the node is up
        while subprocess.run([RAY, "job", "list", "--address", self.dashboard], env=self.env,
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("the Ray head's job API did not come up:\n" + self.nodes[0].tail())
            time.sleep(1)
        return self

    def add_node(self, num_cpus: int = 1, timeout: float = 120) -> RayNode:
        """A worker node joining the head; returns once the cluster counts it."""
        alive = self.alive_nodes()
        name = f"worker-{len(self.nodes)}"
        # a temp dir of its own: nodes sharing one would share (and clean up) each other's runtime envs
        node = self._start(name, num_cpus, [f"--address={self.address}", f"--temp-dir={self.ray_temp / name}"])
        self.wait_for_nodes(alive + 1, timeout)
        return node

    def crash_node(self, node: RayNode, timeout: float = 60) -> None:
        """Crash a worker node (see `RayNode.crash`); returns once the cluster has noticed."""
        alive = self.alive_nodes()
        node.crash()
        self.wait_for_nodes(alive - 1, timeout)

    def _start(self, name: str, num_cpus: int, args: list[str]) -> RayNode:
        log = self.root / f"{name}.log"
        taken = {self.port, self.dashboard_port, self._client_port}
        ports = [p for p in free_ports(12) if p not in taken][:6]
        ports = [f"--{flag}={port}" for flag, port in zip(
            ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port"), ports)]
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
               *ports, *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        node = RayNode(name, proc, log)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> int:
        """Nodes the cluster counts as alive (from `ray status`, which asks the GCS)."""
        out = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            return 0
        active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"node_[0-9a-f]+", active))

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != count:
            for node in self.nodes:
                if node.proc.poll() is not None and node.proc.returncode not in (0, -9):
                    raise RuntimeError(f"ray start ({node.name}) exited:\n{node.tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} nodes:\n" + self.nodes[-1].tail())
            time.sleep(1)

    def stop(self) -> None:
        for node in reversed(self.nodes):   # worker nodes first, the head last
            node.stop()
        shutil.rmtree(self.ray_temp, ignore_errors=True)


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.Error:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2, help="worker nodes besides the head (default 2)")
    p.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each worker node offers (default 1)")
    p.add_argument("--dir", type=Path, default=Path("/tmp") / f"namm-cluster-{os.getpid()}",
                   help="where the nodes' logs go")
    args = p.parse_args(argv)
    # SIGTERM (and SIGINT, which a shell's background job ignores) stop the nodes on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalCluster(args.dir) as cluster:
        for _ in range(args.nodes):
            cluster.add_node(args.cpus_per_node)
        print(f"head: RAY_ADDRESS={cluster.address}  dashboard: {cluster.dashboard}  logs: {args.dir}\n"
              f"submit: bash scripts/submit.sh jobs/smoke.yaml {cluster.dashboard}\nCtrl-C stops the cluster.",
              flush=True)
        try:
            signal.pause()
        except (KeyboardInterrupt, SystemExit):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
