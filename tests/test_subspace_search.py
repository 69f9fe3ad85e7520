"""Evolution's search levers. CMA-ES in a subspace of the NAMM's parameters (es.subspace): what
leaves the search is always the full vector, unchanged outside the subspace; resume is exact.
Candidates compared prompt by prompt (fitness.per_prompt). Bad configs are named."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from namm_core import NAMM, NAMMConfig
from orchestrator.config import ConfigError, ESConfig, config_from_dict
from orchestrator.driver import EvolutionRun
from orchestrator.es import EvolutionStrategy
from orchestrator.subspace import Subspace, build_subspace, param_indices
from workers.fitness import per_prompt_fitness

ROOT = Path(__file__).resolve().parent.parent
SLICES = NAMM(NAMMConfig()).param_slices()
NUM_PARAMS = NAMM(NAMMConfig()).num_params


def test_param_slices_tile_the_flat_vector_in_its_order():
    namm = NAMM(NAMMConfig())
    vector = np.arange(namm.num_params, dtype=np.float32)
    namm.set_params(vector)
    starts = sorted(s.start for s in SLICES.values())
    assert starts[0] == 0 and max(s.stop for s in SLICES.values()) == namm.num_params
    for name, param in namm.scorer.named_parameters():
        assert np.array_equal(param.detach().flatten().numpy(), vector[SLICES[name]])


def test_param_indices_take_a_group_or_one_tensor():
    readout = param_indices(SLICES, ["readout"])
    assert list(readout) == list(range(SLICES["readout.weight"].start, SLICES["readout.bias"].stop))
    assert list(param_indices(SLICES, ["readout.bias"])) == [SLICES["readout.bias"].start]
    both = param_indices(SLICES, ["readout", "modulation"])
    assert len(both) == 25 + 1 + 32 * 50 + 50
    with pytest.raises(ValueError, match="unknown parameter group 'read'.*qkv, modulation, readout"):
        param_indices(SLICES, ["read"])


def _toy_target(seed: int = 3) -> np.ndarray:
    return np.random.RandomState(seed).randn(NUM_PARAMS)


def _run(es: EvolutionStrategy, generations: int, target: np.ndarray) -> list[np.ndarray]:
    """A few generations on fitness -|x - target|^2; returns every candidate asked."""
    asked = []
    for _ in range(generations):
        candidates = es.ask()
        asked += candidates
        es.tell([-float(np.sum((c - target) ** 2)) for c in candidates])
    return asked


def test_a_coordinate_subspace_leaves_every_other_weight_at_the_start():
    start = np.random.RandomState(0).randn(NUM_PARAMS) * 0.1
    space = Subspace(NUM_PARAMS, indices=param_indices(SLICES, ["readout", "modulation"]))
    es = EvolutionStrategy(NUM_PARAMS, ESConfig(population=8, sigma0=0.05, diagonal=True), x0=start, subspace=space)
    assert es.search_dim == space.dim and np.array_equal(es.start, start)
    asked = _run(es, 4, _toy_target())
    outside = np.setdiff1d(np.arange(NUM_PARAMS), space.indices)
    for x in asked + [es.mean]:
        assert x.shape == (NUM_PARAMS,)
        assert np.array_equal(x[outside], start[outside])
    assert any(not np.allclose(x[space.indices], start[space.indices]) for x in asked)


def test_a_random_subspace_steps_along_its_orthonormal_directions_only():
    start = np.zeros(NUM_PARAMS)
    space = Subspace(NUM_PARAMS, random_dim=12, seed=5)
    basis = space.basis
    assert basis.shape == (NUM_PARAMS, 12)
    assert np.allclose(basis.T @ basis, np.eye(12), atol=1e-10)
    es = EvolutionStrategy(NUM_PARAMS, ESConfig(population=8, sigma0=0.05), x0=start, subspace=space)
    for x in _run(es, 3, _toy_target()):
        step = x - start
        assert np.linalg.norm(step - basis @ (basis.T @ step)) < 1e-9 * max(1.0, np.linalg.norm(step))


def test_the_subspace_search_improves_a_toy_fitness_it_can_reach():
    """Inside the subspace the optimum is reachable: the mean must move toward it."""
    start = np.zeros(NUM_PARAMS)
    space = Subspace(NUM_PARAMS, indices=param_indices(SLICES, ["readout"]))
    target = np.zeros(NUM_PARAMS)
    target[space.indices] = 0.3
    es = EvolutionStrategy(NUM_PARAMS, ESConfig(population=10, sigma0=0.1, diagonal=True), x0=start, subspace=space)
    _run(es, 40, target)
    assert np.sum((es.mean - target) ** 2) < 0.2 * np.sum((start - target) ** 2)


@pytest.mark.parametrize("space", [
    lambda: Subspace(NUM_PARAMS, indices=param_indices(SLICES, ["readout"])),
    lambda: Subspace(NUM_PARAMS, random_dim=9, seed=2),
])
def test_a_subspace_search_resumed_from_its_bytes_equals_the_uninterrupted_one(space):
    cfg = ESConfig(population=6, sigma0=0.05, seed=4, diagonal=True)
    start = np.random.RandomState(1).randn(NUM_PARAMS) * 0.01
    target = _toy_target()
    whole = EvolutionStrategy(NUM_PARAMS, cfg, x0=start, subspace=space())
    whole_asked = _run(whole, 6, target)
    first = EvolutionStrategy(NUM_PARAMS, cfg, x0=start, subspace=space())
    first_asked = _run(first, 3, target)
    data = first.dumps()
    if first.subspace.random_dim:   # the basis is rebuilt from its seed, not stored
        assert len(data) < first.subspace.basis.nbytes / 4
    resumed = EvolutionStrategy.loads(data)
    resumed_asked = first_asked + _run(resumed, 3, target)
    assert all(np.array_equal(a, b) for a, b in zip(whole_asked, resumed_asked))
    assert np.array_equal(whole.mean, resumed.mean)


def test_a_start_or_subspace_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="4172 parameters"):
        EvolutionStrategy(NUM_PARAMS, ESConfig(), x0=np.zeros(10))
    with pytest.raises(ValueError, match="subspace is for 100 parameters"):
        EvolutionStrategy(NUM_PARAMS, ESConfig(), subspace=Subspace(100, random_dim=4))


def _smoke(tmp_path: Path, name: str, subspace) -> dict:
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data.update(name=name, checkpoint={"root": str(tmp_path / "runs"), "keep": 3},
                tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"})
    data["workers"]["pool"] = "in_process"
    if subspace is not None:
        data["es"]["subspace"] = subspace
    return data


@pytest.mark.parametrize("subspace,error", [
    ({"params": ["readout"], "random_dim": 8}, "es.subspace: give exactly one"),
    ({}, "es.subspace: give exactly one"),
    ({"params": ["head"]}, "es.subspace.params: unknown parameter group 'head'"),
    ({"params": "readout"}, "es.subspace.params: expected a list"),
    ({"params": ["readout.bias"]}, "es.subspace.params: pycma needs at least 2"),
    ({"random_dim": 1}, "es.subspace.random_dim: expected a whole number >= 2"),
    ({"random_dim": 10 ** 6}, "es.subspace.random_dim: 1000000 is more than"),
    ({"dims": 4}, "es.subspace.dims: unknown field"),
])
def test_a_bad_subspace_config_names_the_field(tmp_path, subspace, error):
    with pytest.raises(ConfigError, match=error):
        config_from_dict(_smoke(tmp_path, "bad", subspace), base_dir=tmp_path)


def test_build_subspace_follows_the_config(tmp_path):
    cfg = config_from_dict(_smoke(tmp_path, "ok", {"params": ["readout", "modulation"]}), base_dir=tmp_path)
    space = build_subspace(cfg.es.subspace, SLICES, NUM_PARAMS, seed=0)
    assert space.dim == 1676 and space.describe() == "readout+modulation"
    assert build_subspace(None, SLICES, NUM_PARAMS, seed=0) is None


def test_an_evolution_run_in_a_subspace_moves_only_its_coordinates_and_resumes_exactly(tmp_path):
    """The whole driver (in-process pool): what is evaluated, checkpointed and exported is the
    full vector; outside the readout it is the start's; a stopped run resumes to the same mean."""
    data = _smoke(tmp_path, "readout-only", {"params": ["readout"]})
    full = EvolutionRun(config_from_dict(data, base_dir=tmp_path)).run()
    data_stopped = dict(data, name="readout-stopped")
    EvolutionRun(config_from_dict(data_stopped, base_dir=tmp_path), stop_after=1).run()
    resumed = EvolutionRun(config_from_dict(data_stopped, base_dir=tmp_path)).run()
    assert full["generations"] == resumed["generations"] == 3
    assert np.array_equal(resumed["mean"], full["mean"])
    readout = param_indices(SLICES, ["readout"])
    outside = np.setdiff1d(np.arange(NUM_PARAMS), readout)
    assert np.all(np.asarray(full["mean"])[outside] == 0)           # the smoke run starts at zero
    assert np.any(np.asarray(full["mean"])[readout] != 0)
    exported = NAMM.from_pretrained(Path(tmp_path, "runs", "readout-only", "artifacts", "namm_latest"))
    assert np.array_equal(exported.get_params().numpy()[outside], np.zeros(len(outside), dtype=np.float32))


