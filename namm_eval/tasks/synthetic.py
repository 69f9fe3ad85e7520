"""Synthetic long-context tasks in the style of RULER, sized in the model's own tokens.

Every generator is deterministic in (task, length, seed, index) and produces a `Sample` whose
prompt (`sample.prompt()`, the template filled with context and input, no chat template) is
`length` tokens long within 2% as counted by `len(tokenizer(sample.prompt()).input_ids)`.

Haystack tasks fill the context with paragraphs of `namm_eval/data/corpus.txt` (shuffled by the
seed, trimmed a sentence at a time) and insert their needles between sentences at seeded depths.
"cwe", "fwe" and "kv_retrieval" fill the context with list items, words or JSON pairs instead.

Public API: `TASKS`, `generate_samples`, `generate_suite`, `save_samples`, `load_samples`.
Metrics used: "contains_answer" (one answer) and "recall_contained" (several required values,
listed in `answers` and in `meta["required"]`).
"""
from __future__ import annotations

import bisect
import functools
import math
import random
import re
import string
import uuid
import weakref
from pathlib import Path
from typing import Callable, Sequence

from namm_core.files import atomic_path
from namm_eval.tasks.base import Sample

CORPUS_PATH = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
TOLERANCE = 0.02          # the contract: |tokens - length| <= 2% of length
_FINE = 0.0025            # what the fitting loop aims for before it stops early
_MAX_MEASURES = 6         # whole-prompt tokenisations per sample, at most
_MIN_HAYSTACK = 64        # filler tokens a haystack task needs at the very least

# ----------------------------------------------------------------------------------------------
# word lists (for needle keys, cwe words and the qa facts)

_ADJECTIVES = """amber brisk calm dusty eager faint gentle hollow icy jolly keen lively mellow nimble
olive plucky quiet rusty silent tidy upbeat vivid wary zesty bold crisp dapper fuzzy gloomy hasty
humble jagged lanky merry noble polite proud rapid shiny sleepy sturdy tender velvet witty breezy
cozy frosty golden scarlet cheerful""".split()
_NOUNS = """anchor badger beacon biscuit candle canyon comet cricket dolphin ember falcon fiddle garnet
glacier hazel island jasmine kettle lantern lemur marble nectar oyster panther pebble quartz raven
saddle sparrow thistle tulip walnut yarrow zephyr acorn bramble cobalt dune ferret gazelle hammock
iris juniper kestrel lagoon mitten orchid parsnip pigeon turnip""".split()

_TOWNS = """Ashcombe Bramblewick Corrivale Dunmere Eldersby Fennwick Glenhallow Harrowby Inchmarrow
Kelderby Larkhaven Marrowdean Nettlecombe Oakhollow Pellingford Quarrystone Rushmere Saltwick
Thornbury Underwold Vennacott Whistleford Yarrowby Zennor""".split()
_FIRST_NAMES = """Agnes Bertram Clara Dorian Edith Fergus Greta Horace Imogen Jasper Kitty Leopold
Mabel Nathaniel Ottilie Percival Rosalind Silas Theodora Ulric Violet Wilfred Winifred Ambrose""".split()
_SURNAMES = """Ambleton Birchall Carrowby Delacombe Everly Fairweather Gorringe Halloway Inglewood
Jessop Kettleby Lockhart Merriweather Norcott Oakridge Pendleton Quarrie Ravenscroft Selwood
Thistlewood Underhill Vantreight Whitlock Yardley""".split()
_RIVERS = """Ambrel Corrowby Delvinne Elsbourne Farrowell Glimmerbeck Hesselt Ilvane Jorrin Kestlewater
Lunnet Marrowbeck Nesselby Orrindale Pellowin Quenbrook Rilletta Sorrelbeck Tamberlin Vossel""".split()
_BOATS = """Silver Wren|Morning Heron|Brave Kittiwake|Salt Lily|Copper Swallow|Quiet Tern|Amber Gull|
Restless Otter|Golden Plover|Little Curlew|Blue Dunlin|Patient Puffin|Steady Guillemot|Evening Shag|
Merry Petrel|Grey Fulmar""".replace("\n", "").split("|")

# (fact sentence, question, value kind)
_QA_RELATIONS = [
    ("The lighthouse keeper of {town} is named {value}.", "What is the name of the lighthouse keeper of {town}?", "person"),
    ("The oldest bakery in {town} is run by {value}.", "Who runs the oldest bakery in {town}?", "person"),
    ("The harbor master of {town} is {value}.", "Who is the harbor master of {town}?", "person"),
    ("The schoolteacher in {town} is called {value}.", "What is the name of the schoolteacher in {town}?", "person"),
    ("The river that runs through {town} is known as the {value}.", "What is the river that runs through {town} called?", "river"),
    ("The ferry that serves {town} is named the {value}.", "What is the name of the ferry that serves {town}?", "boat"),
]

