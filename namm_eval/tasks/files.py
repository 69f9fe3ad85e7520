"""Task files in LongBench's format (JSONL or parquet), LongBench's own or a user's.

One record per line with the fields `input`, `context`, `answers` (a list), and optionally
`dataset`, `all_classes`, `_id`, `length`, `language`, `metric`, `max_new_tokens`. The dataset
name picks the metric, the generation length and the prompt template; a file without `dataset`
uses the file name. A dataset LongBench does not know is scored by QA F1 unless the record names
its `metric` (e.g. `contains_answer` for "the reply contains the answer") or the caller does.

The built-in templates below are our own wording of the same structure as LongBench's
(context, then the instruction and question). For numbers comparable to published LongBench
results, pass LongBench's own `dataset2prompt.json` as `templates_file`: its templates use the
same `{context}` and `{input}` fields.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .base import Sample

REQUIRED_FIELDS = ("input", "context", "answers")

_QA = ("Read the text below and answer the question. Reply with the answer only, as briefly as possible.\n\n"
       "{context}\n\nQuestion: {input}\nAnswer:")
_QA_ZH = "请阅读下面的文本并回答问题，只需给出答案，尽量简短。\n\n{context}\n\n问题：{input}\n回答："
_SUMMARY = "Read the text below and write a one-paragraph summary of it.\n\n{context}\n\n{input}\nSummary:"
_SUMMARY_ZH = "请阅读下面的文本，并用一段话总结它。\n\n{context}\n\n{input}\n总结："
_QUERY_SUMMARY = ("Read the meeting transcript below and answer the query about it in a few sentences.\n\n"
                  "{context}\n\nQuery: {input}\nAnswer:")
_FEW_SHOT = "{context}\n{input}"
_CLASSIFY = "Label the last question with one of the categories used in the examples.\n\n{context}\n{input}"
_COUNT = ("The text below holds several paragraphs, some of them repeated. How many different paragraphs are "
          "there? Reply with the number only.\n\n{context}\n\nThe number of different paragraphs is:")
_RETRIEVE = ("Below are numbered paragraphs and then a summary. Which paragraph is the summary about? Reply "
             "in the form \"Paragraph N\".\n\n{context}\n\nSummary: {input}\n\nThe summary is about:")
_RETRIEVE_ZH = "下面是若干编号段落和一段摘要。摘要出自哪一段？请按\"段落N\"的格式回答。\n\n{context}\n\n摘要：{input}\n\n答案："
_CODE = "Continue the code below with its next line.\n\n{context}Next line of code:\n"
_REPO_CODE = "Continue the code below with its next line.\n\n{context}{input}Next line of code:\n"

BUILTIN_TEMPLATES = {
    **{d: _QA for d in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique")},
    "multifieldqa_zh": _QA_ZH, "dureader": _QA_ZH,
    "gov_report": _SUMMARY, "multi_news": _SUMMARY, "vcsum": _SUMMARY_ZH, "qmsum": _QUERY_SUMMARY,
    "trec": _CLASSIFY, "lsht": _CLASSIFY, "triviaqa": _FEW_SHOT, "samsum": _FEW_SHOT,
    "passage_count": _COUNT, "passage_retrieval_en": _RETRIEVE, "passage_retrieval_zh": _RETRIEVE_ZH,
    "lcc": _CODE, "repobench-p": _REPO_CODE,
}
DEFAULT_METRIC = "qa_f1_score"
DEFAULT_MAX_NEW_TOKENS = 64


def _dataset_name(name: str) -> str:
    return name[:-2] if name.endswith("_e") else name  # LongBench-E files share their dataset's settings


def load_task_file(path, templates_file: Optional[str] = None, limit: Optional[int] = None,
                   metric: Optional[str] = None) -> list[Sample]:
    """Samples from a LongBench-format file; errors name the file and line.

    `limit` is per dataset: a file holding several datasets gives the first `limit` records of
    each. The metric is, in order: `metric` (the caller's, e.g. `namm eval --metric`), the
    record's own `metric` field, LongBench's metric for a dataset it knows, else QA F1.
    """
    from ..metrics import LONGBENCH_DATASET_METRIC, LONGBENCH_MAX_NEW_TOKENS, METRICS

    if metric is not None and metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not known; known: {', '.join(sorted(METRICS))}")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    records = list(_read_records(path))
    if not records:
        raise ValueError(f"task file {path} is empty")
    templates = dict(BUILTIN_TEMPLATES)
    if templates_file:
        templates.update(json.loads(Path(templates_file).read_text()))
    samples = []
    taken: dict[str, int] = {}
    for line_no, record in records:
        dataset = str(record.get("dataset") or path.stem)
        if limit and taken.get(dataset, 0) >= limit:
            continue
        taken[dataset] = taken.get(dataset, 0) + 1
        missing = [f for f in REQUIRED_FIELDS if f not in record or record[f] is None]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing field(s) {missing}; a task record needs {list(REQUIRED_FIELDS)}")
        answers = record["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, (list, tuple)) or not answers:
            raise ValueError(f"{path}:{line_no}: 'answers' must be a non-empty list of strings")
        key = _dataset_name(dataset)
        own_metric = record.get("metric")
        if own_metric is not None and own_metric not in METRICS:
            raise ValueError(f"{path}:{line_no}: metric {own_metric!r} is not known; known: {', '.join(sorted(METRICS))}")
        chosen_metric = metric or own_metric or LONGBENCH_DATASET_METRIC.get(key, DEFAULT_METRIC)
        max_new = record.get("max_new_tokens") or LONGBENCH_MAX_NEW_TOKENS.get(key, DEFAULT_MAX_NEW_TOKENS)
        template = templates.get(key, templates.get(dataset, _QA))
        sample_id = str(record.get("_id") or f"{path.stem}-{line_no}")
        samples.append(Sample(
            task=dataset, sample_id=sample_id, context=str(record["context"]), input=str(record["input"]),
            answers=[str(a) for a in answers], metric=chosen_metric, max_new_tokens=int(max_new), template=template,
            all_classes=list(record["all_classes"]) if record.get("all_classes") else None,
            meta={"source": str(path), "line": line_no, "dataset": key}))
    return samples


def _read_records(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"task file {path}: expected .jsonl or .parquet")
    for line_no, record in read_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object")
        yield line_no, record


def read_jsonl(path: Path, text: Optional[str] = None):
    """(line number, parsed value) for every non-blank line; errors name the file and line."""
    lines = (text if text is not None else Path(path).read_text(encoding="utf-8")).splitlines()
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
