"""Generation with Hugging Face's semantics: GenerationConfig, seeded sampling, streamers, stop strings."""
import json
import re

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from namm_cli.cli import main as cli
from namm_core import MemoryManagedLM, parse_policy


def _ids(T, seed=0, vocab=97):
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


class Collect(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_greedy_with_repetition_penalty_equals_transformers_generate():
    model = tiny_model()
    ids = _ids(40)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=15, do_sample=False, repetition_penalty=1.3,
                                  pad_token_id=0)[0, 40:]
    out = MemoryManagedLM(model, None).generate(ids, max_new_tokens=15, repetition_penalty=1.3)
    assert torch.equal(out.sequences[0], expected)
    plain = MemoryManagedLM(model, None).generate(ids, max_new_tokens=15)
    assert not torch.equal(plain.sequences[0], expected)  # the penalty changed the reply


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    model = tiny_model()
    ids = _ids(50, seed=1)
    lm = MemoryManagedLM(model, parse_policy("h2o:0.5"), update_every=16, chunk_size=16)
    config = GenerationConfig(do_sample=True, temperature=1.5, top_k=3, max_new_tokens=20)
    a = lm.generate(ids, generation_config=config, seed=7, return_logits=True)
    b = lm.generate(ids, generation_config=config, seed=7)
    c = lm.generate(ids, generation_config=config, seed=8)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    # every sampled token was among the 3 most likely at its step
    step_logits = a.logits[0, ids.shape[1] - 1:]
    for t, token in enumerate(a.sequences[0]):
        assert token in step_logits[t].topk(3).indices
    greedy = lm.generate(ids, max_new_tokens=20)
    top1 = lm.generate(ids, do_sample=True, top_k=1, max_new_tokens=20, seed=3)
    assert torch.equal(greedy.sequences, top1.sequences)


def test_streamer_receives_prompt_then_each_token_and_batches_are_refused():
    model = tiny_model()
    ids = _ids(30, seed=2)
    streamer = Collect()
    out = MemoryManagedLM(model, None).generate(ids, max_new_tokens=6, streamer=streamer)
    assert torch.equal(streamer.puts[0], ids)
    assert torch.equal(torch.cat(streamer.puts[1:]), out.sequences[0])
    assert streamer.ended
    with pytest.raises(ValueError, match="streamer takes one sequence"):
        MemoryManagedLM(model, None).generate(torch.cat([ids, ids]), max_new_tokens=2, streamer=Collect())


def test_text_iterator_streamer_and_stop_strings_with_a_real_tokenizer():
    from namm_core.models import tiny_random_model

    model, tok = tiny_random_model(architecture="llama", seed=0)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    lm = MemoryManagedLM(model, parse_policy("tova:0.5"), update_every=16, chunk_size=16, tokenizer=tok)
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = lm.generate(ids, max_new_tokens=12, streamer=streamer)
    text = tok.decode(out.sequences[0])
    assert "".join(streamer) == text
    # stop at a string the greedy reply contains: the reply ends right where it is completed
    stop = tok.decode(out.sequences[0, 3:5])
    stopped = lm.generate(ids, max_new_tokens=12, stop_strings=[stop], pad_token_id=tok.pad_token_id)
    kept = stopped.sequences[0][stopped.sequences[0] != tok.pad_token_id]
    assert tok.decode(kept).endswith(stop) and kept.numel() <= 5
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        MemoryManagedLM(model, None).generate(ids, max_new_tokens=2, stop_strings=["x"])