# --- fitness.per_prompt -------------------------------------------------------------------------
def test_per_prompt_ranks_share_ties_and_leave_failed_candidates_out():
    values = [[1.0, 0.2], [3.0, 0.2], [2.0, 0.9], [np.nan, np.nan]]
    got = per_prompt_fitness(values, "rank")
    # prompt 0 ranks 0, 1, 0.5; prompt 1: the tie shares ranks 1 and 2 of 3 -> 0.25 each, 0.9 -> 1
    assert np.allclose(got[:3], [0.125, 0.625, 0.75]) and np.isnan(got[3])
    assert np.allclose(per_prompt_fitness(values[:3], "rank"), got[:3])


def test_per_prompt_zscores_ignore_what_every_candidate_shares():
    rng = np.random.RandomState(0)
    values = rng.randn(6, 5)
    shifted = values + rng.randn(5) * 10            # a per-prompt difficulty common to all candidates
    assert np.allclose(per_prompt_fitness(values, "zscore"), per_prompt_fitness(shifted, "zscore"))
    expected = ((values - values.mean(0)) / values.std(0)).mean(1)
    assert np.allclose(per_prompt_fitness(values, "zscore"), expected)
    flat = np.ones((4, 3))
    assert np.array_equal(per_prompt_fitness(flat, "zscore"), np.zeros(4))


