"""MLflow tracking through explicit run ids (MlflowClient), so a resumed run continues the
same parent and stage runs. One parent run per evolution (params: the resolved config), one
nested run per stage; metrics per generation with step = global generation."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from .interrupts import ShieldedClient

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: Optional[str], run_dir: Path) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line naming the URI, when the tracking store cannot be reached
    (MLflow's own client retries for minutes before it gives up)."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status >= 400:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"MLflow tracking server {uri} is not reachable ({reason}); start it, or set "
                             "tracking.tracking_uri / MLFLOW_TRACKING_URI to a reachable one") from None
    elif uri.startswith("sqlite:///"):
        directory = Path(uri[len("sqlite:///"):]).parent
        if not directory.is_dir() or not os.access(directory, os.W_OK):
            raise ValueError(f"MLflow tracking store {uri}: directory {directory} does not exist or is not writable")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = str(v)[:6000]
    return out


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str):
        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = ShieldedClient(MlflowClient(tracking_uri))   # a stop never cuts a store write in half
        found = self.client.get_experiment_by_name(experiment)
        if found:
            self.experiment_id = found.experiment_id
        else:
            # a local sqlite store keeps its artifacts beside the database, not in the cwd's ./mlruns
            location = None
            if tracking_uri.startswith("sqlite:///"):
                location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        # MLflow 3's UI opens an untagged experiment in its GenAI view (traces); this is training
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")

    def parent_run(self, run_id: Optional[str], name: str, params: dict, tags: Optional[dict] = None) -> str:
        if run_id:  # resume: params are immutable, never re-logged
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"namm.kind": "evolution", **(tags or {})})
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def stage_run(self, run_id: Optional[str], parent_id: str, name: str, params: dict) -> str:
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": parent_id, "namm.kind": "stage"})
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(params).items()])
        return run.info.run_id

    def log_metrics(self, run_ids: list[str], metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for run_id in run_ids:
            self.client.log_batch(run_id, metrics=batch)

    def last_step(self, run_id: str, key: str) -> int:
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def supersede(self, run_ids: list[str], reason: str) -> None:
        """End runs that a clean run replaces (their metrics ran past the resumed checkpoint)."""
        for run_id in run_ids:
            self.client.set_tag(run_id, "namm.superseded", reason)
            self.client.set_terminated(run_id, status="KILLED")

    def end_orphans(self, parent_id: str, keep: set) -> None:
        """Stage runs of this parent left RUNNING by a driver that died before checkpointing them."""
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                     "attributes.status = 'RUNNING'")
        for run in runs:
            if run.info.run_id not in keep:
                self.client.set_tag(run.info.run_id, "namm.superseded", "not in the resumed checkpoint")
                self.client.set_terminated(run.info.run_id, status="KILLED")
