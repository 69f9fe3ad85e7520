"""`namm eval`, the Evaluator and task files: outputs, crops, references, bad input."""
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from namm_cli.cli import main
from namm_core import NAMM, FullCache, parse_policy
from namm_core.models import tiny_random_model
from namm_eval.evaluator import Evaluator
from namm_eval.tasks import load_tasks
from namm_eval.tasks.files import load_task_file


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the embedded model's tokenizer, saved as a local model directory."""
    model, tok = tiny_random_model(architecture="llama", seed=0, max_position_embeddings=900)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from namm_core import load_model

    return load_model(str(tiny_dir), device="cpu")


def test_namm_eval_writes_parquet_plot_and_table(tiny_dir, tmp_path, capsys):
    namm = NAMM()
    namm.set_params(torch.randn(namm.num_params, generator=torch.Generator().manual_seed(0)) * 0.3)
    namm.save_pretrained(tmp_path / "namm")
    out = tmp_path / "res" / "eval.parquet"
    code = main(["eval", "--model", str(tiny_dir), "--policy", "full", "--policy", "h2o:0.5",
                 "--policy", f"namm:{tmp_path / 'namm'}", "--baselines-at-namm-retention",
                 "--tasks", "passkey,fidelity", "--num-prompts", "2", "--context-length", "600",
                 "--update-every", "128", "--chunk-size", "128", "--out", str(out)])
    assert code == 0
    rows = pq.read_table(out).to_pylist()
    policies = {r["policy"] for r in rows}
    assert {"full", "h2o:0.5"} <= policies and any(p.startswith("namm:") for p in policies)
    assert {p.split(":")[0] for p in policies} >= {"streamingllm", "l2", "snapkv", "tova", "h2o"}
    assert len(rows) == 4 * len(policies)               # 2 tasks x 2 prompts, every policy
    for column in ("sample_id", "task", "policy", "score", "prediction", "retention", "peak_kv_bytes",
                   "seconds", "prompt_tokens", "cropped_tokens", "kl", "perplexity", "model", "seed"):
        assert column in rows[0], column
    full = [r for r in rows if r["policy"] == "full"]
    assert all(r["retention"] == 1.0 for r in full)
    assert all(r["score"] == 1.0 for r in full if r["task"] == "fidelity")   # the full cache agrees with itself
    assert out.with_suffix(".png").stat().st_size > 1000 and out.with_suffix(".md").exists()
    table = capsys.readouterr().out
    assert "fidelity" in table and "passkey" in table and "retention" in table


def test_baselines_get_a_budgeted_namms_budget_not_its_measured_retention(tiny_dir, tmp_path, capsys):
    """A NAMM keeping a fixed share gets baselines at that share, as on the board (its measured
    retention at the end of a generation is higher: the reply is never evicted)."""
    NAMM().set_params(torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.3).save_pretrained(
        tmp_path / "namm")
    out = tmp_path / "eval.parquet"
    assert main(["eval", "--model", str(tiny_dir), "--policy", f"namm:{tmp_path / 'namm'}@0.25",
                 "--baselines-at-namm-retention", "--tasks", "passkey", "--num-prompts", "1", "--context-length", "400",
                 "--update-every", "64", "--chunk-size", "64", "--out", str(out)]) == 0
    policies = {r["policy"] for r in pq.read_table(out).to_pylist()}
    assert {"streamingllm:0.25", "tova:0.25", "expected_attention:0.25", "kvzip:0.25"} <= policies
    assert "baselines at the NAMM's budget 0.25" in out.with_suffix(".md").read_text()
    assert "baselines at the NAMM's budget 0.25" in capsys.readouterr().out


