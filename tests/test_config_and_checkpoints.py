"""Run configs fail early with the field named; checkpoints survive crashes and corruption."""
import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator import checkpoint as ckpt
from orchestrator.config import ConfigError, ESConfig, config_from_dict, load_config
from orchestrator.es import EvolutionStrategy

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "name": "t",
    "stages": [{"name": "s", "generations": 2, "tasks": [{"task": "passkey", "context_length": 512, "pool_size": 4}],
                "prompts_per_task": 2}],
}


def _with(path: str, value):
    data = copy.deepcopy(BASE)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize("path,value,message", [
    ("es.populaton", 8, "es.populaton: unknown field"),
    ("es.population", "32", "es.population: expected an integer"),
    ("es.population", 3, "at least 4"),
    ("es.sigma0", -0.1, "es.sigma0: must be positive"),
    ("workers.num_actors", 0, "workers.num_actors: must be positive"),
    ("workers.gpus_per_actor", "many", "workers.gpus_per_actor"),
    ("memory.update_every", 1.5, "memory.update_every: expected an integer"),
    ("namm.scorer", "transformer", "namm.scorer"),
    ("stages.0.generations", 0, "stages[0].generations: must be positive"),
    ("stages.0.prompts_per_task", 8, "stages[0].tasks[0].pool_size"),
    ("stages.0.tasks", [{"task": "no_such_task"}], "stages[0].tasks[0].task: unknown task"),
    ("stages.0.tasks", [{"file": "missing.jsonl"}], "stages[0].tasks[0].file:"),
    ("stages.0.tasks", [{"task": "passkey", "file": "x.jsonl"}], "exactly one of"),
    ("stages.0.tasks", [], "stages[0].tasks: expected a non-empty list"),
    ("modell", {}, "modell: unknown field"),
    ("fitness.retention_target", 1.5, "fitness.retention_target: must be in"),
    ("fitness.retention_weight", -1, "fitness.retention_weight: must be 0 or more"),
    ("memory.shared_prefixes", -1, "memory.shared_prefixes"),
    ("es.sigma0", float("nan"), "es.sigma0: expected a finite number"),
    ("es.sigma0", float("inf"), "es.sigma0: expected a finite number"),
    ("model.dtype", "float33", "model.dtype: unknown dtype 'float33'"),
    ("model.device", "tpu", "model.device: expected auto, cpu, cuda"),
    ("namm.head_dim", 0, "namm.head_dim: NAMM head_dim must be a positive integer"),
    ("namm.mlp_hidden", ["a"], "namm.mlp_hidden: NAMM mlp_hidden: expected a list of positive layer widths"),
    ("namm.sinks", -1, "namm.sinks: NAMM sinks must be a whole number"),
    ("workers.pool", "threads", "workers.pool: expected one of ray, in_process"),
    ("fitness", {"kind": "loglik", "loglik_target": "oracle"}, "fitness.loglik_target: expected one of reference"),
    ("namm.stats_prompts", 0, "namm.stats_prompts: must be positive"),
    ("namm.selection", "top_k", "namm.selection: NAMM selection 'top_k' needs a budget"),
    ("namm.budget", 2.5, "namm: budget 2.5 is neither a fraction"),
    ("workers.torch_threads", 0, "workers.torch_threads: must be positive"),
    ("workers.cpus_per_actor", 0, "workers.cpus_per_actor: must be positive"),
    ("fitness.kind", "accuracy", "fitness.kind: expected one of"),
    ("fitness.loglik_target", "oracle", "fitness.loglik_target"),
    ("es.warm_start", {"imitate": "full"}, "es.warm_start.imitate: expected a baseline with a budget"),
    ("es.warm_start", {"imitate": "h2o:7.5"}, "es.warm_start.imitate"),
    ("es.warm_start", {"imitate": "tova:0.5", "steps": 0}, "es.warm_start.steps: must be positive"),
])
def test_bad_configs_name_the_field(path, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(_with(path, value), base_dir=tmp_path)


def test_missing_required_field_and_bad_yaml(tmp_path):
    data = copy.deepcopy(BASE)
    del data["stages"]
    with pytest.raises(ConfigError, match="stages: required field is missing"):
        config_from_dict(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n' * 3)
    data = _with("stages.0.tasks", [{"file": "data/x.jsonl", "pool_size": 2}])
    data["stages"][0].update(prompts_per_task=1, validation_prompts=1)
    data["checkpoint"] = {"root": "out"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert cfg.stages[0].tasks[0].file == str(tmp_path / "data" / "x.jsonl")
    assert cfg.run_dir == tmp_path / "out" / "t"


@pytest.mark.parametrize("job", ["jobs/smoke.yaml", "jobs/local.yaml", "jobs/smollm2.yaml", "namms/smollm2/evolve.yaml",
                                 "namms/smollm2-topk/evolve.yaml", "namms/smollm2-threshold/evolve.yaml"])
def test_shipped_local_jobs_validate(job):
    cfg = load_config(ROOT / job)
    assert cfg.total_generations > 0
    assert cfg.run_dir.parent == ROOT / "runs"   # every shipped job keeps its runs in <repo>/runs


def test_paper_job_matches_the_paper():
    cfg = load_config(ROOT / "jobs" / "evolve.yaml", check_files=False)
    assert cfg.es.population == 32 and cfg.es.sigma0 == 0.065 and cfg.es.elite_ratio == 0.5
    assert cfg.model.dtype == "bfloat16" and cfg.model.rope_scaling["factor"] == 4.0
    assert cfg.model.max_position_embeddings == 32768 and cfg.workers.gpus_per_actor == 1
    names = [[Path(t.file).stem for t in s.tasks] for s in cfg.stages]
    assert names == [["passage_retrieval_en"], ["passage_retrieval_en", "dureader"],
                     ["passage_retrieval_en", "dureader", "narrativeqa"]]
    assert all(s.prompts_per_task == 64 and s.validation_every == 10 for s in cfg.stages)


def test_runtime_env_and_cluster_config_have_what_ray_needs():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert Path(env["env_vars"]["NAMM_RUN_ROOT"]).is_absolute()
    assert ".venv" in env["excludes"]
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in cluster, key
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install" in c for c in cluster["setup_commands"])


# --- checkpoints ------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_the_newest_k(tmp_path):
    for g in range(5):
        ckpt.write_checkpoint(tmp_path, g, {"g": g, "x": np.arange(g)}, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["gen-000002.ckpt", "gen-000003.ckpt",
                                                                "gen-000004.ckpt"]
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "gen-000004.ckpt" and state["g"] == 4
    assert not list(tmp_path.glob(".ckpt.*")), "no temporary files left"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    for g in range(3):
        ckpt.write_checkpoint(tmp_path, g, {"g": g}, keep=3)
    newest = ckpt.checkpoint_path(tmp_path, 2)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) - 5])
    elif damage == "flip":
        newest.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        newest.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CorruptCheckpoint):
        ckpt.read_checkpoint(newest)
    path, state = ckpt.load_latest(tmp_path)
    assert state["g"] == 1 and path.name == "gen-000001.ckpt"
    assert "corrupt checkpoint" in caplog.text


