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
    # common random numbers: within a generation every candidate runs the same prompts
    for g in range(3):
        generation = candidate_jobs[g * 12:(g + 1) * 12]
        per_candidate = [[tuple(r) for j in generation[i * 2:(i + 1) * 2] for r in j.args[2]] for i in range(6)]
        assert all(prompts == per_candidate[0] for prompts in per_candidate)


def test_an_in_process_run_resumes_to_the_uninterrupted_run(tmp_path):
    full = EvolutionRun(smoke(tmp_path, "full")).run()
    EvolutionRun(smoke(tmp_path, "stopped"), stop_after=1).run()
    # resumed with its candidates dispatched in parts: the same run (the setting is not in the config hash)
    resumed = EvolutionRun(smoke(tmp_path, "stopped", prompts_per_job=1)).run()
    assert resumed["generations"] == 3 and np.array_equal(resumed["mean"], full["mean"])


def test_the_start_is_validated_as_generation_minus_one_and_is_the_bar_for_namm_best(tmp_path):
    from namm_core import NAMM

    cfg = smoke(tmp_path, "start")
    run = EvolutionRun(cfg)
    summary = run.run()
    validation = run.state.validation
    start = summary["start_validation"]
    assert validation[0]["generation"] == -1 and start == validation[0]
    assert np.isfinite(start["fitness"])
    best = summary["best_validation"]
    assert best["fitness"] == max(v["fitness"] for v in validation)
    exported = NAMM.from_pretrained(Path(summary["run_dir"]) / "artifacts" / "namm_best")
    assert exported.metadata["generation"] == best["generation"]
    assert np.array_equal(exported.get_params().numpy(), np.asarray(best["vector"], dtype=np.float32))
    # the same run without it: no generation -1, and the same search (validation does not steer CMA-ES)
    cfg_off = smoke(tmp_path, "no-start")
    cfg_off.es.validate_start = False
    off = EvolutionRun(cfg_off)
    off_summary = off.run()
    assert off_summary["start_validation"] is None
    assert all(v["generation"] >= 0 for v in off.state.validation)
    assert np.array_equal(off_summary["mean"], summary["mean"])


def test_validate_start_must_be_a_boolean(tmp_path):
    import pytest

    from orchestrator.config import ConfigError

    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["es"]["validate_start"] = "yes"
    with pytest.raises(ConfigError, match="es.validate_start"):
        config_from_dict(data, base_dir=tmp_path)


def test_the_levers_table_reads_a_run_and_its_exported_start(tmp_path):
    """bench/evolution_levers.py: a run's facts (its start, search, candidates, validations) and a
    NAMM exported with --which start as the row of the starting mean."""
    import sys

    sys.path.insert(0, str(ROOT))
    from bench import evolution_levers
    from namm_cli.cli import main as namm_main

    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data.update(name="lever", checkpoint={"root": str(tmp_path / "runs"), "keep": 3},
                tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"})
    data["workers"]["pool"] = "in_process"
    config = tmp_path / "lever.yaml"
    config.write_text(yaml.safe_dump(data))
    from orchestrator.config import load_config

    EvolutionRun(load_config(config)).run()
    checkpoints = str(tmp_path / "runs" / "lever" / "checkpoints")
    assert namm_main(["export", checkpoints, str(tmp_path / "start"), "--which", "start"]) == 0
    assert namm_main(["export", checkpoints, str(tmp_path / "best"), "--which", "best-validated"]) == 0
    facts = evolution_levers.run_facts(str(config))
    assert facts["start"] == "zero" and facts["candidates"] == 3 * 6
    assert facts["start_validation"].endswith("(gen -1)") and "(gen -1)" in facts["validation"]
    assert evolution_levers.is_start_export(str(tmp_path / "start"))
    assert not evolution_levers.is_start_export(str(tmp_path / "best"))


class StartValidatesBest(EvolutionRun):
    """The start's validation scores far above anything evolution can reach."""

    def _validate_start(self, pool):
        self._boost = True
        try:
            super()._validate_start(pool)
        finally:
            self._boost = False

    def _fitness(self, result, requests, tasks):
        fitness, per_task, per_model = super()._fitness(result, requests, tasks)
        return fitness + (100.0 if getattr(self, "_boost", False) else 0.0), per_task, per_model


def test_a_run_whose_evolved_means_never_validate_better_exports_its_start(tmp_path, capsys):
    from namm_core import NAMM

    run = StartValidatesBest(smoke(tmp_path, "start-wins"))
    summary = run.run()
    best = summary["best_validation"]
    assert best["generation"] == -1 and summary["evolved_validations"] >= 1
    exported = NAMM.from_pretrained(Path(summary["run_dir"]) / "artifacts" / "namm_best")
    assert exported.metadata["kind"] == "the starting mean (no evolved mean validated better)"
    assert not exported.get_params().any()             # smoke.yaml starts from the zero NAMM
    assert not np.array_equal(summary["mean"], np.zeros_like(summary["mean"]))   # evolution did move


def test_the_start_metric_reaches_mlflow_after_a_crash_before_its_logging(tmp_path):
    import pytest
    from mlflow.tracking import MlflowClient

    class CrashBeforeLogging(EvolutionRun):
        def _relog_start_validation(self):
            raise RuntimeError("crash between the start's checkpoint and its MLflow metric")

    with pytest.raises(RuntimeError, match="crash"):
        CrashBeforeLogging(smoke(tmp_path, "relog")).run()
    summary = EvolutionRun(smoke(tmp_path, "relog")).run()       # resumes; the start is not validated again
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(summary["mlflow_parent"],
                                                                              "validation_fitness_start")
    assert [m.value for m in history] == [summary["start_validation"]["fitness"]]