_STOPWORDS = set("""about above after again against also although always among another anyone
anything around because been before behind being below beside between both cannot could does doing
down during each either else enough even ever every from further have having here herself himself
into itself just least less like many might more most much must myself never next none once only
other ours over own perhaps quite rather same several shall should since some such than that their
theirs them themselves then there these they this those though through thus together under until
upon very were what when where whether which while whom whose will with within without would your
yours""".split())

# ----------------------------------------------------------------------------------------------
# templates (instruction in the template, question in `input`)

_PASSKEY_TEMPLATE = "{context}\n\n{input}"
_NIAH_TEMPLATE = ("The long text below hides one or more special magic numbers among ordinary paragraphs. "
                  "Find them and memorize them, because you will be asked about them afterwards.\n\n"
                  "{context}\n\n{input}")
_VT_TEMPLATE = ("Some variable assignments are hidden in the text below. Keep track of every chain of "
                "assignments, because you will be asked which variables end up holding a given value.\n\n"
                "{context}\n\n{input}")
_CWE_TEMPLATE = ("Below is a numbered list of words. A few of the words occur many times in the list. "
                 "Read it carefully and remember which words occur most often.\n\n{context}\n\n{input}")
_KV_TEMPLATE = ("The JSON object below maps keys to values, and every key and value is a UUID. "
                "Find the value that belongs to the key given after the object.\n\n{context}\n\n{input}")
_FWE_TEMPLATE = ("Below is a long stretch of words with no meaning. Some words occur far more often than "
                 "others. Keep count as you read, because you will be asked which words occur most often.\n\n"
                 "{context}\n\n{input}")
_QA_TEMPLATE = ("The document below is mostly ordinary prose, but it also states a few facts about some "
                "small towns. Read it carefully and answer the question that follows it with a short "
                "phrase taken from the document.\n\n{context}\n\n{input}")

# ----------------------------------------------------------------------------------------------
# corpus and per-tokenizer caches

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@functools.lru_cache(maxsize=None)
def _corpus() -> tuple[tuple[str, ...], ...]:
    """The corpus as paragraphs of sentences."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return tuple(tuple(_SENTENCE_END.split(p)) for p in paragraphs)


@functools.lru_cache(maxsize=None)
def _cwe_pool() -> tuple[str, ...]:
    """Distinct lower-case words for the common-words task (corpus vocabulary + the word lists)."""
    words = set(re.findall(r"[a-z]+", CORPUS_PATH.read_text(encoding="utf-8").lower()))
    words = {w for w in words if 4 <= len(w) <= 10 and w not in _STOPWORDS}
    words.update(_ADJECTIVES)
    words.update(_NOUNS)
    return tuple(sorted(words))


def _batch_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """Token counts of many short texts in one call (no special tokens)."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def count_tokens(tokenizer, text: str) -> int:
    """How the length contract is measured: the tokenizer's own ids for the whole prompt."""
    return len(tokenizer(text, verbose=False).input_ids)


class _TokenizerInfo:
    """Token counts of every corpus sentence, computed once per tokenizer."""

    def __init__(self, tokenizer):
        paragraphs = _corpus()
        counts = iter(_batch_counts(tokenizer, [s for p in paragraphs for s in p]))
        self.paragraph_counts = [tuple(next(counts) for _ in p) for p in paragraphs]


_INFO_WEAK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INFO_BY_ID: dict[int, tuple[object, _TokenizerInfo]] = {}


def _info(tokenizer) -> _TokenizerInfo:
    try:
        info = _INFO_WEAK.get(tokenizer)
        if info is None:
            info = _INFO_WEAK[tokenizer] = _TokenizerInfo(tokenizer)
        return info
    except TypeError:  # not weak-referenceable / not hashable: keep it alive by id
        entry = _INFO_BY_ID.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = _INFO_BY_ID[id(tokenizer)] = (tokenizer, _TokenizerInfo(tokenizer))
        return entry[1]


# ----------------------------------------------------------------------------------------------
# fitting a prompt to a token budget


