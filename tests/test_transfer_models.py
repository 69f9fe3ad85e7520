"""Evolution on several models at once (`transfer_models`): every candidate runs on each model's
own actors, on that model's own prompts and references, and its fitness is the mean over models."""
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import ConfigError, check_resources, config_from_dict, load_config
from orchestrator.driver import EvolutionRun, candidate_jobs, config_hash, split_by_model
from orchestrator.pool import in_process_pool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # bench/
# another architecture and another tokenizer, as SmolLM2 -> Gemma 3
TRANSFER = {"tiny_random": {"architecture": "gemma3", "seed": 1, "hidden_size": 32, "num_hidden_layers": 3,
                            "tokenizer": "gemma3-270m", "head_dim": 8}}


def smoke_data(tmp_path: Path, name: str, transfer: bool = True) -> dict:
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data["name"] = name
    data["stages"] = data["stages"][:1]
    data["workers"].update(pool="in_process")
    data["checkpoint"] = {"root": str(tmp_path / "runs"), "keep": 3}
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"}
    if transfer:
        data["transfer_models"] = [TRANSFER]
    return data


def budgeted(data: dict) -> dict:
    """A NAMM with half the cache: the zero start already evicts, so its fitness is not 1."""
    data["namm"] = {"stats_prompts": 2, "selection": "top_k", "budget": 0.5, "scope": "global", "sinks": 4}
    return data


def test_transfer_models_are_checked_and_leave_a_run_without_them_its_hash(tmp_path):
    plain = config_from_dict(smoke_data(tmp_path, "a", transfer=False), base_dir=tmp_path)
    empty = config_from_dict({**smoke_data(tmp_path, "a", transfer=False), "transfer_models": []}, base_dir=tmp_path)
    assert config_hash(plain) == config_hash(empty)
    with_transfer = config_from_dict(smoke_data(tmp_path, "a"), base_dir=tmp_path)
    assert config_hash(with_transfer) != config_hash(plain)
    assert [m.label for m in with_transfer.models] == ["tiny-llama-s0-l2-h32", "tiny-gemma3-s1-l3-h32"]

    bad = smoke_data(tmp_path, "b")
    bad["transfer_models"] = [{"name": "gemma3-270m", "dtype": "float8"}]
    with pytest.raises(ConfigError, match=r"transfer_models\[0\]\.dtype"):
        config_from_dict(bad, base_dir=tmp_path)
    same = smoke_data(tmp_path, "c")
    same["transfer_models"] = [dict(same["model"])]
    with pytest.raises(ConfigError, match=r"transfer_models\[0\]: .* is already model"):
        config_from_dict(same, base_dir=tmp_path)
    unknown = smoke_data(tmp_path, "d")
    unknown["transfer_models"] = [{"nmae": "x"}]
    with pytest.raises(ConfigError, match=r"transfer_models\[0\]\.nmae: unknown field"):
        config_from_dict(unknown, base_dir=tmp_path)

    ray_cfg = config_from_dict({**smoke_data(tmp_path, "e"), "workers": {"num_actors": 2, "cpus_per_actor": 1}},
                               base_dir=tmp_path)
    check_resources(ray_cfg, num_cpus=4)          # 2 actors for each of 2 models
    with pytest.raises(ConfigError, match="for each of 2 models need 4 CPUs; the local Ray has 3"):
        check_resources(ray_cfg, num_cpus=3)


def test_jobs_go_to_their_model_and_cover_the_prompts_in_order():
    tasks = [{"key": "passkey@256", "model": 0, "context_length": 256},
             {"key": "passkey@256@other", "model": 1, "context_length": 256}]
    requests = [("passkey@256", 0), ("passkey@256", 3), ("passkey@256@other", 0), ("passkey@256@other", 3)]
    jobs, sizes = candidate_jobs([np.zeros(3), np.ones(3)], None, requests, tasks)
    assert sizes == [2, 2] and [j.model for j in jobs] == [0, 1, 0, 1]
    assert [j.args[2] for j in jobs[:2]] == [requests[:2], requests[2:]]
    jobs, sizes = candidate_jobs([np.zeros(3)], None, requests, tasks, prompts_per_job=1)
    assert sizes == [1, 1, 1, 1] and [j.model for j in jobs] == [0, 0, 1, 1]

    class Pool:
        actors = [None] * 5
        actor_models = [0, 0, 0, 1, 1]
    chunks, models = split_by_model(requests + [("passkey@256", 5)], tasks, Pool())
    assert models == [0, 0, 0, 1, 1]
    assert chunks == [[("passkey@256", 0)], [("passkey@256", 3)], [("passkey@256", 5)],
                      [("passkey@256@other", 0)], [("passkey@256@other", 3)]]


def test_a_run_on_two_models_evaluates_each_candidate_on_both_and_averages_their_fitness(tmp_path):
    from namm_core import NAMM

    jobs = []

    def recording_pool(cfg):
        pool = in_process_pool(cfg)
        run = pool.run
        pool.run = lambda batch: jobs.extend(batch) or run(batch)
        return pool

    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(budgeted(smoke_data(tmp_path, "two"))))
    cfg = load_config(config_file)
    run = EvolutionRun(cfg, pool_factory=recording_pool)
    summary = run.run()
    st = run.state
    label = cfg.transfer_models[0].label
    # every candidate went to both models, each with its own prompts; statistics only on the first
    candidate = [j for j in jobs if j.label.startswith("candidate")]
    assert len(candidate) == 2 * 6 * 2
    for j in candidate:
        assert all(key.endswith(f"@{label}") == (j.model == 1) for key, _ in j.args[2])
    assert {j.model for j in jobs if j.method == "collect_statistics"} == {0}
    assert {j.model for j in jobs if j.method == "reference"} == {0, 1}
    assert any(k.split("|")[0].endswith(f"@{label}") for k in st.references)
    # the fitness told and validated is the mean over the models of the fitness on each
    for v in st.validation:
        on = [v[k] for k in v if k.startswith("fitness@")]
        assert len(on) == 2 and v["fitness"] == pytest.approx(np.mean(on))
    best = NAMM.from_pretrained(Path(summary["run_dir"]) / "artifacts" / "namm_best")
    assert best.metadata["transfer_models"] == [label]
    assert set(k for k in best.metadata if k.startswith("validation_fitness@")) == {
        f"validation_fitness@{m.label}" for m in cfg.models}

    # the levers table names the models and the validation fitness on each
    from bench import evolution_levers

    facts = evolution_levers.run_facts(str(config_file))
    assert facts["fitness"] == f"task_score, mean over {cfg.model.label}, {label}"
    assert f"; {cfg.model.label} " in facts["start_validation"] and f", {label} " in facts["start_validation"]

    # the first model's share equals the same run without the transfer model: same statistics,
    # same starting mean, same validation prompts and references
    alone = EvolutionRun(config_from_dict(budgeted(smoke_data(tmp_path, "one", transfer=False)), base_dir=tmp_path))
    alone.run()
    start_two = st.validation[0]
    start_one = alone.state.validation[0]
    assert start_two["generation"] == start_one["generation"] == -1
    assert start_two[f"fitness@{cfg.model.label}"] == start_one["fitness"] != 1.0
    assert start_two[f"fitness@{label}"] != start_one["fitness"]
