"""What a task hands the evaluator: samples with a context, a question, answers and a metric."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

DEFAULT_TEMPLATE = "{context}\n\n{input}"


@dataclass
class Sample:
    task: str                      # task name, e.g. "passkey" or a LongBench dataset name
    sample_id: str                 # stable id, unique within a suite
    context: str                   # the long context
    input: str                     # the question / instruction that follows the context
    answers: list[str]             # acceptable answers (the metric takes the best)
    metric: str                    # a key of namm_eval.metrics.METRICS
    max_new_tokens: int = 32
    template: str = DEFAULT_TEMPLATE   # str.format template with {context} and {input}
    all_classes: Optional[list[str]] = None
    meta: dict = field(default_factory=dict)

    def prompt(self, context: Optional[str] = None) -> str:
        return self.template.format(context=self.context if context is None else context, input=self.input)

    def to_row(self) -> dict:
        row = asdict(self)
        row["meta"] = json.dumps(self.meta)
        return row

    @staticmethod
    def from_row(row: dict) -> "Sample":
        row = dict(row)
        meta = row.get("meta") or "{}"
        row["meta"] = json.loads(meta) if isinstance(meta, str) else dict(meta)
        row["answers"] = list(row["answers"])
        if row.get("all_classes") is not None:
            row["all_classes"] = list(row["all_classes"])
        return Sample(**row)