def test_pickled_es_resumes_bit_identically():
    def run(resume_at=None):
        es = EvolutionStrategy(300, ESConfig(population=8, seed=5))
        for g in range(6):
            if g == resume_at:
                es = EvolutionStrategy.loads(es.dumps())
            xs = es.ask()
            es.tell([-float(np.sum((x - 0.3) ** 2)) for x in xs])
        return es.mean

    assert np.array_equal(run(), run(resume_at=3))


def test_namm_export_writes_the_cma_mean_or_the_best(tmp_path, capsys):
    import torch

    from namm_cli.cli import main
    from namm_core import NAMM

    es = EvolutionStrategy(4172, ESConfig(population=4, seed=1, diagonal=True))
    xs = es.ask()
    es.tell([float(-np.sum(x ** 2)) for x in xs])
    best = np.full(4172, 0.01)
    from orchestrator.state import EvolutionState

    state = EvolutionState(config_hash="x", num_params=4172, model="tiny", sampler=np.random.RandomState(0), es=es,
                           best={"vector": best, "fitness": 1.0, "generation": 0}, global_generation=1,
                           namm_spec={"scorer": "bam", "head_dim": 32, "mlp_hidden": [32]},
                           norm={"mean": np.arange(17, dtype=np.float32), "var": np.ones(17, dtype=np.float32),
                                 "count": 5.0})
    ckpt.write_checkpoint(tmp_path / "checkpoints", 1, state.to_payload())
    assert main(["export", str(tmp_path / "checkpoints"), str(tmp_path / "mean")]) == 0
    mean = NAMM.from_pretrained(tmp_path / "mean")
    assert np.allclose(mean.get_params().numpy(), es.mean.astype(np.float32))
    assert torch.equal(mean.norm_mean, torch.arange(17, dtype=torch.float32))
    assert main(["export", str(ckpt.checkpoint_path(tmp_path / "checkpoints", 1)), str(tmp_path / "best"),
                 "--which", "best"]) == 0
    assert np.allclose(NAMM.from_pretrained(tmp_path / "best").get_params().numpy(), 0.01)
    assert NAMM.from_pretrained(tmp_path / "best").metadata["generation"] == 0          # the best's own
    assert NAMM.from_pretrained(tmp_path / "best").metadata["checkpoint_generation"] == 1
    assert mean.metadata["generation"] == 1
    # the run's own name and file, never the machine's directories
    assert mean.metadata["checkpoint"] == f"{tmp_path.name}/checkpoints/{ckpt.checkpoint_path(tmp_path / 'checkpoints', 1).name}"
    assert main(["export", str(tmp_path / "checkpoints"), str(tmp_path / "start"), "--which", "start"]) == 0
    assert torch.count_nonzero(NAMM.from_pretrained(tmp_path / "start").get_params()) == 0   # this ES started at 0
    assert main(["export", str(tmp_path / "checkpoints"), str(tmp_path / "bv"), "--which", "best-validated"]) == 2
    assert "no best-validated candidate" in capsys.readouterr().err