def test_bad_generation_settings():
    model = tiny_model()
    lm = MemoryManagedLM(model, None)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(_ids(10), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(_ids(10), max_new_tokens=0)


def test_generate_cli_prompts_file_sampling_and_stream(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Hello there, how are", "A much longer prompt "
                                                                     "that goes on and on about cats and dogs"]))
    args = ["generate", "--model", "tiny-random", "--prompts-file", str(prompts), "--policy", "full",
            "--policy", "streamingllm:0.5", "--max-new-tokens", "5", "--update-every", "8", "--chunk-size", "8",
            "--do-sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]
    seconds = re.compile(r"\b\d+\.\d{2}\b")   # the only column that changes between runs
    assert cli(args) == 0
    first = seconds.sub("", capsys.readouterr().out)
    assert cli(args) == 0
    assert seconds.sub("", capsys.readouterr().out) == first     # seeded: the same samples
    assert first.count("streamingllm:0.5") == 4 and "prompt 2" in first   # two table rows, two full answers
    assert "peak KV MiB (batch)" in first
    assert cli(["generate", "--model", "tiny-random", "--prompt", "Hi there", "--stream", "--max-new-tokens", "4"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert cli(["generate", "--model", "tiny-random", "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--stop", ""], "--stop is empty"),
    (["--temperature", "0.7"], "--temperature only apply when sampling: add --do-sample"),
    (["--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p only apply when sampling"),
    (["--seed", "3"], "--seed seeds the sampling"),
    (["--do-sample", "--top-p", "1.5"], "top_p must be in"),
    (["--do-sample", "--temperature", "-1"], "temperature must be positive"),
])
def test_generate_refuses_bad_decoding_options_before_loading_the_model(extra, message, monkeypatch, capsys):
    import namm_core

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(namm_core, "load_model", no_model)
    assert cli(["generate", "--prompt", "Hi", *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_batch_rows_have_their_own_retention_and_whole_answers(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": "word " * n}) for n in (6, 60)))
    assert cli(["generate", "--model", "tiny-random", "--prompts-file", str(prompts), "--policy", "streamingllm:16",
                "--max-new-tokens", "40", "--update-every", "8", "--chunk-size", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("streamingllm:16  prompt")]
    assert len(rows) == 2 and rows[0][3] != rows[1][3], rows     # a short and a long prompt keep different shares
    assert len(rows[0]) == 6 and len(rows[1]) == 4, rows          # the batch's peak KV and seconds once
    answers = [line for line in out.splitlines() if line.startswith("[streamingllm:16, prompt")]
    assert len(answers) == 2 and max(len(a) for a in answers) > 80   # not cut to 60 characters


def test_row_capture_from_the_command_line(capsys, monkeypatch, tmp_path):
    """`--row-capture separate` reaches the memory: every output of an observed chunk comes from
    the fused kernel (counted), where inline takes the eager path for them; a bad value is refused."""
    from namm_cli.cmd_eval import ROW_CAPTURE_CHOICES
    from namm_core import attention
    from namm_core.generation import ROW_CAPTURES
    from namm_eval.evaluator import Evaluator

    assert ROW_CAPTURE_CHOICES == ROW_CAPTURES
    fused_queries = []
    real_fused = attention._fused

    def counting(layer, cache, query, *args, **kwargs):
        if cache.observer is not None:
            fused_queries.append(query.shape[2])
        return real_fused(layer, cache, query, *args, **kwargs)

    monkeypatch.setattr(attention, "_fused", counting)
    base = ["generate", "--model", "tiny-random", "--prompt", "Hello there, how are you doing on this fine day",
            "--policy", "namm@0.5", "--max-new-tokens", "3", "--update-every", "8", "--chunk-size", "8"]
    assert cli(base + ["--row-capture", "inline"]) == 0
    assert fused_queries == []                       # observed chunks: eager, outputs and rows together
    assert cli(base + ["--row-capture", "separate"]) == 0
    assert fused_queries
    with pytest.raises(SystemExit):
        cli(base + ["--row-capture", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="row_capture 'fast'"):
        Evaluator(None, None, row_capture="fast")
    # and through namm eval's Evaluator
    fused_queries.clear()
    evaluate = ["eval", "--model", "tiny-random", "--policy", "namm@0.5", "--tasks", "passkey", "--num-prompts", "1",
                "--context-length", "128", "--update-every", "16", "--chunk-size", "16", "--out", str(tmp_path / "e.parquet")]
    assert cli(evaluate) == 0
    assert fused_queries == []
    assert cli(evaluate + ["--row-capture", "separate"]) == 0
    assert fused_queries
