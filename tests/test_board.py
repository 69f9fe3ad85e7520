"""The board (bench/namm_board.py): worker processes give the same rows as one process, and a rerun
reuses every stored row except those of a NAMM whose weights changed."""
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import namm_board  # noqa: E402
from namm_core import NAMM, NAMMConfig  # noqa: E402

CELL = "tiny-random:300:0.5:1"
TASKS = "passkey,qa"


def budgeted_namm(directory: Path, seed: int, **config) -> Path:
    namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", **config))
    namm.set_params(torch.randn(namm.num_params, generator=torch.Generator().manual_seed(seed)) * 0.1)
    namm.save_pretrained(directory)
    return directory


def board(namm_dir: Path, out: Path, workers: int, dtype: str = "float32", cell: str = CELL,
          baselines: str = "streamingllm,tova,kvzip", controls: str = "tova") -> list[dict]:
    assert namm_board.main(["--cell", cell, "--tasks", TASKS, "--namm", str(namm_dir), "--workers", str(workers),
                            "--dtype", dtype, "--out-dir", str(out), "--baselines", baselines,
                            "--controls", controls]) == 0
    return pq.read_table(out / "namm_board.parquet").to_pylist()


def outcome(rows: list[dict]) -> dict:
    return {(r["policy"], r["fingerprint"], r["sample_id"]): (r["score"], r["prediction"], r["retention_per_layer"])
            for r in rows}


def test_workers_equal_one_process_and_reruns_compute_only_what_changed(tmp_path):
    first = budgeted_namm(tmp_path / "namm_a", seed=1, scope="global", pool=3, sinks=2)
    one = board(first, tmp_path / "one", workers=1)
    # full, FastGen, the NAMM at 0.5, three baselines and TOVA in the NAMM's structure, on 2 prompts
    assert len(one) == 2 * 7 and {r["dtype"] for r in one} == {"float32"}
    assert {r["policy"] for r in one} >= {"tova:0.5", "tova:0.5/global/pool=3/sinks=2", "kvzip:0.5"}
    text = (tmp_path / "one" / "namm_board.md").read_text()
    # per task group (all tasks, without passkey), the summary's means and verdicts, and the one section
    assert [line.startswith("| full |") for line in text.splitlines()].count(True) == 5
    assert text.count("### All sections") == 1 and text.count("### tiny-random, 300 tokens, 0.5 of the cache") == 1
    assert "#### Mean over without passkey" in text and "Plan: seed 7; tasks passkey, qa;" in text
    assert text.startswith("Command: `bench/namm_board.py --cell tiny-random:300:0.5:1")

    two = board(first, tmp_path / "two", workers=2)
    assert outcome(two) == outcome(one), "two worker processes give the rows one process gives"

    again = board(first, tmp_path / "one", workers=2)
    assert len(again) == len(one) and outcome(again) == outcome(one), "a rerun computes nothing"

    # new weights in the same directory: same policy name, so only the weights tell the rows apart
    budgeted_namm(first, seed=2, scope="global", pool=3, sinks=2)
    rows = board(first, tmp_path / "one", workers=1)
    new = rows[len(one):]
    assert len(new) == 2 and {r["policy"] for r in new} == {f"namm:{first}@0.5"}
    assert len({r["fingerprint"] for r in rows if r["policy"].startswith("namm")}) == 2

    # another hyperparameter of a baseline: only its own rows
    rows = board(first, tmp_path / "one", workers=1, baselines="streamingllm,tova,kvzip/overlap=4")
    assert [r["policy"] for r in rows[-2:]] == ["kvzip:0.5/overlap=4"] * 2 and len(rows) == len(one) + 4

    # other weights dtype, or another evaluation version: nothing reused
    assert len(board(first, tmp_path / "one", workers=1, dtype="bfloat16")) == len(rows) + 14
    rows = pq.read_table(tmp_path / "one" / "namm_board.parquet").to_pylist()
    for row in rows:
        row["eval_version"] -= 1
    from namm_eval.report import write_parquet_atomic

    write_parquet_atomic(rows, tmp_path / "one" / "namm_board.parquet")
    assert len(board(first, tmp_path / "one", workers=1)) == len(rows) + 14


