"""Answer-scoring metrics: LongBench's, re-implemented from their definitions, plus two simple
ones (`exact_match`, `contains_answer`) for our synthetic tasks.

Every metric is ``f(prediction, ground_truth, all_classes=None) -> float`` with a value in
[0, 1]; `score_prediction` takes the best value over a sample's acceptable answers, as
LongBench's scorer does.

Where this module departs from LongBench's reference scorer (THUDM/LongBench, ``metrics.py``
and ``eval.py``), the departure is named in the function's docstring. In short:

* ROUGE-L is computed with Google's ``rouge-score`` instead of the ``rouge`` package. The
  tokens are made the same way as ``rouge`` makes them (case kept, split on whitespace and
  on "."), but ``rouge`` counts *distinct* words and sums a per-sentence "union LCS",
  whereas ``rouge-score`` takes one LCS over the token sequences with repeats counted. See
  `rouge_score`.
* Code similarity uses ``rapidfuzz`` in place of ``fuzzywuzzy``: the same 0-100 scale, but
  not rounded to a whole number, and an exact LCS-based ratio rather than difflib's
  approximate matching. See `code_sim_score`.
* `classification_score` applies its "drop partial matches" rule to every matching class;
  LongBench's loop removes items from the list it is iterating over, which can skip one.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Iterable, Optional, Union

Metric = Callable[..., float]

# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")


def _chinese_punctuation() -> frozenset[str]:
    """The punctuation set that LongBench strips from Chinese answers (besides ASCII).

    It is the list of the ``zhon`` package minus a few marks (notably the opening book-title
    bracket U+300A and the angle brackets U+3008/U+3009, which LongBench does *not* strip,
    while it does strip the closing U+300B). It is kept identical so scores stay comparable.
    """
    chars = set()
    # Full-width forms of the ASCII punctuation (U+FF01..U+FF5E), except the full-width full stop.
    chars.update(chr(ord(c) + 0xFEE0) for c in string.punctuation if c != ".")
    # Half-width CJK brackets/marks and white parentheses: U+FF5F..U+FF64.
    chars.update(chr(cp) for cp in range(0xFF5F, 0xFF65))
    # CJK symbols and punctuation.
    chars.update("\u3001\u3002\u3003")                              # ideographic comma, full stop, ditto
    chars.add("\u300B")                                             # right double angle bracket only
    chars.update(chr(cp) for cp in range(0x300C, 0x3012))           # corner / lenticular brackets
    chars.update(chr(cp) for cp in range(0x3014, 0x3020))           # tortoise-shell ... low quotation marks
    chars.update("\u3030\u303E\u303F")                              # wavy dash, ideographic variation marks
    # General punctuation: en/em dash, single and double quotation marks, ellipsis, hyphenation point.
    chars.update("\u2013\u2014")
    chars.update("\u2018\u2019\u201B\u201C\u201D\u201E\u201F")  # not the single low-9 mark U+201A
    chars.update("\u2026\u2027")
    chars.add("\uFE4F")                                             # wavy low line
    return frozenset(chars)


_ZH_PUNCT = _ASCII_PUNCT | _chinese_punctuation()


def normalize_answer(s: str) -> str:
    """English normalisation used by the QA metrics.

    Steps, in this order: lower-case; delete every ASCII punctuation character (deleted, not
    replaced by a space, so "don't" -> "dont" and "U.S." -> "us"); replace the whole words
    "a", "an" and "the" by a space; collapse runs of whitespace to one space and trim.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ASCII_PUNCT)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation: lower-case, delete ASCII and Chinese punctuation, delete all whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ZH_PUNCT)
    return "".join(s.split())


# --------------------------------------------------------------------------------------
# Tokenisers
# --------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." on first use
    return jieba


def _jieba_words(text: str) -> list[str]:
    """jieba's precise mode (``cut_all=False``, HMM on), as LongBench uses it."""
    return list(_jieba().cut(text, cut_all=False))


_ROUGE_SPLIT_RE = re.compile(r"[\s.]+")


class _RougeTokenizer:
    """Makes the word sequence the ``rouge`` package would score.

    ``rouge`` (used by LongBench) cuts a text into sentences at every "." and each sentence
    into words at whitespace, keeping case and all other punctuation. Concatenating the
    sentences' words gives this token list. (``rouge-score``'s default tokenizer would
    instead lower-case, split at every non-[a-z0-9] character and drop all other characters,
    including every Chinese one.)
    """

    def tokenize(self, text: str) -> list[str]:
        return [t for t in _ROUGE_SPLIT_RE.split(text) if t]


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

