"""The Evaluator: model + tasks + memory policy -> per-prompt scores.

Used by `namm eval` and by the evolution workers. Prompts go through the model's chat
template when it has one; a context longer than the model's window is cropped in the middle
(first half + last half of its tokens, as LongBench does) and the crop is reported.
Full-cache reference scores are computed once per prompt and cached, since evolution divides
every candidate's score by them.
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from namm_core import FullCache, MemoryManagedLM, MemoryPolicy
from namm_core.files import text_config
from namm_core.generation import ROW_CAPTURES

from .metrics import score_prediction
from .prompts import encode_prompt
from .tasks.base import Sample

log = logging.getLogger(__name__)
FIDELITY_METRIC = "fidelity"
LOGLIK_TARGETS = ("reference", "full_cache")
# When the memory runs: "chunked" every `update_every` tokens while the prompt is read in chunks
# (the project's protocol, the NAMM's own); "agnostic" once, after a dense read of the context,
# before the question (kvpress's query-agnostic leaderboard setting); "aware" once, after the
# whole prompt, question included (kvpress's query-aware setting). In the two one-shot protocols
# the question and the reply are read with nothing more evicted, so the peak KV is the full cache's.
PROTOCOLS = ("chunked", "agnostic", "aware")
# The version of what a stored result means: bump it whenever a change to the evaluation, the
# tasks or a policy changes any score, so stored rows of older code are not reused (bench/).
EVAL_VERSION = 2


@dataclass
class SampleResult:
    sample_id: str
    task: str
    policy: str
    score: float
    prediction: str
    retention: float
    peak_kv_bytes: int
    final_kv_bytes: int
    seconds: float
    prompt_tokens: int
    cropped_tokens: int = 0
    retention_per_layer: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # fidelity: kl, perplexity, reference perplexity

    def to_row(self) -> dict:
        row = asdict(self)
        extra = row.pop("extra")
        for k in ("kl", "perplexity", "reference_perplexity"):
            row[k] = extra.get(k, math.nan)
        return row


class Evaluator:
    def __init__(self, model, tokenizer, update_every: Optional[int] = None, chunk_size: Optional[int] = None,
                 max_context: Optional[int] = None, fidelity_kl: bool = True, share_prefixes: int = 0,
                 row_capture: str = "inline"):
        self.model, self.tokenizer = model, tokenizer
        self.update_every, self.chunk_size = update_every, chunk_size
        if row_capture not in ROW_CAPTURES:
            raise ValueError(f"row_capture {row_capture!r}: expected one of {', '.join(ROW_CAPTURES)}")
        self.row_capture = row_capture   # how rows a policy reads are taken (MemoryManagedLM)
        self.max_context = max_context or int(getattr(text_config(model), "max_position_embeddings", 8192))
        self._encoded: dict[str, tuple[torch.Tensor, int]] = {}
        self._reference: dict[str, SampleResult] = {}
        self._fidelity_reference: dict[str, tuple[torch.Tensor, float]] = {}
        self._replies: dict[tuple[str, str], torch.Tensor] = {}
        self._reference_loglik: dict[tuple[str, str], SampleResult] = {}
        self.fidelity_kl = fidelity_kl
        # evolution runs many candidates on each prompt: keep up to `share_prefixes` prompts'
        # state before the first memory update (identical for every NAMM candidate), LRU
        self.share_prefixes = share_prefixes
        self._prefixes: OrderedDict = OrderedDict()

    # --- prompts -----------------------------------------------------------------------
    def encode(self, sample: Sample) -> tuple[torch.Tensor, int]:
        """[1, T] input ids for the sample, and how many context tokens were cropped."""
        key = sample.sample_id
        if key in self._encoded:
            return self._encoded[key]
        ids = self._encode_text(sample, sample.prompt())
        budget = self.max_context - sample.max_new_tokens
        cropped = 0
        if sample.metric != FIDELITY_METRIC and ids.shape[1] > budget:
            # crop the raw prompt in the middle so the templated prompt fits
            raw = self.tokenizer(sample.prompt(), add_special_tokens=False).input_ids
            overhead = ids.shape[1] - len(raw)
            keep = budget - overhead
            half = keep // 2
            text = self.tokenizer.decode(raw[:half]) + self.tokenizer.decode(raw[len(raw) - (keep - half):])
            cropped = len(raw) - keep
            ids = self._encode_text(sample, text, raw=True)
            log.warning("prompt %s: %d tokens over the model window (%d); cropped %d tokens in the middle",
                        sample.sample_id, cropped, self.max_context, cropped)
        self._encoded[key] = (ids, cropped)
        return ids, cropped

    def _encode_text(self, sample: Sample, text: str, raw: bool = False) -> torch.Tensor:
        if sample.metric == FIDELITY_METRIC:  # plain text: no template
            return self.tokenizer(sample.context, return_tensors="pt").input_ids
        return encode_prompt(self.tokenizer, text)

    # --- evaluation --------------------------------------------------------------------
    def compress_at(self, sample: Sample, protocol: str = "chunked") -> Optional[int]:
        """The column of the one-shot compression of a protocol (None: periodic updates)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if protocol == "chunked":
            return None
        if sample.metric == FIDELITY_METRIC:
            raise ValueError(f"prompt {sample.sample_id}: the fidelity task has no question to separate "
                             f"(protocol {protocol!r} needs one)")
        ids, _ = self.encode(sample)
        return ids.shape[1] if protocol == "aware" else question_start(self.tokenizer, sample, ids)

    def run_sample(self, sample: Sample, policy: MemoryPolicy, protocol: str = "chunked") -> SampleResult:
        ids, cropped = self.encode(sample)
        compress_at = self.compress_at(sample, protocol)
        lm = MemoryManagedLM(self.model, policy, update_every=self.update_every, chunk_size=self.chunk_size,
                             tokenizer=self.tokenizer, row_capture=self.row_capture)
        t = time.perf_counter()
        if sample.metric == FIDELITY_METRIC:
            return self._run_fidelity(sample, lm, ids, t)
        prefix = self._prefix(sample, lm, ids) if compress_at is None else None
        out = lm.generate(ids, max_new_tokens=sample.max_new_tokens, eos_token_id=self._eos_ids(),
                          pad_token_id=self.tokenizer.pad_token_id or 0, prefix=prefix, compress_at=compress_at)
        prediction = self.tokenizer.decode(out.sequences[0], skip_special_tokens=True).strip()
        score = score_prediction(prediction, sample.answers, sample.metric, sample.all_classes,
                                 dataset=sample.meta.get("dataset"))
        return self._result(sample, policy, score, prediction, out.stats, time.perf_counter() - t, ids, cropped)

    def run_loglik(self, sample: Sample, policy: MemoryPolicy, target: str = "reference",
                   protocol: str = "chunked") -> SampleResult:
        """Teacher-forced mean log-probability per token of a reply, under `policy`'s memory.

        target "reference": the sample's first reference answer; "full_cache": the full
        cache's own greedy reply (decoded once per prompt and cached). No decoding under the
        policy: one prefill of the prompt and the reply. The score is <= 0; higher is better.
        """
        ids, cropped = self.encode(sample)
        reply = self.reply_ids(sample, target)
        compress_at = self.compress_at(sample, protocol)
        lm = MemoryManagedLM(self.model, policy, update_every=self.update_every, chunk_size=self.chunk_size,
                             tokenizer=self.tokenizer, row_capture=self.row_capture)
        t = time.perf_counter()
        prefix = self._prefix(sample, lm, ids) if compress_at is None else None
        logp, stats = lm.continuation_logprobs(ids, reply, prefix=prefix, compress_at=compress_at)
        return self._result(sample, policy, float(logp.mean()), "", stats, time.perf_counter() - t, ids, cropped,
                            extra={"reply_tokens": int(reply.shape[1])})

    def reply_ids(self, sample: Sample, target: str = "reference") -> torch.Tensor:
        """[1, n] token ids of the reply a log-likelihood is taken of (see run_loglik)."""
        if target not in LOGLIK_TARGETS:
            raise ValueError(f"log-likelihood target {target!r}: expected one of {', '.join(LOGLIK_TARGETS)}")
        key = (sample.sample_id, target)
        if key not in self._replies:
            text = sample.answers[0] if sample.answers else ""
            if target == "full_cache":
                prediction = self.reference([sample])[sample.sample_id].prediction
                text = prediction or text   # an empty reply has no likelihood: fall back to the answer
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            if ids.shape[1] == 0:
                raise ValueError(f"prompt {sample.sample_id}: no reply to score (empty answer)")
            self._replies[key] = ids[:, : max(1, sample.max_new_tokens)]
        return self._replies[key]

    def reference_loglik(self, samples: Iterable[Sample], target: str = "reference") -> dict[str, SampleResult]:
        """Full-cache log-likelihood results, computed once per prompt and cached."""
        out = {}
        for sample in samples:
            key = (sample.sample_id, target)
            if key not in self._reference_loglik:
                self._reference_loglik[key] = self.run_loglik(sample, FullCache(), target)
            out[sample.sample_id] = self._reference_loglik[key]
        return out

    def evaluate(self, samples: Iterable[Sample], policy: MemoryPolicy,
                 progress: Optional[Callable[[SampleResult], None]] = None) -> list[SampleResult]:
        results = []
        for sample in samples:
            result = self.run_sample(sample, policy)
            results.append(result)
            if progress:
                progress(result)
        return results

    def reference(self, samples: Iterable[Sample],
                  progress: Optional[Callable[[SampleResult], None]] = None) -> dict[str, SampleResult]:
        """Full-cache results, computed once per prompt and cached."""
        out = {}
        for sample in samples:
            if sample.sample_id not in self._reference:
                self._reference[sample.sample_id] = self.run_sample(sample, FullCache())
                if progress:
                    progress(self._reference[sample.sample_id])
            out[sample.sample_id] = self._reference[sample.sample_id]
        return out

    # --- helpers -----------------------------------------------------------------------
    def _prefix(self, sample: Sample, lm: MemoryManagedLM, ids: torch.Tensor):
        policy_key = lm.policy.prefix_key()
        if not self.share_prefixes or policy_key is None:
            return None
        key = (sample.sample_id, policy_key)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
        else:
            self._prefixes[key] = lm.shared_prefix(ids)
            while len(self._prefixes) > self.share_prefixes:
                self._prefixes.popitem(last=False)
        return self._prefixes[key]

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return sorted(i for i in ids if i is not None)

    def _result(self, sample, policy, score, prediction, stats, seconds, ids, cropped, extra=None):
        return SampleResult(
            sample_id=sample.sample_id, task=sample.task, policy=policy.describe(), score=float(score),
            prediction=prediction, retention=stats.mean_retention, peak_kv_bytes=stats.peak_kv_bytes,
            final_kv_bytes=stats.final_kv_bytes, seconds=seconds, prompt_tokens=int(ids.shape[1]),
            cropped_tokens=cropped, retention_per_layer=[float(x) for x in stats.retention_per_layer],
            extra=extra or {})

    @torch.inference_mode()
    def _run_fidelity(self, sample, lm, ids, t0) -> SampleResult:
        """Next-token agreement with the full cache; with `fidelity_kl`, also KL(full || memory).

        The full cache's greedy predictions and perplexity are cached per prompt; the KL needs
        its whole distribution, so it costs a second forward and is skipped during evolution.
        """
        ids = ids[:, : self.max_context]
        out = lm.prefill_logits(ids)
        logp = F.log_softmax(out.logits[0, :-1].float(), -1)
        target = ids[0, 1:].to(logp.device)
        extra = {"perplexity": math.exp(-logp.gather(-1, target[:, None]).mean().item())}
        ref_logp = None
        if sample.sample_id not in self._fidelity_reference or self.fidelity_kl:
            full = MemoryManagedLM(self.model, FullCache(), update_every=lm.update_every,
                                   chunk_size=lm.chunk_size).prefill_logits(ids)
            ref_logp = F.log_softmax(full.logits[0, :-1].float(), -1)
            ref_ppl = math.exp(-ref_logp.gather(-1, target[:, None]).mean().item())
            self._fidelity_reference[sample.sample_id] = (ref_logp.argmax(-1), ref_ppl)
        ref_argmax, extra["reference_perplexity"] = self._fidelity_reference[sample.sample_id]
        agreement = (logp.argmax(-1) == ref_argmax).float().mean().item()
        if ref_logp is not None and self.fidelity_kl:
            extra["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
        return self._result(sample, lm.policy, agreement, "", out.stats, time.perf_counter() - t0, ids, 0, extra)


def question_start(tokenizer, sample: Sample, ids: torch.Tensor) -> int:
    """The number of prompt tokens before the sample's question (`input`): the context with the
    template's instruction and the chat template's header. ids [1, T] is the encoded prompt."""
    marker = "\x00namm-question\x00"
    head = sample.template.format(context=sample.context, input=marker).split(marker)[0]
    if not sample.input or head == sample.prompt():
        raise ValueError(f"prompt {sample.sample_id}: no question after the context to separate")
    # the chat-rendered text up to the question, tokenised alone, must be a prefix of the prompt's tokens
    rendered = _render(tokenizer, sample.prompt())
    start = rendered.index(sample.prompt()) + len(head) if sample.prompt() in rendered else None
    if start is None:
        raise ValueError(f"prompt {sample.sample_id}: the chat template changes the prompt text; cannot find its question")
    # as encode_prompt: a chat template writes its own special tokens, a plain prompt gets the tokenizer's
    chat = bool(getattr(tokenizer, "chat_template", None))
    encoding = tokenizer(rendered, add_special_tokens=not chat, return_offsets_mapping=True)
    if list(encoding.input_ids) != ids[0].tolist():
        raise ValueError(f"prompt {sample.sample_id}: the rendered prompt does not tokenise as the model input")
    before = sum(1 for s, e in encoding.offset_mapping if s < start and e > s) + \
        sum(1 for s, e in encoding.offset_mapping if s == e == 0)      # special tokens (BOS) carry no text
    if not 0 < before < ids.shape[1]:
        raise ValueError(f"prompt {sample.sample_id}: the question starts at token {before} of {ids.shape[1]}")
    return before


def _render(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return text