class _Job:
    """One sample being generated: its identity, random stream and tokenizer."""

    def __init__(self, task: str, tokenizer, length: int, seed: int, index: int):
        self.task, self.tokenizer, self.length, self.seed, self.index = task, tokenizer, length, seed, index
        self.rng = random.Random(f"namm-synthetic/{task}/{length}/{seed}/{index}")
        self.sample_id = f"{task}-{length}-{seed}-{index}"

    def measure(self, sample: Sample) -> int:
        return count_tokens(self.tokenizer, sample.prompt())

    def too_short(self, base: int, minimum: int) -> ValueError:
        return ValueError(
            f"length {self.length} is too short for task {self.task!r}: with this tokenizer its fixed parts "
            f"(instruction, question and needles, or the shortest list) alone take {base} tokens; "
            f"use a length of at least {minimum}")

    def finish(self, sample: Sample, tokens: int, **meta) -> Sample:
        if abs(tokens - self.length) > TOLERANCE * self.length:
            raise RuntimeError(f"{self.sample_id}: could not fit the prompt to {self.length} tokens "
                               f"(got {tokens}, more than {TOLERANCE:.0%} away)")
        sample.meta = {"target_tokens": self.length, "tokens": tokens, **meta}
        return sample


def _choose(counts: Sequence[int], cum: Sequence[int], want: float, tail: int, reserve: int) -> list[int]:
    """Indices of units whose estimated token counts add up to about `want`: a prefix of the stream,
    then the last `tail` units swapped for later ones of better-fitting size. Prefixes one unit
    shorter or longer than the closest are tried too (the swaps may only reach the target from there)."""
    k0 = min(bisect.bisect_left(cum, want), len(cum) - 1)
    if k0 > 0 and abs(cum[k0 - 1] - want) <= abs(cum[k0] - want):
        k0 -= 1
    best = None
    for k in (k0, k0 - 1, k0 + 1):
        if not 0 <= k < len(cum):
            continue
        chosen = list(range(k))
        residual = want - cum[k]
        pool = list(range(k, min(len(counts), k + reserve)))
        for pos in range(len(chosen) - 1, max(-1, len(chosen) - 1 - tail), -1):
            if abs(residual) < 0.5 or not pool:
                break
            current = counts[chosen[pos]]
            j = min(range(len(pool)), key=lambda j: abs(residual - (counts[pool[j]] - current)))
            delta = counts[pool[j]] - current
            if abs(residual - delta) < abs(residual):
                chosen[pos], pool[j] = pool[j], chosen[pos]
                residual -= delta
        if best is None or abs(residual) < best[0] - 0.5:
            best = (abs(residual), chosen)
        if best[0] < 0.5:
            break
    return best[1]


def _fit(job: _Job, build: Callable[[list[int]], Sample], counts: Sequence[int], base: int,
         tail: int, reserve: int = 96):
    """Choose units from a stream (with estimated token counts) so the built prompt is `job.length`
    tokens. `base` is the measured prompt length with no units. Returns (sample, tokens, chosen)."""
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    target = job.length
    fine = max(1, int(target * _FINE))
    want = target - base
    best, seen = None, set()
    for _ in range(_MAX_MEASURES - 1):  # one measure went on `base`
        chosen = _choose(counts, cum, want, tail, reserve)
        key = tuple(chosen)
        if key in seen:
            break
        seen.add(key)
        sample = build(chosen)
        tokens = job.measure(sample)
        if best is None or abs(tokens - target) < abs(best[1] - target):
            best = (sample, tokens, chosen)
        if abs(tokens - target) <= fine:
            break
        want = sum(counts[i] for i in chosen) - (tokens - target)
    return best


# The classic pass-key haystack (Mohtashami & Jaggi 2023): the same five sentences repeated.
_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def _filler_stream(job: _Job, min_tokens: int):
    counts_one = _batch_counts(job.tokenizer, list(_FILLER))
    units, counts, total = [], [], 0
    while total < min_tokens:
        for j, (s, c) in enumerate(zip(_FILLER, counts_one)):
            units.append((s, j == len(_FILLER) - 1))
            counts.append(c)
            total += c
    return units, counts


def _haystack_stream(job: _Job, min_tokens: int, filler: bool = False):
    """Corpus sentences in seeded paragraph order (reshuffled each pass over the corpus) until their
    estimated token count reaches `min_tokens`. Returns ([(sentence, ends_paragraph)], counts).
    With `filler`, the repeated classic pass-key sentences instead."""
    if filler:
        return _filler_stream(job, min_tokens)
    paragraphs = _corpus()
    info = _info(job.tokenizer)
    units: list[tuple[str, bool]] = []
    counts: list[int] = []
    total, last = 0, None
    while total < min_tokens:
        order = list(range(len(paragraphs)))
        job.rng.shuffle(order)
        if order[0] == last and len(order) > 1:  # never the same paragraph twice in a row
            order[0], order[1] = order[1], order[0]
        for p in order:
            sentences, pc = paragraphs[p], info.paragraph_counts[p]
            for j, (s, c) in enumerate(zip(sentences, pc)):
                units.append((s, j == len(sentences) - 1))
                counts.append(c)
                total += c
            last = p
            if total >= min_tokens:
                break
    return units, counts