def _token_f1(prediction_tokens: list[str], ground_truth_tokens: list[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    overlap = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """Word-level F1 between the `normalize_answer` forms, words counted with multiplicity."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """Word-level F1 for Chinese: jieba words, each passed through `normalize_zh_answer`,
    words that normalise to nothing (punctuation, spaces) dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_words(text)) if w]

    return _token_f1(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """ROUGE-L F-measure (``rouge-score``'s ``rougeL``) on the tokens ``rouge`` would use.

    LongBench takes ``rouge``'s "rouge-l" F, which is close to but not the same as this:

    * ``rouge`` works on *sets* of words: the lengths in precision and recall are the numbers
      of distinct words, and the overlap is the number of distinct words in the union of the
      LCSs. ``rouge-score`` counts every token. E.g. "the dog" against "the cat and the dog":
      ``rouge`` gives P 2/2, R 2/4 (4 distinct words), F 0.667; here P 2/2, R 2/5, F 0.571.
    * ``rouge`` cuts both texts into sentences at "." and, for each reference sentence,
      unions its LCSs with every predicted sentence ("summary-level" ROUGE-L), so matches may
      come out of order across sentences. ``rouge-score``'s rougeL is one LCS over the whole
      token sequences.
    * Both give 0 for a prediction with no tokens (``rouge`` raises and LongBench returns 0).
    * ``rouge`` rebuilds each LCS recursively, so a sentence pair of more than about 1000
      words in all hits Python's recursion limit, and LongBench then scores 0. Chinese text
      has no "." between its sentences (it uses "。"), so long dureader/vcsum answers can hit
      this there; here they get their real score.
    """
    score = _rouge_l_scorer().score(ground_truth, prediction)["rougeL"]  # (target, prediction)
    return float(score.fmeasure)


def rouge_zh_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """`rouge_score` on Chinese text that jieba has cut into words joined by spaces."""
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """Credit split among the class names the prediction mentions.

    The candidates are the classes occurring as substrings of the (raw, case-sensitive)
    prediction. A candidate that is a proper substring of the ground truth is dropped (the
    prediction naming "Other location" should not also count as naming "location"). The score
    is 1 / (number of candidates left) if the ground truth is among them, else 0.

    LongBench drops those candidates while iterating over the same list, so when two of them
    are adjacent it skips the second; here every one is dropped.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes")
    matched = [c for c in all_classes if c in prediction]
    matched = [c for c in matched if not (c in ground_truth and c != ground_truth)]
    if ground_truth not in matched:
        return 0.0
    return 1.0 / len(matched)


def _share_of_numbers_equal_to(prediction: str, target: str) -> float:
    """Fraction of the integers written in `prediction` that equal `target` (as text); 0 if none."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def _paragraph_id(ground_truth: str, label: str) -> str:
    match = re.search(label + r"(\d+)", ground_truth) or re.search(r"\d+", ground_truth)
    if match is None:
        raise ValueError(f"no paragraph number in ground truth {ground_truth!r}")
    return match.group(match.lastindex or 0)


def retrieval_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """Which paragraph? The ground truth names it ("Paragraph 7"); the score is the share of
    the integers in the prediction that equal its number. A ground truth without the
    "Paragraph N" form falls back to its first integer (LongBench would raise)."""
    return _share_of_numbers_equal_to(prediction, _paragraph_id(ground_truth, r"Paragraph "))


def retrieval_zh_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """`retrieval_score` for the Chinese form of the ground truth ("段落7")."""
    return _share_of_numbers_equal_to(prediction, _paragraph_id(ground_truth, "段落"))


def count_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """Share of the integers in the prediction that equal the ground truth (compared as text,
    so "04" is not "4"); 0 if the prediction has no integer."""
    return _share_of_numbers_equal_to(prediction, str(ground_truth).strip())


def code_sim_score(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """Similarity of the predicted next line of code to the reference line.

    The predicted line is the first line (after leading blank lines) containing none of
    "`", "#" and "//", i.e. markdown fences and comment lines are skipped; the empty string
    if there is none. The score is ``rapidfuzz.fuzz.ratio / 100``: 1 - InDel distance /
    total length = 2 * LCS / (len(a) + len(b)).

    LongBench uses ``fuzzywuzzy.fuzz.ratio``, which without python-Levenshtein is difflib's
    ``SequenceMatcher.ratio`` (2 * matched / total, where the matching is greedy and can be
    shorter than the LCS, and long strings get difflib's "autojunk" heuristic) rounded to a
    whole percent. Here there is no rounding and the match is the exact LCS, so values can be
    slightly higher. Both give 0 when exactly one side is empty and 1 when both are empty.
    """
    from rapidfuzz import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, ground_truth) / 100.0


def exact_match(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """1 if both sides have the same non-empty `normalize_answer` form, else 0."""
    p = normalize_answer(prediction)
    return float(bool(p) and p == normalize_answer(ground_truth))


def contains_answer(prediction: str, ground_truth: str, all_classes: Optional[list[str]] = None) -> float:
    """1 if the `normalize_answer` form of the ground truth occurs in that of the prediction
    (plain substring test, as RULER scores its retrieval tasks), else 0. A ground truth that
    normalises to nothing scores 0 rather than matching everything."""
    g = normalize_answer(ground_truth)
    return float(bool(g) and g in normalize_answer(prediction))


def recall_contained(prediction: str, required: list[str]) -> float:
    """Share of the required values whose `normalize_answer` form occurs in the prediction's
    (RULER's multi-value / multi-query / variable-tracking / common-words score)."""
    if not required:
        return 0.0
    return sum(contains_answer(prediction, value) for value in required) / len(required)


def recall_contained_marker(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Placeholder in METRICS: `score_prediction` scores "recall_contained" over all answers."""
    return recall_contained(prediction, [ground_truth])


METRICS: dict[str, Metric] = {
    f.__name__: f for f in (
        qa_f1_score, qa_f1_zh_score, rouge_score, rouge_zh_score, classification_score,
        retrieval_score, retrieval_zh_score, count_score, code_sim_score, exact_match, contains_answer,
    )
}
METRICS["recall_contained"] = recall_contained_marker

# --------------------------------------------------------------------------------------
# LongBench datasets
# --------------------------------------------------------------------------------------

_LONGBENCH: dict[str, tuple[str, int]] = {
    # dataset: (metric, max new tokens)
    "narrativeqa": ("qa_f1_score", 128),
    "qasper": ("qa_f1_score", 128),
    "multifieldqa_en": ("qa_f1_score", 64),
    "multifieldqa_zh": ("qa_f1_zh_score", 64),
    "hotpotqa": ("qa_f1_score", 32),
    "2wikimqa": ("qa_f1_score", 32),
    "musique": ("qa_f1_score", 32),
    "dureader": ("rouge_zh_score", 128),
    "gov_report": ("rouge_score", 512),
    "qmsum": ("rouge_score", 512),
    "multi_news": ("rouge_score", 512),
    "vcsum": ("rouge_zh_score", 512),
    "trec": ("classification_score", 64),
    "triviaqa": ("qa_f1_score", 32),
    "samsum": ("rouge_score", 128),
    "lsht": ("classification_score", 64),
    "passage_count": ("count_score", 32),
    "passage_retrieval_en": ("retrieval_score", 32),
    "passage_retrieval_zh": ("retrieval_zh_score", 32),
    "lcc": ("code_sim_score", 64),
    "repobench-p": ("code_sim_score", 64),
}
# LongBench-E: the same datasets re-sampled by length; scored and generated like their originals.
_LONGBENCH_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
                "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")

LONGBENCH_DATASET_METRIC: dict[str, str] = {name: m for name, (m, _) in _LONGBENCH.items()}
LONGBENCH_DATASET_METRIC.update({f"{name}_e": _LONGBENCH[name][0] for name in _LONGBENCH_E})

LONGBENCH_MAX_NEW_TOKENS: dict[str, int] = {name: n for name, (_, n) in _LONGBENCH.items()}
LONGBENCH_MAX_NEW_TOKENS.update({f"{name}_e": _LONGBENCH[name][1] for name in _LONGBENCH_E})

# Datasets whose predictions LongBench cuts at the first line break before scoring (few-shot
# tasks, where a model tends to carry on with a made-up next example).
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def first_line(prediction: str) -> str:
    """The prediction up to its first line break, leading line breaks ignored."""
    return prediction.lstrip("\n").split("\n", 1)[0]


def _base_dataset(dataset: str) -> str:
    return dataset[:-2] if dataset.endswith("_e") else dataset


def score_prediction(prediction: str, answers: Union[str, Iterable[str]], metric: Union[str, Metric, None],
                     all_classes: Optional[list[str]] = None, dataset: Optional[str] = None) -> float:
    """Best score of `prediction` over the acceptable `answers` (0 if there are none).

    `metric` is a name from `METRICS` or a metric function; None means the LongBench metric
    of `dataset`. When `dataset` is one of `FIRST_LINE_DATASETS` (or its LongBench-E
    variant), the prediction is first cut to its first line, as LongBench does.
    """
    if metric is None:
        if dataset is None:
            raise ValueError("score_prediction needs a metric or a LongBench dataset")
        metric = LONGBENCH_DATASET_METRIC[dataset]
    if isinstance(metric, str):
        try:
            fn = METRICS[metric]
        except KeyError:
            raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}") from None
    else:
        fn = metric
    if dataset is not None and _base_dataset(dataset) in FIRST_LINE_DATASETS:
        prediction = first_line(prediction)
    if isinstance(answers, str):
        answers = [answers]
    if fn is recall_contained_marker:  # scores the whole answer list at once
        return recall_contained(prediction, list(answers))
    return max((float(fn(prediction, answer, all_classes=all_classes)) for answer in answers), default=0.0)