@pytest.mark.parametrize("target,weight,retention,expected", [
    (None, 1.0, 0.9, (0.5 + 0.05) / (1.0 + 0.05)),          # the paper's fitness: task ratio only
    (0.5, 1.0, 0.9, (0.5 + 0.05) / (1.0 + 0.05) - 0.4),     # 0.4 over the target
    (0.5, 2.0, 0.9, (0.5 + 0.05) / (1.0 + 0.05) - 0.8),
    (0.5, 1.0, 0.3, (0.5 + 0.05) / (1.0 + 0.05)),           # under the target: no bonus
])
def test_fitness_is_the_task_ratio_less_the_retention_over_the_target(target, weight, retention, expected):
    from workers.fitness import candidate_fitness

    fitness = candidate_fitness("task_score", {"passkey@512": ([1.0, 0.0], [1.0, 1.0])}, [retention, retention],
                                retention_target=target, retention_weight=weight)
    assert fitness == pytest.approx(expected)


def test_evolution_state_round_trips_and_refuses_other_versions():
    from orchestrator.state import EvolutionState

    es = EvolutionStrategy(10, ESConfig(population=4, seed=1, diagonal=True))
    state = EvolutionState(config_hash="h", num_params=10, namm_spec={}, model="m",
                           sampler=np.random.RandomState(3), es=es, global_generation=4)
    state.mlflow.parent = "run"
    back = EvolutionState.from_payload(state.to_payload())
    assert back.global_generation == 4 and back.mlflow.parent == "run"
    assert np.array_equal(back.es.mean, es.mean)
    assert back.sampler.randint(1000) == np.random.RandomState(3).randint(1000)
    legacy = state.to_payload()
    legacy["version"] = 1
    legacy["mlflow"] = {"parent": "run", "stages": {}}
    legacy.pop("metrics_log")                # version 1 had no per-generation metrics log
    assert EvolutionState.from_payload(legacy).metrics_log == []
    legacy["version"] = 7
    with pytest.raises(ValueError, match="version 7"):
        EvolutionState.from_payload(legacy, where="gen-000004.ckpt")