def test_every_policy_sees_the_same_prompts_and_references_are_cached(tiny):
    model, tok = tiny
    samples = load_tasks(["niah_single"], tok, num_prompts=2, context_length=500, seed=1)
    ev = Evaluator(model, tok, update_every=128, chunk_size=128)
    ref = ev.reference(samples)
    again = ev.reference(samples)
    assert all(ref[s.sample_id] is again[s.sample_id] for s in samples), "computed once per prompt"
    a = ev.evaluate(samples, parse_policy("l2:0.5"))
    assert [r.sample_id for r in a] == [s.sample_id for s in samples]
    assert all(r.prompt_tokens == ev.encode(s)[0].shape[1] for r, s in zip(a, samples))


def test_long_context_is_cropped_in_the_middle_and_reported(tiny, caplog):
    model, tok = tiny
    samples = load_tasks(["niah_single"], tok, num_prompts=1, context_length=1500, seed=0)
    ev = Evaluator(model, tok)
    ids, cropped = ev.encode(samples[0])
    assert ids.shape[1] <= 900 - samples[0].max_new_tokens
    assert cropped > 500
    assert "cropped" in caplog.text
    result = ev.run_sample(samples[0], FullCache())
    assert result.cropped_tokens == cropped


def _write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_longbench_format_files(tmp_path):
    f = _write_jsonl(tmp_path / "hotpotqa.jsonl", [
        {"input": "Who?", "context": "Alice met Bob.", "answers": ["Alice"], "dataset": "hotpotqa", "_id": "x1"},
        {"input": "Class?", "context": "ex", "answers": ["A"], "all_classes": ["A", "B"], "dataset": "trec"},
    ])
    s = load_task_file(f)
    assert s[0].metric == "qa_f1_score" and s[0].max_new_tokens == 32 and s[0].sample_id == "x1"
    assert "Alice met Bob." in s[0].prompt() and "Who?" in s[0].prompt()
    assert s[1].metric == "classification_score" and s[1].all_classes == ["A", "B"]
    templates = tmp_path / "t.json"
    templates.write_text(json.dumps({"hotpotqa": "CTX={context} Q={input}"}))
    assert load_task_file(f, templates_file=str(templates))[0].prompt() == "CTX=Alice met Bob. Q=Who?"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"input": "q", "context": "c", "answers": ["a"]}]), tmp_path / "mine.parquet")
    mine = load_task_file(tmp_path / "mine.parquet")
    assert mine[0].task == "mine" and mine[0].answers == ["a"]


@pytest.mark.parametrize("content,message", [
    ('{"input": "q", "answers": ["a"]}\n', r"x.jsonl:1: missing field\(s\) \['context'\]"),
    ('{"input": "q", "context": "c", "answers": ["a"]}\n{oops\n', r"x.jsonl:2: not valid JSON"),
    ('{"input": "q", "context": "c", "answers": []}\n', r"x.jsonl:1: 'answers' must be a non-empty list"),
    ("\n\n", r"x.jsonl is empty"),
])
def test_bad_task_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task_file(tmp_path / "x.jsonl")


