"""The evolution without Ray (workers.pool: in_process), and candidates dispatched in parts."""
from pathlib import Path

import numpy as np
import yaml

from orchestrator.config import config_from_dict
from orchestrator.driver import EvolutionRun
from orchestrator.pool import in_process_pool

ROOT = Path(__file__).resolve().parent.parent


def smoke(tmp_path: Path, name: str, **workers):
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["name"] = name
    data["workers"].update(pool="in_process", **workers)
    data["checkpoint"] = {"root": str(tmp_path / "runs"), "keep": 3}
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"}
    return config_from_dict(data, base_dir=tmp_path)


def test_candidates_split_into_jobs_of_one_prompt_give_the_same_run(tmp_path):
    whole = EvolutionRun(smoke(tmp_path, "whole"))
    whole_summary = whole.run()
    jobs = []

    def recording_pool(cfg):   # the in-process pool, noting every evaluate job it is given
        pool = in_process_pool(cfg)
        run = pool.run
        pool.run = lambda batch: jobs.extend(j for j in batch if j.method == "evaluate") or run(batch)
        return pool

    split = EvolutionRun(smoke(tmp_path, "split", prompts_per_job=1), pool_factory=recording_pool)
    split_summary = split.run()
    assert split_summary["generations"] == whole_summary["generations"] == 3
    assert [r["fitness"] for r in split.state.history] == [r["fitness"] for r in whole.state.history]
    assert np.array_equal(split_summary["mean"], whole_summary["mean"])
    # each candidate went out as two jobs of one prompt (2 prompts per generation, 6 candidates)
    candidate_jobs = [j for j in jobs if j.label.startswith("candidate")]
    assert len(candidate_jobs) == 3 * 6 * 2 and all(len(j.args[2]) == 1 for j in candidate_jobs)


def test_an_in_process_run_resumes_to_the_uninterrupted_run(tmp_path):
    full = EvolutionRun(smoke(tmp_path, "full")).run()
    EvolutionRun(smoke(tmp_path, "stopped"), stop_after=1).run()
    # resumed with its candidates dispatched in parts: the same run (the setting is not in the config hash)
    resumed = EvolutionRun(smoke(tmp_path, "stopped", prompts_per_job=1)).run()
    assert resumed["generations"] == 3 and np.array_equal(resumed["mean"], full["mean"])