def test_task_files_are_checked_when_the_config_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{not json\n')
    with pytest.raises(ConfigError, match=r"stages\[0\]\.tasks\[0\]\.file: .*bad.jsonl:2: not valid JSON"):
        config_from_dict(_with("stages.0.tasks", [{"file": str(bad)}]), base_dir=tmp_path)
    small = tmp_path / "small.jsonl"
    small.write_text('{"input": "q", "context": "c", "answers": ["a"]}\n' * 10)
    data = _with("stages.0.tasks", [{"file": str(small), "pool_size": 8}])
    data["stages"][0]["validation_prompts"] = 4
    with pytest.raises(ConfigError, match="8 training \\+ 4 validation prompts .* need 12 records; .* has 10"):
        config_from_dict(data, base_dir=tmp_path)


def test_task_file_training_and_validation_prompts_are_disjoint(tmp_path):
    from namm_eval.tasks import split_task_file

    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"input": "q{i}", "context": "c", "answers": ["a"]}}\n' for i in range(20)))
    train = split_task_file(path, seed=3, holdout=5, pool_size=15, split="train")
    val = split_task_file(path, seed=3, holdout=5, pool_size=15, split="validation")
    assert len(train) == 15 and len(val) == 5
    assert not {s.input for s in train} & {s.input for s in val}
    assert {s.input for s in val} != {f"q{i}" for i in range(5)}            # shuffled, not the first records
    assert [s.input for s in split_task_file(path, 3, 5, 15, "validation")] == [s.input for s in val]  # seeded
    with pytest.raises(ValueError, match="need 21 records; it has 20"):
        split_task_file(path, seed=3, holdout=5, pool_size=16)


def test_resources_and_context_lengths_are_checked_before_ray(monkeypatch):
    from orchestrator.config import check_context_lengths, check_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = config_from_dict(_with("workers.num_actors", 8))
    with pytest.raises(ConfigError, match="workers.num_actors: 8 actors x 1 CPUs .* need 8 CPUs; the local Ray has 2"):
        check_resources(cfg, num_cpus=2)
    check_resources(config_from_dict(_with("workers.num_actors", 2)), num_cpus=2)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device: 'cuda', but this machine has no CUDA device"):
            check_resources(config_from_dict(_with("model.device", "cuda")), num_cpus=2)
    data = _with("stages.0.tasks", [{"task": "passkey", "context_length": 1_000_000, "pool_size": 4}])
    data["model"] = {"tiny_random": {"architecture": "llama"}}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.tasks\[0\]\.context_length: 1000000 tokens is beyond "
                                          "the model's window of 8192"):
        check_context_lengths(config_from_dict(data))


def test_a_namm_setting_added_later_leaves_older_runs_hash_as_it_was():
    """jobs/smoke.yaml hashed 2d2aa5333072e7d0 (root /tmp/oldwt/runs) before namm.score_layers
    existed: at its default the run still resumes; set, it is another run."""
    from dataclasses import replace

    from orchestrator.config import load_config
    from orchestrator.driver import config_hash

    cfg = load_config(ROOT / "jobs" / "smoke.yaml", check_files=False)
    cfg.checkpoint.root = Path("/tmp/oldwt/runs")
    assert config_hash(cfg) == "2d2aa5333072e7d0"
    cfg.namm = replace(cfg.namm, scope="global", selection="top_k", budget="0.5", score_layers=1)
    assert config_hash(cfg) != "2d2aa5333072e7d0"