def test_one_wide_prompt_decides_the_mean_but_not_the_per_prompt_ranking():
    # candidate 0 is best on four prompts by a little; candidate 1 wins one prompt by a lot
    values = np.array([[0.1, 0.1, 0.1, 0.1, -5.0],
                       [0.0, 0.0, 0.0, 0.0, 5.0]])
    assert values.mean(1)[1] > values.mean(1)[0]
    ranked = per_prompt_fitness(values, "rank")
    assert ranked[0] > ranked[1]


def test_cma_es_is_told_the_per_prompt_ranking_and_the_log_keeps_the_fitness(tmp_path, monkeypatch):
    told = []
    original = EvolutionStrategy.tell
    monkeypatch.setattr(EvolutionStrategy, "tell", lambda self, f: told.append(list(f)) or original(self, f))
    data = _smoke(tmp_path, "ranked", None)
    data["fitness"] = {"per_prompt": "rank"}
    run = EvolutionRun(config_from_dict(data, base_dir=tmp_path))
    run.run()
    assert len(told) == 3 and all(len(t) == 6 for t in told)
    for g, values in enumerate(told):
        assert all(0 <= v <= 1 for v in values)
        assert np.isclose(np.mean(values), 0.5)                   # ranks of 6 candidates average 1/2
        logged = [row["fitness"] for row in run.state.history if row["generation"] == g]
        assert len(logged) == 6 and not np.allclose(logged, values)   # the history keeps the fitness itself


@pytest.mark.parametrize("fitness,error", [
    ({"per_prompt": "ranks"}, "fitness.per_prompt: expected one of none, rank, zscore"),
    ({"per_prompt": "rank", "retention_target": 0.5}, "fitness.per_prompt: a per-prompt ranking has no scale"),
])
def test_a_bad_per_prompt_setting_names_the_field(tmp_path, fitness, error):
    data = _smoke(tmp_path, "bad", None)
    data["fitness"] = fitness
    with pytest.raises(ConfigError, match=error):
        config_from_dict(data, base_dir=tmp_path)


