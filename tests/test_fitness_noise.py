"""The statistics of bench/fitness_noise.py: what share of a generation's ranking is the candidates."""
import numpy as np
import pytest

from bench.fitness_noise import analyse, prompt_sets, variance_components


def test_variance_components_recover_known_effects():
    rng = np.random.default_rng(0)
    rows, cols = 400, 300
    x = (rng.normal(0, 2.0, (rows, 1)) + rng.normal(0, 0.5, (1, cols)) + rng.normal(0, 1.0, (rows, cols)))
    cand, col, resid = variance_components(x)
    assert cand == pytest.approx(4.0, rel=0.2)
    assert col == pytest.approx(0.25, rel=0.3)
    assert resid == pytest.approx(1.0, rel=0.05)


def test_prompt_sets_are_disjoint_and_generation_sized():
    tasks = [{"key": "a@1024", "pool_size": 10}, {"key": "b@1024", "pool_size": 10}]
    sets = prompt_sets(tasks, per_task=2, sets=4, seed=1)
    assert [len(s) for s in sets] == [4, 4, 4, 4]
    flat = [r for s in sets for r in s]
    assert len(set(flat)) == len(flat)
    assert all(sum(1 for key, _ in s if key == "a@1024") == 2 for s in sets)
    with pytest.raises(SystemExit, match="pool_size"):
        prompt_sets(tasks, per_task=3, sets=4, seed=1)


def _sets(n_sets, per_set):
    return [[(f"t{j % 2}@1", s * per_set + j) for j in range(per_set)] for s in range(n_sets)]


@pytest.mark.parametrize("candidate_sd, expect_reliable", [(1.0, True), (0.0, False)])
def test_analyse_tells_candidates_from_prompt_noise(candidate_sd, expect_reliable):
    rng = np.random.default_rng(3)
    n_cand, n_sets, per_set = 12, 4, 12
    sets = _sets(n_sets, per_set)
    prompts = n_sets * per_set
    refs = np.zeros(prompts)
    effect = rng.normal(0, candidate_sd, (n_cand, 1))
    values = -1.0 + 0.1 * effect + rng.normal(0, 0.05, (n_cand, prompts))  # log-likelihood differences
    start = np.full(prompts, -1.0)
    row = analyse("loglik", 0.03, values, refs, sets, start)
    icc = float(row["ICC (one set)"])
    rho = float(row["Spearman between sets"])
    if expect_reliable:
        assert icc > 0.8 and rho > 0.7
    else:
        assert icc < 0.3 and abs(rho) < 0.5


def test_raw_rows_are_reused_only_for_the_same_config_prompts_and_candidates(tmp_path):
    from bench.fitness_noise import load_raw, save_raw

    sets = _sets(2, 4)
    requests = [r for s in sets for r in s]
    values = np.arange(3 * len(requests), dtype=float).reshape(3, len(requests))
    measured = {"loglik": {"refs": np.zeros(len(requests)), "start": np.ones(len(requests)), "values": {0.03: values}}}
    out = tmp_path / "noise.md"
    save_raw(out, "jobs/a.yaml", measured, requests, sets)
    back = load_raw(out, "jobs/a.yaml", requests, candidates=3)
    assert np.array_equal(back["loglik"]["values"][0.03], values)
    assert np.array_equal(back["loglik"]["start"], measured["loglik"]["start"])
    assert load_raw(out, "jobs/b.yaml", requests, candidates=3) == {}
    assert load_raw(out, "jobs/a.yaml", requests[::-1], candidates=3) == {}
    assert load_raw(out, "jobs/a.yaml", requests, candidates=4) == {}