def test_the_peers_protocol_compresses_once_and_runs_no_controls(tmp_path):
    """kvpress's protocols as board cells: one update per prompt (after the context, or after the
    question too), no structure controls and no FastGen; the section says the peak is the full cache."""
    namm_dir = budgeted_namm(tmp_path / "namm", seed=1, scope="global", pool=3, sinks=2)
    rows = board(namm_dir, tmp_path / "out", workers=1, cell="tiny-random:300:0.5:1:agnostic")
    assert {r["protocol"] for r in rows} == {"agnostic"}
    assert {r["policy"] for r in rows} == {"full", f"namm:{namm_dir}@0.5", "streamingllm:0.5", "tova:0.5", "kvzip:0.5"}
    text = (tmp_path / "out" / "namm_board.md").read_text()
    assert "agnostic protocol" in text and "the peak KV is the full cache's" in text
    for row in rows:   # the context is compressed, the question and the reply are not
        assert row["policy"] == "full" or 0.5 < row["retention"] < 1.0

def test_rows_written_before_a_column_existed_keep_the_new_columns(tmp_path):
    from namm_eval.report import write_parquet_atomic

    path = write_parquet_atomic([{"policy": "full"}, {"policy": "h2o:0.5", "dtype": "bfloat16"}], tmp_path / "r.parquet")
    assert pq.read_table(path).to_pylist() == [{"policy": "full", "dtype": None},
                                               {"policy": "h2o:0.5", "dtype": "bfloat16"}]


def test_a_score_threshold_namm_gives_the_baselines_its_retention(tmp_path):
    directory = tmp_path / "threshold"
    NAMM().save_pretrained(directory)     # zero scores: keeps everything, retention 1.0
    rows = board(directory, tmp_path / "out", workers=1)
    assert {r["policy"] for r in rows} >= {f"namm:{directory}", "streamingllm:1.0", "tova:1.0"}


def test_bad_worker_count_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--workers and --threads must be at least 1"):
        namm_board.main(["--cell", CELL, "--workers", "0", "--out-dir", str(tmp_path)])


def test_every_namm_directory_is_its_own_curve_in_the_plot(tmp_path):
    """A NAMM and its warm start are two legend entries; one NAMM's budgets join into one curve."""
    from namm_eval.report import _plot_family, plot_score_vs_retention

    assert _plot_family("namm:namms/smollm2@0.5") == _plot_family("namm:namms/smollm2@0.25") == "namm smollm2"
    assert _plot_family("namm:namms/smollm2-warm-start@0.5") == "namm smollm2-warm-start"
    assert _plot_family("namm@0.25") == "namm" and _plot_family("h2o:0.5") == "h2o"
    rows = [{"sample_id": f"passkey-{i}", "task": "passkey", "policy": p, "score": float(i % 2), "retention": r,
             "peak_kv_bytes": 1, "seconds": 1.0}
            for p, r in [("full", 1.0), ("namm:a/n@0.5", 0.5), ("namm:a/n-warm@0.5", 0.5)] for i in range(4)]
    assert plot_score_vs_retention(rows, tmp_path / "p.png").stat().st_size > 0


def test_namm_variants_take_lists_of_layers_and_the_plan_names_them():
    assert namm_board.split_variants("layers=6,layers=5,12,28, layers=2") == ["layers=6", "layers=5,12,28", "layers=2"]
    assert namm_board.split_variants("") == []
    namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", scope="global"))
    namm.source = "namms/x"
    assert namm_board.namm_at_b(namm.scoring_from([5, 12, 28])) == "namms/x@B/layers=5,12,28"
    assert namm_board.namm_at_b(namm) == "namms/x@B"


def test_a_namm_variant_keeps_every_option_of_its_spec():
    namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", scope="global"))
    namm.source = "namms/x"
    both = namm_board.variant(namm, "rows=64/window=256")
    assert (both.config.observe_rows, both.config.bam_window) == (64, 256)
    assert namm_board.namm_at_b(both) == "namms/x@B/window=256/rows=64"