def test_a_subspace_or_per_prompt_ranking_makes_another_run(tmp_path):
    """At their defaults the new settings leave the hash as it was (older runs resume); set, they
    change it (a checkpoint of one cannot be resumed as the other)."""
    from orchestrator.driver import config_hash

    plain = config_from_dict(_smoke(tmp_path, "h", None), base_dir=tmp_path)
    explicit = _smoke(tmp_path, "h", None)
    explicit["fitness"] = {"per_prompt": "none"}
    assert config_hash(config_from_dict(explicit, base_dir=tmp_path)) == config_hash(plain)
    subspace = config_from_dict(_smoke(tmp_path, "h", {"random_dim": 8}), base_dir=tmp_path)
    ranked = _smoke(tmp_path, "h", None)
    ranked["fitness"] = {"per_prompt": "rank"}
    hashes = {config_hash(plain), config_hash(subspace), config_hash(config_from_dict(ranked, base_dir=tmp_path))}
    assert len(hashes) == 3


# --- es.start -----------------------------------------------------------------------------------
def _saved_namm(tmp_path: Path, cfg, seed: int = 7, **changes) -> Path:
    """A NAMM of this run's kind with random weights and normalisation statistics, saved."""
    from dataclasses import replace

    namm_cfg = replace(NAMMConfig.from_spec(cfg.namm_spec()), **changes)
    rng = np.random.RandomState(seed)
    blank = NAMM(namm_cfg)
    n, width = blank.num_params, blank.norm_mean.numel()
    norm = {"mean": rng.randn(width).astype(np.float32), "var": rng.rand(width).astype(np.float32) + 0.5,
            "count": 1234.0}
    out = tmp_path / f"start-{seed}"
    NAMM.from_vector(rng.randn(n) * 0.01, norm, namm_cfg).save_pretrained(out)
    return out


def test_a_run_from_a_saved_namm_starts_at_its_weights_and_statistics(tmp_path):
    from orchestrator.pool import in_process_pool

    data = _smoke(tmp_path, "from-saved", {"params": ["readout", "modulation"]})
    saved_dir = _saved_namm(tmp_path, config_from_dict(data, base_dir=tmp_path))
    data["es"]["start"] = str(saved_dir)
    methods = []

    def recording_pool(cfg):
        pool = in_process_pool(cfg)
        run = pool.run
        pool.run = lambda batch: methods.extend(j.method for j in batch) or run(batch)
        return pool

    run = EvolutionRun(config_from_dict(data, base_dir=tmp_path), pool_factory=recording_pool)
    summary = run.run()
    saved = NAMM.from_pretrained(saved_dir)
    assert "collect_statistics" not in methods and "warm_start" not in methods
    assert np.array_equal(run.state.norm["mean"], saved.norm_mean.numpy())
    assert np.array_equal(run.state.norm["var"], saved.norm_var.numpy()) and run.state.norm["count"] == 1234.0
    assert np.array_equal(run.state.es.start, saved.get_params().double().numpy())
    outside = np.setdiff1d(np.arange(NUM_PARAMS), param_indices(SLICES, ["readout", "modulation"]))
    assert np.array_equal(np.asarray(summary["mean"])[outside], saved.get_params().double().numpy()[outside])


def test_a_saved_start_of_another_kind_or_beside_a_warm_start_is_refused(tmp_path):
    data = _smoke(tmp_path, "bad-start", None)
    cfg = config_from_dict(data, base_dir=tmp_path)
    data["es"]["start"] = str(_saved_namm(tmp_path, cfg, scope="global", selection="top_k", budget="0.5"))
    with pytest.raises(ConfigError, match="es.start: .* has selection 'top_k', this run's NAMM has 'threshold'"):
        config_from_dict(data, base_dir=tmp_path)
    data["es"]["start"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="es.start: not a NAMM directory"):
        config_from_dict(data, base_dir=tmp_path)
    data["es"]["start"] = str(_saved_namm(tmp_path, cfg, seed=8))
    data["es"]["warm_start"] = {"imitate": "streamingllm:0.5"}
    with pytest.raises(ConfigError, match="es.start: a run starts from a saved NAMM or from a warm start, not both"):
        config_from_dict(data, base_dir=tmp_path)