def _render_haystack(units, chosen: Sequence[int], needles: Sequence[tuple[float, str]]) -> str:
    """Join the chosen sentences into paragraphs and put each needle (depth, text) between sentences
    at round(depth * number of sentences); needles at the same place keep their order."""
    sentences = [units[i] for i in chosen]
    k = len(sentences)
    at: dict[int, list[str]] = {}
    for depth, text in needles:
        at.setdefault(int(round(depth * k)), []).append(text)
    parts: list[str] = []
    sep_after: list[str] = []
    for i in range(k + 1):
        for text in at.get(i, ()):
            parts.append(text)
            sep_after.append(" ")
        if i < k:
            text, ends = sentences[i]
            parts.append(text)
            sep_after.append("\n\n" if ends else " ")
    out = []
    for i, text in enumerate(parts):
        out.append(text)
        if i < len(parts) - 1:
            out.append(sep_after[i])
    return "".join(out)


def _haystack_sample(job: _Job, needles: Sequence[tuple[float, str]], make: Callable[[str], Sample],
                     filler: bool = False):
    """A haystack task: corpus text (or the repeated pass-key filler) with needles, fitted to the
    length. Returns (sample, tokens)."""
    base = job.measure(make(_render_haystack([], [], needles)))
    minimum = base + _MIN_HAYSTACK
    if job.length < minimum:
        raise job.too_short(base, minimum)
    units, counts = _haystack_stream(job, job.length - base + max(2048, job.length // 10), filler=filler)
    sample, tokens, _ = _fit(job, lambda chosen: make(_render_haystack(units, chosen, needles)),
                             counts, base, tail=3)
    return sample, tokens


# ----------------------------------------------------------------------------------------------
# helpers for needles


def _depth(rng: random.Random) -> float:
    return round(rng.random(), 3)


def _distinct(rng: random.Random, draw: Callable[[], object], n: int, avoid=()) -> list:
    out, seen = [], set(avoid)
    while len(out) < n:
        x = draw()
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _niah_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _magic(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


# ----------------------------------------------------------------------------------------------
# the tasks


def _passkey(tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job("passkey", tokenizer, length, seed, index)
    key = str(job.rng.randint(10_000, 99_999))
    depth = _depth(job.rng)
    # the classic needle and question (Mohtashami & Jaggi 2023); the small models answer this
    # form reliably at 4k+ tokens, while an instruction header in front of the context hurts them
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def make(context):
        return Sample(task="passkey", sample_id=job.sample_id, context=context,
                      input="What is the pass key? Answer with the number only.", answers=[key],
                      metric="contains_answer", max_new_tokens=16, template=_PASSKEY_TEMPLATE)

    sample, tokens = _haystack_sample(job, [(depth, needle)], make, filler=True)
    return job.finish(sample, tokens, depth=depth)


def _niah(task: str, tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job(task, tokenizer, length, seed, index)
    rng = job.rng
    if task == "niah_single":
        keys = [_niah_key(rng)]
        values = [_magic(rng)]
        pairs, asked = [(keys[0], values[0])], keys
    elif task == "niah_multikey":
        keys = _distinct(rng, lambda: _niah_key(rng), 4)
        values = _distinct(rng, lambda: _magic(rng), 4)
        pairs, asked = list(zip(keys, values)), [keys[rng.randrange(4)]]
    elif task == "niah_multivalue":
        keys = [_niah_key(rng)]
        values = _distinct(rng, lambda: _magic(rng), 4)
        pairs, asked = [(keys[0], v) for v in values], keys
    elif task == "niah_multiquery":
        keys = _distinct(rng, lambda: _niah_key(rng), 4)
        values = _distinct(rng, lambda: _magic(rng), 4)
        pairs, asked = list(zip(keys, values)), keys
    else:  # pragma: no cover - registry and this function are kept in step
        raise AssertionError(task)
    depths = [_depth(rng) for _ in pairs]
    needles = [(d, _magic_needle(k, v)) for d, (k, v) in zip(depths, pairs)]
    answers = [v for k, v in pairs if k in asked]
    if task in ("niah_single", "niah_multikey"):
        key = asked[0]
        question = (f"What is the special magic number for {key} mentioned in the text above? "
                    f"The special magic number for {key} mentioned in the text above is")
        metric, max_new = "contains_answer", 32
    else:
        joined = _join_keys(asked)
        question = (f"What are all the special magic numbers for {joined} mentioned in the text above? "
                    f"The special magic numbers for {joined} mentioned in the text above are")
        metric, max_new = "recall_contained", 64

    def make(context):
        return Sample(task=task, sample_id=job.sample_id, context=context, input=question,
                      answers=list(answers), metric=metric, max_new_tokens=max_new, template=_NIAH_TEMPLATE)

    sample, tokens = _haystack_sample(job, needles, make)
    extra = {"depth": depths[0] if len(depths) == 1 else depths, "keys": asked}
    if metric == "recall_contained":
        extra["required"] = list(answers)
    if task == "niah_multikey":
        extra["distractor_keys"] = [k for k in keys if k not in asked]
    return job.finish(sample, tokens, **extra)


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _vt(tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job("vt", tokenizer, length, seed, index)
    rng = job.rng
    hops, distractor_hops = 4, 2
    names = _distinct(rng, lambda: _var_name(rng), hops + 1 + distractor_hops + 1)
    chain, other = names[:hops + 1], names[hops + 1:]
    value, other_value = _distinct(rng, lambda: str(rng.randint(10_000, 99_999)), 2)
    needles, depths = [], []
    for vars_, val in ((chain, value), (other, other_value)):
        ds = sorted(_depth(rng) for _ in vars_)  # assignments appear in chain order
        for i, (name, d) in enumerate(zip(vars_, ds)):
            rhs = val if i == 0 else f"VAR {vars_[i - 1]}"
            needles.append((d, f"VAR {name} = {rhs}."))
        depths.append(ds)
    question = (f"Question: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chains of variable assignment in the text above, {len(chain)} "
                f"variables are assigned the value {value}, they are:")

    def make(context):
        return Sample(task="vt", sample_id=job.sample_id, context=context, input=question, answers=list(chain),
                      metric="recall_contained", max_new_tokens=48, template=_VT_TEMPLATE)

    sample, tokens = _haystack_sample(job, needles, make)
    return job.finish(sample, tokens, depth=depths[0], required=list(chain), value=value,
                      distractor_chain=other, distractor_depth=depths[1])


_CWE_COMMON = 10
_CWE_MIN_ITEMS = 40


def _cwe_items(seed_text: str, m: int) -> tuple[list[str], list[str], int, int]:
    """`m` list items: _CWE_COMMON words f_c times each, the rest f_u < f_c times each, shuffled.
    Returns (items, common words, f_c, f_u)."""
    rng = random.Random(seed_text)
    pool = list(_cwe_pool())
    rng.shuffle(pool)
    common: list[str] = []
    for w in pool:  # no common word inside another: a listed word never "contains" a different one
        if not any(w in c or c in w for c in common):
            common.append(w)
            if len(common) == _CWE_COMMON:
                break
    rare = [w for w in pool if not any(w in c or c in w for c in common)]
    f_c = min(30, max(3, m // 25))
    f_u = 1 if f_c < 10 else 2 if f_c < 20 else 3
    f_u = max(f_u, math.ceil(max(0, m - _CWE_COMMON * f_c) / len(rare)))  # very long lists reuse rare words
    f_c = max(f_c, f_u + 2)
    n_rare_items = max(0, m - _CWE_COMMON * f_c)
    items = [w for w in common for _ in range(f_c)]
    items += [rare[i // f_u] for i in range(n_rare_items)]
    rng.shuffle(items)
    return items, common, f_c, f_u


def _fit_list(job: _Job, build: Callable[[int], Sample], m0: int, per_item: float) -> tuple[int, Sample, int]:
    """The number of list items m >= m0 whose built prompt is `job.length` tokens: a secant search on
    measured lengths, starting from an estimate of tokens per item. Returns (m, sample, tokens)."""
    built: dict[int, tuple[Sample, int]] = {}

    def measure(m: int) -> int:
        sample = build(m)
        built[m] = (sample, job.measure(sample))
        return built[m][1]

    t0 = measure(m0)
    if job.length < t0:
        raise job.too_short(t0, t0)
    m_prev, t_prev = m0, t0
    m = max(m0, int(round(m0 + (job.length - t0) / per_item)))
    for _ in range(_MAX_MEASURES - 1):
        if m in built:
            break
        t = measure(m)
        if abs(t - job.length) <= max(1, int(job.length * _FINE)):
            break
        if m != m_prev and t != t_prev:
            per_item = max(0.5, (t - t_prev) / (m - m_prev))
        m_prev, t_prev = m, t
        m = max(m0, int(round(m + (job.length - t) / per_item)))
    best = min(built, key=lambda k: abs(built[k][1] - job.length))
    return (best, *built[best])


def _cwe(tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job("cwe", tokenizer, length, seed, index)
    seed_text = f"{job.rng.getrandbits(64)}"
    question = (f"Question: What are the {_CWE_COMMON} most common words in the list above? "
                f"Answer: The top {_CWE_COMMON} words that appear most often in the list are:")

    def build(m: int) -> Sample:
        items, common, _, _ = _cwe_items(seed_text, m)
        context = "\n".join(f"{i}. {w}" for i, w in enumerate(items, 1))
        return Sample(task="cwe", sample_id=job.sample_id, context=context, input=question,
                      answers=list(common), metric="recall_contained", max_new_tokens=64, template=_CWE_TEMPLATE)

    # tokens per item, estimated from the item lines themselves (numbers at the right width)
    items, *_ = _cwe_items(seed_text, _CWE_MIN_ITEMS)
    probe = max(_CWE_MIN_ITEMS, job.length // 6)
    per_item = max(1.0, sum(_batch_counts(tokenizer, [f"{probe + i}. {w}\n" for i, w in enumerate(items)])) / len(items))
    m, sample, tokens = _fit_list(job, build, _CWE_MIN_ITEMS, per_item)
    _, common, f_c, f_u = _cwe_items(seed_text, m)
    return job.finish(sample, tokens, required=list(common), num_items=m, freq_common=f_c, freq_uncommon=f_u)


_FWE_TOP = 3
_FWE_MIN_ITEMS = 60
_ZETA_2 = math.pi ** 2 / 6   # sum of 1/r^2: the normaliser of a Zipf law with exponent 2


def _fwe_items(seed_text: str, m: int) -> tuple[list[str], list[str], list[int]]:
    """`m` words drawn from a Zipf law with exponent 2 (as RULER's frequent-words task): the word of
    rank r occurs floor(m / (zeta(2) r^2)) times (at least once) until m words are used. The three
    most frequent have strictly larger counts than any other, and none is part of another word.
    Returns (items shuffled, the three most frequent words, counts by rank)."""
    rng = random.Random(seed_text)
    pool = list(_cwe_pool())
    rng.shuffle(pool)
    top: list[str] = []
    for w in pool:
        if not any(w in t or t in w for t in top):
            top.append(w)
            if len(top) == _FWE_TOP:
                break
    rest = [w for w in pool if not any(w in t or t in w for t in top)]
    counts, used, rank = [], 0, 1
    while used < m:
        c = min(m - used, max(1, int(m / (_ZETA_2 * rank * rank))))
        counts.append(c)
        used, rank = used + c, rank + 1
    if len(counts) > _FWE_TOP + len(rest):
        raise ValueError(f"fwe: {m} words need {len(counts)} distinct words; the word pool has {_FWE_TOP + len(rest)}")
    words = top + rest[:len(counts) - _FWE_TOP]
    items = [w for w, c in zip(words, counts) for _ in range(c)]
    rng.shuffle(items)
    return items, top, counts


def _fwe(tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job("fwe", tokenizer, length, seed, index)
    seed_text = f"{job.rng.getrandbits(64)}"
    question = ("Question: What are the three words that occur most often in the text above? "
                "Answer: The three words that occur most often in the text above are:")

    def build(m: int) -> Sample:
        items, top, _ = _fwe_items(seed_text, m)
        return Sample(task="fwe", sample_id=job.sample_id, context=" ".join(items), input=question,
                      answers=list(top), metric="recall_contained", max_new_tokens=32, template=_FWE_TEMPLATE)

    items, *_ = _fwe_items(seed_text, _FWE_MIN_ITEMS)
    per_item = max(1.0, sum(_batch_counts(tokenizer, [" " + w for w in items])) / len(items))
    m, sample, tokens = _fit_list(job, build, _FWE_MIN_ITEMS, per_item)
    _, top, counts = _fwe_items(seed_text, m)
    return job.finish(sample, tokens, required=list(top), num_items=m, counts=counts[:_FWE_TOP + 1])


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def _render_kv(pairs: Sequence[tuple[str, str]]) -> str:
    return "{\n" + ",\n".join(f'  "{k}": "{v}"' for k, v in pairs) + "\n}"


def _kv_retrieval(tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job("kv_retrieval", tokenizer, length, seed, index)
    rng = job.rng
    key, value = _distinct(rng, lambda: _uuid(rng), 2)
    depth = _depth(rng)
    question = f'Key: "{key}"\nThe value associated with the specified key is:'

    def make(pairs):
        return Sample(task="kv_retrieval", sample_id=job.sample_id, context=_render_kv(pairs), input=question,
                      answers=[value], metric="contains_answer", max_new_tokens=64, template=_KV_TEMPLATE)

    def with_target(filler):
        pairs = list(filler)
        pairs.insert(int(round(depth * len(pairs))), (key, value))
        return pairs

    base = job.measure(make([(key, value)]))
    pair_tokens = _batch_counts(tokenizer, [f'  "{key}": "{value}",\n'])[0]
    minimum = base + 2 * pair_tokens
    if job.length < minimum:
        raise job.too_short(base, minimum)
    n = int((job.length - base) / pair_tokens) + 1
    used = {key, value}
    # more candidate pairs than needed: UUIDs differ a little in token count, and swapping some pairs
    # for shorter or longer ones gives the fine control that whole pairs cannot
    spare = min(512, max(256, n))
    filler = []
    for _ in range(n + spare):
        pair = tuple(_distinct(rng, lambda: _uuid(rng), 2, avoid=used))
        used.update(pair)
        filler.append(pair)
    counts = _batch_counts(tokenizer, [f'  "{k}": "{v}",\n' for k, v in filler])
    sample, tokens, chosen = _fit(job, lambda chosen: make(with_target(filler[i] for i in chosen)),
                                  counts, base, tail=64, reserve=spare)
    if abs(tokens - length) > TOLERANCE * length:
        raise ValueError(f"length {length} cannot be fitted within {TOLERANCE:.0%} for task 'kv_retrieval' with "
                         f"this tokenizer (best {tokens} tokens): one key-value pair takes about {pair_tokens} "
                         f"tokens; use a longer length")
    return job.finish(sample, tokens, depth=depth, num_pairs=len(chosen) + 1)


def _qa(tokenizer, length: int, seed: int, index: int) -> Sample:
    job = _Job("qa", tokenizer, length, seed, index)
    rng = job.rng
    towns = rng.sample(_TOWNS, 6)
    n_rel = len(_QA_RELATIONS)
    target_rel = rng.randrange(n_rel)
    # the asked fact, the same relation for three other towns, two other relations of the same town
    # and two unrelated facts; every (town, relation) once and every value once
    combos = [(towns[0], target_rel)] + [(t, target_rel) for t in towns[1:4]]
    others = [r for r in range(n_rel) if r != target_rel]
    combos += [(towns[0], r) for r in rng.sample(others, 2)]
    while len(combos) < 8:
        c = (rng.choice(towns[1:]), rng.randrange(n_rel))
        if c not in combos:
            combos.append(c)
    pools = {"person": [f"{f} {s}" for f in _FIRST_NAMES for s in _SURNAMES], "river": list(_RIVERS),
             "boat": list(_BOATS)}
    used: set[str] = set()
    facts = []
    for town, r in combos:
        sentence, _, kind = _QA_RELATIONS[r]
        value = rng.choice([v for v in pools[kind] if v not in used])
        used.add(value)
        facts.append((town, r, value, sentence.format(town=town, value=value)))
    rng.shuffle(facts)
    target = next(f for f in facts if f[0] == towns[0] and f[1] == target_rel)
    answer = target[2]
    question = "Question: " + _QA_RELATIONS[target_rel][1].format(town=towns[0]) + "\nAnswer:"
    depths = [_depth(rng) for _ in facts]
    needles = [(d, f[3]) for d, f in zip(depths, facts)]

    def make(context):
        return Sample(task="qa", sample_id=job.sample_id, context=context, input=question, answers=[answer],
                      metric="contains_answer", max_new_tokens=32, template=_QA_TEMPLATE)

    sample, tokens = _haystack_sample(job, needles, make)
    return job.finish(sample, tokens, depth=depths[facts.index(target)], town=towns[0],
                      num_facts=len(facts))


def _qa_2hop(tokenizer, length: int, seed: int, index: int) -> Sample:
    """Two-hop retrieval: "P moved to T" and a fact about T are stated apart; the question names P
    only. Distractors: other people who moved to other towns, the same fact about those towns and a
    town nobody moved to, and other facts about T."""
    job = _Job("qa_2hop", tokenizer, length, seed, index)
    rng = job.rng
    towns = rng.sample(_TOWNS, 4)
    movers = _distinct(rng, lambda: f"{rng.choice(_FIRST_NAMES)} {rng.choice(_SURNAMES)}", 3)
    n_rel = len(_QA_RELATIONS)
    target_rel = rng.randrange(n_rel)
    combos = [(town, target_rel) for town in towns[:4]]
    combos += [(towns[0], r) for r in rng.sample([r for r in range(n_rel) if r != target_rel], 2)]
    pools = {"person": [f"{f} {s}" for f in _FIRST_NAMES for s in _SURNAMES], "river": list(_RIVERS),
             "boat": list(_BOATS)}
    used: set[str] = set(movers)
    facts = [(mover, town, None, f"{mover} moved to {town} last spring.", None) for mover, town in zip(movers, towns)]
    for town, r in combos:
        sentence, _, kind = _QA_RELATIONS[r]
        value = rng.choice([v for v in pools[kind] if v not in used])
        used.add(value)
        facts.append((None, town, r, sentence.format(town=town, value=value), value))
    answer = next(f[4] for f in facts if f[1] == towns[0] and f[2] == target_rel)
    sentences = [f[3] for f in facts]
    rng.shuffle(sentences)
    question = "Question: " + _QA_RELATIONS[target_rel][1].format(town=f"the town that {movers[0]} moved to") + "\nAnswer:"
    depths = [_depth(rng) for _ in sentences]

    def make(context):
        return Sample(task="qa_2hop", sample_id=job.sample_id, context=context, input=question, answers=[answer],
                      metric="contains_answer", max_new_tokens=32, template=_QA_TEMPLATE)

    sample, tokens = _haystack_sample(job, list(zip(depths, sentences)), make)
    return job.finish(sample, tokens, person=movers[0], town=towns[0], num_facts=len(sentences))


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": _passkey,
    "niah_single": functools.partial(_niah, "niah_single"),
    "niah_multikey": functools.partial(_niah, "niah_multikey"),
    "niah_multivalue": functools.partial(_niah, "niah_multivalue"),
    "niah_multiquery": functools.partial(_niah, "niah_multiquery"),
    "vt": _vt,
    "cwe": _cwe,
    "kv_retrieval": _kv_retrieval,
    "qa": _qa,
    "fwe": _fwe,
    "qa_2hop": _qa_2hop,
}


# ----------------------------------------------------------------------------------------------
# public API


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid tasks are: {', '.join(TASKS)}")


def generate_samples(task: str, tokenizer, n: int, length: int, seed: int) -> list[Sample]:
    """`n` samples of `task` whose prompts are `length` tokens (within 2%) for `tokenizer`.
    Sample i depends only on (task, length, seed, i), so a larger n extends a smaller one."""
    _check_task(task)
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if int(length) != length or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}")
    return [TASKS[task](tokenizer, int(length), int(seed), i) for i in range(int(n))]


def generate_suite(tokenizer, tasks: list[str], n: int, length: int, seed: int) -> list[Sample]:
    """`n` samples of each task in `tasks` (in that order); task names are checked first."""
    if isinstance(tasks, str):
        tasks = [tasks]
    for task in tasks:
        _check_task(task)
    out: list[Sample] = []
    for task in tasks:
        out.extend(generate_samples(task, tokenizer, n, length, seed))
    return out


def _schema(rows: list[dict]):
    import pyarrow as pa

    types = {"task": pa.string(), "sample_id": pa.string(), "context": pa.string(), "input": pa.string(),
             "answers": pa.list_(pa.string()), "metric": pa.string(), "max_new_tokens": pa.int64(),
             "template": pa.string(), "all_classes": pa.list_(pa.string()), "meta": pa.string()}
    from dataclasses import fields

    names = [f.name for f in fields(Sample)]
    if any(name not in types for name in names):
        return None  # Sample grew a field: let pyarrow infer
    return pa.schema([(name, types[name]) for name in names])


def save_samples(samples: Sequence[Sample], path) -> None:
    """Write samples to a parquet file, one row per sample (atomically: temp file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [s.to_row() for s in samples]
    schema = _schema(rows)
    if schema is None:
        table = pa.Table.from_pylist(rows)
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_samples(path) -> list[Sample]:
    """Read samples written by `save_samples`."""
    import pyarrow.parquet as pq

    return [Sample.from_row(row) for row in pq.read_table(path).to_pylist()]