def test_bad_eval_arguments_fail_before_loading_the_model(tmp_path, capsys):
    assert main(["eval", "--policy", "h2o:1.5", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "neither a fraction" in capsys.readouterr().err
    assert main(["eval", "--policy", "full", "--baselines-at-namm-retention"]) == 2
    assert not (tmp_path / "x.parquet").exists(), "nothing half-written"


def test_unknown_task_spec(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="unknown task 'passkee'"):
        load_tasks(["passkee"], tok, 1, 500, 0)
    with pytest.raises(FileNotFoundError):
        load_tasks(["missing.parquet"], tok, 1, 500, 0)


@pytest.mark.slow
def test_smollm2_full_cache_answers_passkey_at_4k(smollm2):
    model, tok = smollm2
    samples = load_tasks(["passkey"], tok, num_prompts=3, context_length=4096, seed=11)
    results = Evaluator(model, tok).evaluate(samples, FullCache())
    assert all(abs(r.prompt_tokens - 4096) < 0.05 * 4096 for r in results)
    assert sum(r.score for r in results) >= 2, [r.prediction for r in results]


def test_task_file_metric_and_per_dataset_prompt_counts(tmp_path):
    rows = [{"input": f"q{i}", "context": "c", "answers": ["42"], "dataset": d}
            for d in ("alpha", "beta") for i in range(5)]
    rows[0]["metric"] = "contains_answer"
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_task_file(path, limit=3)
    assert [s.task for s in samples] == ["alpha"] * 3 + ["beta"] * 3      # per dataset, not the first 3 records
    assert samples[0].metric == "contains_answer" and samples[1].metric == "qa_f1_score"
    forced = load_task_file(path, limit=2, metric="contains_answer")
    assert {s.metric for s in forced} == {"contains_answer"}
    from namm_eval.metrics import score_prediction

    assert score_prediction("The answer is 42.", ["42"], "contains_answer") == 1.0
    assert score_prediction("The answer is 42.", ["42"], "qa_f1_score") < 1.0
    rows[1]["metric"] = "no_such_metric"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="mixed.jsonl:2: metric 'no_such_metric'"):
        load_task_file(path)
    with pytest.raises(ValueError, match="metric 'nope' is not known"):
        load_task_file(path, metric="nope")


def test_eval_table_intervals_comparisons_and_the_real_prompt_length(tiny_dir, tmp_path, capsys):
    rows = [{"input": "What is the number?", "context": "The number is 42. " * 20, "answers": ["42"],
             "dataset": "numbers", "metric": "contains_answer"}] * 3
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    namm = NAMM()
    namm.save_pretrained(tmp_path / "namm")
    out = tmp_path / "e.parquet"
    assert main(["eval", "--model", str(tiny_dir), "--policy", f"namm:{tmp_path / 'namm'}@0.5", "--policy", "full",
                 "--tasks", str(path), "--num-prompts", "3", "--update-every", "64", "--chunk-size", "64",
                 "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "95% CI" in md and "Commit:" in md and "Command:" in md
    assert "tokens (median prompt" in md and "4096 tokens" not in md
    assert "| vs |" in md and ("tie" in md or "better" in md or "worse" in md)


def test_eval_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    assert main(["eval", "--tasks", "", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "--tasks is empty" in capsys.readouterr().err
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):   # root ignores permissions: then a file stands in the way
            assert main(["eval", "--out", str(locked / "x.parquet")]) == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    (tmp_path / "file").write_text("")
    assert main(["eval", "--out", str(tmp_path / "file" / "x.parquet")]) == 2
    assert "cannot create" in capsys.readouterr().err
    import torch as _torch

    if not _torch.cuda.is_available():
        assert main(["eval", "--device", "cuda", "--out", str(tmp_path / "y.parquet")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["eval", "--policy", "h2o:1e3", "--tasks", "", "--out", str(tmp_path / "z.parquet")]) == 2
    assert "above 1" not in capsys.readouterr().err      # 1e3 is a token count


def test_generate_refuses_bad_prompts(tmp_path, capsys):
    assert main(["generate", "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--prompt-file", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    assert main(["generate", "--prompt-file", str(binary)]) == 2
    assert f"{binary} is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("chat", [True, False])
def test_the_question_starts_where_the_context_ends(tiny, chat):
    """kvpress's query-agnostic protocol compresses the context alone: the boundary is the first
    token of the question, with or without a chat template (then the tokenizer's BOS counts)."""
    import copy

    model, tok = tiny
    if not chat:
        tok = copy.deepcopy(tok)
        tok.chat_template = None
        tok.add_bos_token = True
    ev = Evaluator(model, tok)
    for sample in load_tasks(["passkey", "niah_multiquery", "vt", "qa"], tok, 1, 300, seed=2):
        ids, _ = ev.encode(sample)
        start = ev.compress_at(sample, "agnostic")
        assert ev.compress_at(sample, "aware") == ids.shape[1] and ev.compress_at(sample, "chunked") is None
        assert tok.decode(ids[0, start:]).lstrip().startswith(sample.input[:20]), tok.decode(ids[0, start - 3:start + 5])
        assert sample.input[:10] not in tok.decode(ids[0, :start])
