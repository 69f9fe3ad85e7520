"""Synthetic RULER-style tasks: deterministic, sized in the tokenizer's own tokens, answers really there."""
import collections
import json
import re

import pytest

from namm_eval.tasks.base import Sample
from namm_eval.tasks.synthetic import _QA_RELATIONS as RELATIONS
from namm_eval.tasks.synthetic import CORPUS_PATH, TASKS, generate_samples, generate_suite, load_samples, save_samples

ALL_TASKS = list(TASKS)
METRICS = {"contains_answer", "recall_contained"}


@pytest.fixture(scope="module")
def tok():
    """A real fast tokenizer, trained here on the corpus in a fraction of a second (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<unk>"], show_progress=False)
    bpe.train([str(CORPUS_PATH)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def n_tokens(tokenizer, sample: Sample) -> int:
    return len(tokenizer(sample.prompt()).input_ids)


def resolve_vt(context: str) -> dict:
    """Every VAR in the context mapped to the number it ends up holding."""
    assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})", context))
    out = {}
    for name in assigned:
        rhs, seen = assigned[name], {name}
        while rhs.startswith("VAR "):
            ref = rhs[4:]
            assert ref not in seen, "assignment cycle"
            seen.add(ref)
            rhs = assigned[ref]
        out[name] = rhs
    return out


def check_sample(sample: Sample, tokenizer, length: int, seed: int, index: int):
    """The contract every sample keeps, and per task: the answer is really in (or follows from) the context."""
    tokens = n_tokens(tokenizer, sample)
    assert abs(tokens - length) <= 0.02 * length, (sample.sample_id, tokens, length)
    assert sample.meta["tokens"] == tokens and sample.meta["target_tokens"] == length
    assert sample.sample_id == f"{sample.task}-{length}-{seed}-{index}"
    assert sample.metric in METRICS
    assert "{context}" in sample.template and "{input}" in sample.template
    assert sample.prompt().count(sample.context) == 1
    assert sample.answers and all(isinstance(a, str) and a for a in sample.answers)
    assert 8 <= sample.max_new_tokens <= 128
    if sample.metric == "recall_contained":
        assert sample.meta["required"] == sample.answers and len(sample.answers) > 1
    else:
        assert len(sample.answers) == 1
    ctx, task = sample.context, sample.task
    for answer in sample.answers:
        assert answer in ctx, (task, answer)

    if task == "passkey":
        key = sample.answers[0]
        assert re.fullmatch(r"\d{5}", key)
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in ctx and ctx.count(key) == 2
        assert "pass key" in sample.input
    elif task.startswith("niah_"):
        keys = sample.meta["keys"]
        for key in keys:
            assert key in sample.input
        found = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", ctx)
        by_key = collections.defaultdict(list)
        for key, value in found:
            by_key[key].append(value)
        asked_values = [v for k in keys for v in by_key[k]]
        assert sorted(asked_values) == sorted(sample.answers)
        assert all(ctx.count(v) == 1 for v in sample.answers)
        expected_needles = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}
        assert len(found) == expected_needles[task]
        if task == "niah_multikey":
            assert len(by_key) == 4 and len(keys) == 1
            assert set(sample.meta["distractor_keys"]) == set(by_key) - set(keys)
        if task == "niah_multivalue":
            assert len(keys) == 1 and len(by_key[keys[0]]) == 4
        if task == "niah_multiquery":
            assert len(keys) == 4
    elif task == "vt":
        value = sample.meta["value"]
        assert f"the value {value}" in sample.input
        holding = resolve_vt(ctx)
        assert sorted(k for k, v in holding.items() if v == value) == sorted(sample.answers)
        assert len(sample.answers) == 5
        assert any(v != value for v in holding.values()), "a distractor chain is there too"
        # the chain is laid out in order: each variable is assigned before it is used
        first = ctx.index(f"VAR {sample.answers[0]} = {value}.")
        positions = [ctx.index(f"VAR {name} = ") for name in sample.answers]
        assert positions == sorted(positions) and positions[0] == first
    elif task == "cwe":
        lines = ctx.split("\n")
        items = []
        for i, line in enumerate(lines, 1):
            m = re.fullmatch(r"(\d+)\. ([a-z]+)", line)
            assert m and int(m.group(1)) == i, line
            items.append(m.group(2))
        counts = collections.Counter(items)
        assert len(sample.answers) == 10 and len(set(sample.answers)) == 10
        least_common_answer = min(counts[w] for w in sample.answers)
        most_common_other = max(c for w, c in counts.items() if w not in sample.answers)
        assert least_common_answer > most_common_other
        assert "10 most common words" in sample.input
    elif task == "kv_retrieval":
        data = json.loads(ctx)
        key = re.search(r'Key: "([0-9a-f-]{36})"', sample.input).group(1)
        assert data[key] == sample.answers[0]
        assert len(data) == sample.meta["num_pairs"] >= 3
        assert ctx.count(sample.answers[0]) == 1
    elif task == "qa":
        town = sample.meta["town"]
        assert town in sample.input and sample.input.startswith("Question: ")
        answer = sample.answers[0]
        assert ctx.count(answer) == 1
        fact = next(s for s in re.split(r"(?<=\.) ", ctx) if answer in s)
        assert town in fact, "the answer is stated about the asked town"
        assert sample.meta["num_facts"] == 8
    elif task == "fwe":
        words = ctx.split(" ")
        assert all(re.fullmatch(r"[a-z]+", w) for w in words)
        counts = collections.Counter(words)
        ranked = sorted(counts.values(), reverse=True)
        assert len(sample.answers) == 3 and sorted(counts[w] for w in sample.answers) == sorted(ranked[:3])
        assert ranked[2] > ranked[3], "the three answers are strictly the most frequent"
        assert not any(a in w for a in sample.answers for w in counts if w != a), "no answer inside another word"
        assert sample.meta["num_items"] == len(words)
    elif task == "qa_2hop":
        person, town, answer = sample.meta["person"], sample.meta["town"], sample.answers[0]
        assert person in sample.input and town not in sample.input, "the question names the person only"
        moves = dict(re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+) moved to ([A-Z][a-z]+) last spring\.", ctx))
        assert moves[person] == town and len(moves) == 3 and len(set(moves.values())) == 3
        assert ctx.count(answer) == 1
        fact_template = next(f for f, q, _ in RELATIONS if sample.input.startswith("Question: " + q.split("{town}")[0]))
        assert fact_template.format(town=town, value=answer) in ctx, "the asked relation of the mover's town"
        assert person not in next(s for s in re.split(r"(?<=\.) ", ctx) if answer in s)
        # the same relation is stated for the other movers' towns too: one hop alone cannot answer
        for other_town in set(moves.values()) - {town}:
            pattern = re.escape(fact_template).replace(re.escape("{town}"), other_town).replace(re.escape("{value}"), ".+?")
            assert re.search(pattern, ctx), (other_town, fact_template)
    else:
        raise AssertionError(f"no check for task {task}")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_by_seed(tok, task):
    a = generate_samples(task, tok, 2, 1000, seed=7)
    b = generate_samples(task, tok, 2, 1000, seed=7)
    c = generate_samples(task, tok, 2, 1000, seed=8)
    assert [s.to_row() for s in a] == [s.to_row() for s in b]
    assert a[0].context != a[1].context, "samples of one call differ"
    for x, y in zip(a, c):
        assert x.context != y.context and x.answers != y.answers
    # sample i depends only on (task, length, seed, i): a larger n extends a smaller one
    assert generate_samples(task, tok, 3, 1000, seed=7)[:2] == a


@pytest.mark.parametrize("length", [1000, 4000])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_length_within_two_percent_and_answers_in_context(tok, task, length):
    for i, sample in enumerate(generate_samples(task, tok, 2, length, seed=3)):
        assert sample.task == task
        check_sample(sample, tok, length, seed=3, index=i)


def test_haystacks_are_corpus_prose_except_the_classic_passkey(tok):
    corpus = CORPUS_PATH.read_text()
    sample = generate_samples("niah_single", tok, 1, 4000, seed=1)[0]
    text = sample.context
    for value in sample.answers:  # drop the needle sentences
        text = re.sub(r"[^.]*" + re.escape(value) + r"[^.]*\.", " ", text)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    assert len(sentences) > 50
    assert sum(s in corpus for s in sentences) >= len(sentences) - 2
    # the pass-key task keeps the classic repeated filler (the form small models answer at 4k+)
    passkey = generate_samples("passkey", tok, 1, 4000, seed=1)[0]
    key = passkey.answers[0]
    filler = passkey.context.replace(f"The pass key is {key}. Remember it. {key} is the pass key.", " ")
    assert set(s for s in re.split(r"(?<=[.!?])\s+", filler) if s.strip()) <= {
        "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."}
    assert 0.0 <= passkey.meta["depth"] <= 1.0


def test_unknown_task_names_the_valid_ones(tok):
    with pytest.raises(ValueError, match=r"unknown synthetic task 'needle'.*passkey.*kv_retrieval.*qa"):
        generate_samples("needle", tok, 1, 1000, 0)
    with pytest.raises(ValueError, match=r"unknown synthetic task 'nope'"):
        generate_suite(tok, ["passkey", "nope"], 1, 1000, 0)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_too_short_length_is_a_clear_error(tok, task):
    with pytest.raises(ValueError, match=rf"length 60 is too short for task '{task}'.*at least \d+"):
        generate_samples(task, tok, 1, 60, 0)


def test_bad_n_and_length(tok):
    with pytest.raises(ValueError, match="length must be a positive"):
        generate_samples("passkey", tok, 1, 0, 0)
    with pytest.raises(ValueError, match="n must be a non-negative"):
        generate_samples("passkey", tok, -1, 1000, 0)
    assert generate_samples("passkey", tok, 0, 1000, 0) == []


def test_suite_and_parquet_round_trip(tok, tmp_path):
    suite = generate_suite(tok, ALL_TASKS, 2, 1000, seed=5)
    assert [s.task for s in suite] == [t for t in ALL_TASKS for _ in range(2)]
    assert len({s.sample_id for s in suite}) == len(suite)
    path = tmp_path / "sub" / "suite.parquet"
    save_samples(suite, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["suite.parquet"], "no temp file left behind"
    loaded = load_samples(path)
    assert loaded == suite
    assert [s.meta for s in loaded] == [s.meta for s in suite]

    import pyarrow.parquet as pq
    assert pq.read_table(path).num_rows == len(suite)

    save_samples(suite[:3], path)  # overwriting is atomic too
    assert load_samples(path) == suite[:3]
    empty = tmp_path / "empty.parquet"
    save_samples([], empty)
    assert load_samples(empty) == []


@pytest.mark.slow
def test_embedded_model_tokenizer_lengths(monkeypatch):
    from transformers import AutoTokenizer

    from namm_core.models import resolve_model_path

    smol = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    for length in (2048, 4096):
        for task in ALL_TASKS:
            for i, sample in enumerate(generate_samples(task, smol, 2, length, seed=11)):
                check_sample(sample, smol, length, seed=11, index=i)
