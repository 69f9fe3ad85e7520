"""Memory-managed inference: chunked prefill and a greedy decode loop that own the cache.

`model.generate()` cannot continue from a compacted cache, so the loop is ours. Every
forward passes explicit absolute `position_ids`: after evictions the cache length no longer
says where a sequence is, and RoPE must keep counting from the true position.
The policy runs every `update_every` columns of absolute length, in prefill (chunks are cut
at those boundaries) and in decoding alike.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import attention
from .cache import MemoryCache
from .files import text_config
from .policies import FullCache, MemoryPolicy, Reconstruction, StepInfo
from .sampling import GenerationConfig, TokenChooser, make_generation_config

log = logging.getLogger(__name__)


@dataclass
class MemoryStats:
    """What one generation cost and kept."""
    tokens_seen: list[int] = field(default_factory=list)          # per sequence
    kept_per_layer_head: Optional[torch.Tensor] = None            # [L, B, H] tokens kept at the end
    peak_kv_bytes: int = 0
    final_kv_bytes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    policy_seconds: float = 0.0       # observe + select: the policy's own code
    observe_seconds: float = 0.0      # folding attention into features (NAMM: spectrogram)
    select_seconds: float = 0.0       # scoring and eviction (NAMM: BAM scorer, compaction)
    updates: int = 0

    @property
    def retention_per_layer(self) -> torch.Tensor:
        """[L] mean over batch and heads of kept / seen."""
        seen = torch.tensor(self.tokens_seen, dtype=torch.float32).view(1, -1, 1)
        return (self.kept_per_layer_head.float() / seen.clamp(min=1)).mean(dim=(1, 2))

    def sequence_retention(self, b: int) -> float:
        """Kept / seen of sequence b, averaged over layers and heads."""
        return float((self.kept_per_layer_head[:, b].float() / max(1, self.tokens_seen[b])).mean())

    @property
    def mean_retention(self) -> float:
        return float(self.retention_per_layer.mean())

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


@dataclass
class GenerationOutput:
    sequences: torch.Tensor          # [B, n_new] generated ids (pad after EOS)
    stats: MemoryStats
    logits: Optional[torch.Tensor] = None  # [B, T + n_new - 1, V] every position's logits, when asked for


def check_supported(model) -> None:
    """Fail early, with the reason, for a model the memory cannot serve."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder") and not hasattr(model, "model"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM")
    text = text_config(config)
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(
            f"{type(model).__name__} does not route attention through transformers' attention interface; "
            "the memory serves models that do (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...)")
    if any(t not in ("full_attention", "sliding_attention") for t in (getattr(text, "layer_types", None) or [])):
        raise TypeError(f"{type(model).__name__} has non-attention layers ({set(text.layer_types)}); "
                        "the memory serves pure attention decoders")


def _with_memory_attention(method):
    """Run `method` with the model on the memory's attention function, then give the model back
    its own (the caller's model is left as it was found)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        model = self.model
        previous = model.config._attn_implementation
        name = attention.register()
        if previous == name:   # nested call
            return method(self, *args, **kwargs)
        model.set_attn_implementation(name)
        try:
            return method(self, *args, **kwargs)
        finally:
            model.set_attn_implementation(previous)
    return wrapper


DEFAULT_UPDATE_EVERY = 512
DEFAULT_CHUNK_SIZE = 512
# a column no run reaches: `next_update` once a one-shot compression is done, and `last_column`
# when the run's length is not known (a shared prefix)
NEVER = 2**62


def resolve_memory_settings(policy: MemoryPolicy, update_every: Optional[int] = None,
                            chunk_size: Optional[int] = None) -> tuple[int, int]:
    """The update interval and chunk size to run `policy` with.

    A NAMM records the settings it was evolved with; they apply unless the caller gives
    others, and an override that differs is logged (a NAMM run at another interval sees
    other features than it was evolved on). Other policies default to 512 / 512.
    """
    recorded = policy.memory_settings() if hasattr(policy, "memory_settings") else {}
    chosen = {}
    for name, given, default in (("update_every", update_every, DEFAULT_UPDATE_EVERY),
                                 ("chunk_size", chunk_size, DEFAULT_CHUNK_SIZE)):
        if given is not None and (isinstance(given, bool) or int(given) != given or given <= 0):
            raise ValueError(f"{name} must be a positive integer, got {given!r}")
        if given is not None and name in recorded and int(given) != recorded[name]:
            log.warning("%s: %s=%d overrides the %d it was evolved with", policy.describe(), name,
                        int(given), recorded[name])
        chosen[name] = int(given) if given is not None else recorded.get(name, default)
    return chosen["update_every"], chosen["chunk_size"]


ROW_CAPTURES = ("inline", "separate")


class MemoryManagedLM:
    """A causal LM whose KV cache is managed by a memory policy.

    >>> lm = MemoryManagedLM(model, policy=NAMM.from_pretrained("namms/smollm2"))
    >>> out = lm.generate(input_ids, max_new_tokens=32)
    """

    def __init__(self, model, policy: Optional[MemoryPolicy] = None, update_every: Optional[int] = None,
                 chunk_size: Optional[int] = None, tokenizer=None, row_capture: str = "inline"):
        """`row_capture`: how the attention rows a policy reads are taken (namm_core.attention):
        "inline" (an eager attention hands its probabilities over; on CPU as fast as
        "separate" or faster, bench/row_capture_bench.py) or "separate" (every output from torch's fused sdpa,
        the read rows' probabilities computed apart: meant for GPUs, not measured on one). Given the same inputs an attention
        call hands over the same rows either way; over a run they differ by the two kernels'
        rounding of the outputs later layers read."""
        check_supported(model)
        if row_capture not in ROW_CAPTURES:
            raise ValueError(f"row_capture {row_capture!r}: expected one of {', '.join(ROW_CAPTURES)}")
        self.row_capture = row_capture
        self.policy = policy or FullCache()
        self.update_every, self.chunk_size = resolve_memory_settings(self.policy, update_every, chunk_size)
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.policy.bind_tokenizer(tokenizer)
        self.policy.bind_model(model)
        attention.register()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------
    @_with_memory_attention
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: Optional[int] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
                 return_logits: bool = False, prefix: Optional["SharedPrefix"] = None,
                 generation_config: Optional[GenerationConfig] = None, streamer=None, seed: Optional[int] = None,
                 compress_at: Optional[int] = None, **generation_kwargs) -> GenerationOutput:
        """Generate from input_ids [B, T], left-padded where attention_mask is 0.

        Decoding follows a transformers `GenerationConfig` (greedy by default; `do_sample`,
        `temperature`, `top_k`, `top_p`, `repetition_penalty`, `stop_strings`, EOS/pad ids);
        keyword arguments override its fields. `seed` makes sampling reproducible. `streamer`
        (transformers' `TextStreamer` / `TextIteratorStreamer`, batch size 1) receives the
        prompt and then each new token as it is made. `prefix` (from `shared_prefix`) resumes
        from a stored state of the same prompt instead of recomputing the columns before the
        first memory update. `compress_at` replaces the periodic updates by one, when that many
        columns have been processed (kvpress's protocol: compress once after a dense prefill of
        the context, then read the question and decode with nothing more evicted).
        """
        config = make_generation_config(generation_config, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, **generation_kwargs)
        input_ids, attention_mask = self._checked_prompt(input_ids, attention_mask)
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"a streamer takes one sequence; got a batch of {input_ids.shape[0]}")
        if prefix is not None and return_logits:
            raise ValueError("a shared prefix keeps only its last logits; return_logits needs a full run")
        if prefix is not None and compress_at is not None:
            raise ValueError("a shared prefix is taken before the first periodic update: not with compress_at")
        chooser = TokenChooser(config, self.device, tokenizer=self.tokenizer, seed=seed)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits_all: Optional[list] = [] if return_logits else None
        # the last forward reads the next-to-last new token (the last one is never fed back)
        last_column = input_ids.shape[1] + max(config.max_new_tokens - 1, 0)
        cache, state, stats, last_logits = self._prefill(input_ids, attention_mask, prefix, compress_at, logits_all,
                                                         last_column)
        t1 = time.perf_counter()
        generated = self._decode(cache, state, stats, input_ids, last_logits, chooser, config, streamer, logits_all)
        stats.decode_seconds = time.perf_counter() - t1
        if streamer is not None:
            streamer.end()
        _record_what_was_kept(stats, state, cache)
        return GenerationOutput(sequences=generated, stats=stats,
                                logits=torch.cat(logits_all, dim=1) if return_logits else None)

    def _checked_prompt(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).bool()
        if input_ids.shape[1] == 0 or not attention_mask[:, -1].all():
            raise ValueError("prompts must be non-empty and left-padded (the last column real for every row)")
        return input_ids, attention_mask

    def _prefill(self, input_ids, attention_mask, prefix: Optional["SharedPrefix"], compress_at: Optional[int],
                 logits_all: Optional[list], last_column: int = NEVER):
        """Read the prompt chunk by chunk (from a shared prefix's state when given), updating the
        memory on the way; returns the cache, the loop state, the stats and the last logits."""
        t0 = time.perf_counter()
        T = input_ids.shape[1]
        if prefix is not None:
            prefix.check(self, input_ids)
            cache, state, stats, start, last_logits = prefix.restore()
            state.last_column = last_column
            self.policy.new_sequence()
            self._maybe_update(cache, state, stats, start)
        else:
            cache, state, stats = self._start(attention_mask, compress_at, T, last_column)
            start, last_logits = 0, None
        while start < T:
            end = min(start + self.chunk_size, state.next_update, T)
            logits = self._forward(cache, input_ids[:, start:end], state.positions[:, start:end].clamp(min=0),
                                   attention_mask[:, start:end], start, state, stats, keep_all=logits_all is not None)
            if logits_all is not None:
                logits_all.append(logits)
            last_logits = logits[:, -1]
            start = end
        stats.prefill_seconds += time.perf_counter() - t0
        return cache, state, stats, last_logits

    def _decode(self, cache, state, stats, input_ids, last_logits, chooser, config, streamer,
                logits_all: Optional[list]) -> torch.Tensor:
        """New tokens one at a time until every row has finished or max_new_tokens are made;
        finished rows get the pad token."""
        B, T = input_ids.shape
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        generated = torch.full((B, config.max_new_tokens), pad_token_id, dtype=torch.long, device=self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        next_pos = state.positions[:, -1] + 1
        for i in range(config.max_new_tokens):
            sequences = torch.cat([input_ids, generated[:, :i]], dim=1)
            token = chooser(sequences, last_logits)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            generated[:, i] = token
            if streamer is not None:
                streamer.put(token.cpu())
            finished |= chooser.finished(torch.cat([sequences, token[:, None]], dim=1), token)
            if finished.all() or i == config.max_new_tokens - 1:
                break
            real = torch.ones(B, 1, dtype=torch.bool, device=self.device)
            logits = self._forward(cache, token.view(B, 1), next_pos.view(B, 1), real, T + i, state, stats)
            if logits_all is not None:
                logits_all.append(logits)
            last_logits = logits[:, -1]
            next_pos = next_pos + 1
        return generated

    @_with_memory_attention
    @torch.inference_mode()
    def shared_prefix(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                      ) -> "SharedPrefix":
        """Run a prompt up to its first memory update and keep that state for reuse.

        Before the first update nothing is evicted, so every policy with the same
        `prefix_key()` (for a NAMM: the same feature settings, whatever its parameters)
        computes this state identically; evolution evaluates many candidates per prompt.
        """
        key = self.policy.prefix_key()
        if key is None:
            raise ValueError(f"policy {self.policy.describe()} does not support shared prefixes")
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)).bool()
        if not attention_mask.all():
            raise ValueError("shared prefixes are for unpadded prompts")
        cache, state, stats = self._start(attention_mask)
        t0 = time.perf_counter()
        start, last_logits, stop = 0, None, min(self.update_every, T)
        while start < stop:
            end = min(start + self.chunk_size, stop)
            logits = self._forward(cache, input_ids[:, start:end], state.positions[:, start:end], attention_mask[:, start:end],
                                   start, state, stats, update=False)
            last_logits, start = logits[:, -1], end
        stats.prefill_seconds = time.perf_counter() - t0
        cache.release_buffers()  # a stored prefix holds only its state
        return SharedPrefix(key=key, input_ids=input_ids[:, :stop].cpu(), update_every=self.update_every,
                            row_capture=self.row_capture, cache=cache, state=state, stats=stats, end=stop, last_logits=last_logits)

    @_with_memory_attention
    @torch.inference_mode()
    def continuation_logprobs(self, input_ids: torch.Tensor, continuation_ids: torch.Tensor,
                              prefix: Optional["SharedPrefix"] = None, compress_at: Optional[int] = None
                              ) -> tuple[torch.Tensor, MemoryStats]:
        """Teacher-forced log-probabilities of `continuation_ids` [1, n] after the prompt [1, T].

        The continuation runs through the memory exactly as decoding it would: the same
        columns, the same update boundaries (chunks are cut there), the same policy calls,
        so this is the likelihood the managed model gives that reply, without decoding.
        `compress_at` as in `generate`. Returns ([n] float32 log-probabilities, memory statistics).
        """
        if input_ids.shape[0] != 1 or continuation_ids.shape[0] != 1:
            raise ValueError("continuation_logprobs scores one prompt at a time")
        n = continuation_ids.shape[1]
        if n == 0:
            raise ValueError("continuation_logprobs needs at least one continuation token")
        T = input_ids.shape[1]
        ids = torch.cat([input_ids, continuation_ids.to(input_ids.device)], dim=1).to(self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        t0 = time.perf_counter()
        if prefix is not None:
            if compress_at is not None:
                raise ValueError("a shared prefix is taken before the first periodic update: not with compress_at")
            prefix.check(self, ids)
            cache, state, stats, start, _ = prefix.restore()
            state.positions, state.mask = torch.arange(ids.shape[1], device=self.device).view(1, -1), mask
            state.last_column = ids.shape[1] - 1
            self.policy.new_sequence()
            self._maybe_update(cache, state, stats, start)
        else:
            cache, state, stats = self._start(mask, compress_at, T, last_column=ids.shape[1] - 1)
            start = 0
        if start > T - 1:
            raise ValueError("the shared prefix reaches into the continuation")
        pieces = []
        while start < ids.shape[1] - 1:   # the last token's own prediction is not needed
            end = min(start + self.chunk_size, state.next_update, ids.shape[1] - 1)
            needed = end - max(start, T - 1)    # logits of columns >= T - 1 predict the continuation
            logits = self._forward(cache, ids[:, start:end], state.positions[:, start:end], mask[:, start:end],
                                   start, state, stats, logits_to_keep=max(needed, 1))
            if needed > 0:
                pieces.append(logits[:, -needed:])
            start = end
        stats.prefill_seconds += time.perf_counter() - t0
        logp = torch.log_softmax(torch.cat(pieces, dim=1)[0].float(), dim=-1)
        target = continuation_ids[0].to(logp.device)
        _record_what_was_kept(stats, state, cache)
        return logp.gather(-1, target[:, None])[:, 0].cpu(), stats

    def _start(self, attention_mask: torch.Tensor, compress_at: Optional[int] = None, prompt_columns: int = 0,
               last_column: int = NEVER):
        """A fresh cache, loop state and statistics for one batch of prompts; `last_column`: how
        many columns the run will have read after its last forward, when known."""
        if compress_at is not None and (isinstance(compress_at, bool) or int(compress_at) != compress_at
                                        or not 0 < compress_at <= prompt_columns):
            raise ValueError(f"compress_at must be a column of the prompt (1..{prompt_columns}), got {compress_at!r}")
        cache = MemoryCache(self.model.config, aux_shapes=getattr(self.policy, "aux_shapes", {}))
        if self.policy.needs_attention:
            # layers the policy does not observe carry none of its per-token statistics
            cache.observed_layers = self.policy.observed_layers(len(cache.layers))
        self.policy.new_sequence()
        state = _LoopState(positions=attention_mask.long().cumsum(-1) - 1, mask=attention_mask,
                           next_update=self.update_every if compress_at is None else int(compress_at),
                           one_shot=compress_at is not None, last_column=last_column)
        if self.policy.reconstructs:
            state.history = ([], [])
        return cache, state, MemoryStats()

    def prefill_logits(self, input_ids, attention_mask=None) -> GenerationOutput:
        """Logits for every prompt position under the memory (for fidelity and perplexity)."""
        return self.generate(input_ids, attention_mask, max_new_tokens=1, return_logits=True)

    # ------------------------------------------------------------------------------------
    def _forward(self, cache, ids, positions, real, first_column, state, stats, keep_all=False, update=True,
                 logits_to_keep: int = 1):
        B, Q = ids.shape
        columns = torch.arange(first_column, first_column + Q, device=self.device).expand(B, Q)
        cache.set_chunk(positions, real, columns)
        state.seen = state.seen + real.sum(-1)
        processed = first_column + Q
        step = StepInfo(seen=state.seen, processed=processed, query_positions=positions,
                        query_valid=real, next_update=state.next_update, query_ids=ids)
        policy = self.policy
        cache.observer = cache.query_observer = None
        if state.history is not None:       # a policy that re-reads tokens at its updates keeps them
            state.history[0].append(ids)
            state.history[1].append(real)
        # attention seen after the run's last update feeds no decision: not captured (the forward
        # runs on the fused kernel) when the policy's observations only feed its updates
        wasted = policy.observations_feed_updates_only and state.next_update > state.last_column
        # a policy that reads only the rows just before its update: the chunk's earlier rows are not captured
        first_read = policy.first_observed_column(state.next_update)
        cache.observe_from = 0 if first_read is None else min(Q, max(0, first_read - first_column))
        cache.observe_dtype = policy.observation_dtype
        cache.row_capture = self.row_capture
        wasted = wasted or cache.observe_from >= Q
        if policy.needs_queries and not wasted:
            def query_observer(layer_idx, layer, query, scaling):
                tp = time.perf_counter()
                policy.observe_queries(layer_idx, layer, query, scaling, step)
                spent = time.perf_counter() - tp
                stats.policy_seconds += spent
                stats.observe_seconds += spent
            cache.query_observer = query_observer
        if policy.needs_attention and not wasted:
            def observer(layer_idx, layer, attn):
                tp = time.perf_counter()
                policy.observe(layer_idx, layer, attn, step)
                spent = time.perf_counter() - tp
                stats.policy_seconds += spent
                stats.observe_seconds += spent
            cache.observer = observer
        with cache.active():
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                             logits_to_keep=0 if keep_all else logits_to_keep)
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, cache.kv_bytes())
        state.last_query = (positions, real)
        state.newest = positions[:, -1]
        if update:
            self._maybe_update(cache, state, stats, processed)
        return out.logits

    def _maybe_update(self, cache, state, stats, processed: int) -> None:
        """Run the policy on every layer when `processed` columns reach the next update."""
        if processed != state.next_update:
            return
        positions, real = state.last_query
        step = StepInfo(seen=state.seen, processed=processed, query_positions=positions,
                        query_valid=real, next_update=state.next_update)
        tp = time.perf_counter()
        if self.policy.reconstructs:
            self._reconstruct(cache, state, stats, processed)
        for layer, keep in zip(cache.layers, self.policy.select_all(cache.layers, step)):
            if layer.sliding_window is not None:
                newest = layer.newest_positions()
                in_window = layer.positions > newest - layer.sliding_window
                keep = in_window if keep is None else keep & in_window
            if keep is not None:
                layer.compact(keep)
        spent = time.perf_counter() - tp
        stats.policy_seconds += spent
        stats.select_seconds += spent
        stats.updates += 1
        state.last_update = processed
        # one-shot compression: no further update (the question and the reply are read in full)
        state.next_update = NEVER if state.one_shot else state.next_update + self.update_every

    def _observe_reconstruction(self, layer_idx, layer, query, scaling, piece):
        self.policy.observe_reconstruction(layer_idx, layer, query, scaling, piece)

    def _reconstruct(self, cache, state, stats, processed: int) -> None:
        """Side forwards that re-read the columns since the last update after the policy's prompt
        (KVzip); the policy scores the cache from their queries, and their keys are dropped."""
        ids, real = (torch.cat(parts, dim=1) for parts in state.history)
        first = state.last_update
        column = first
        for piece_ids, prompt_tokens in self.policy.reconstruction_inputs(ids[:, first:processed], ids[:, :first]):
            B, P = piece_ids.shape
            n = P - prompt_tokens
            valid = torch.cat([torch.ones(B, prompt_tokens, dtype=torch.bool, device=self.device),
                               real[:, column:column + n]], dim=1)
            piece = Reconstruction(first_column=column, end_column=column + n, prompt_tokens=prompt_tokens,
                                   query_valid=valid)
            positions = state.newest.view(B, 1) + 1 + torch.arange(P, device=self.device)
            lengths = [layer.get_seq_length() for layer in cache.layers]
            cache.set_chunk(positions, valid, torch.full_like(positions, -1))
            cache.observer = None
            cache.query_observer = functools.partial(self._observe_reconstruction, piece=piece)
            with cache.active():
                self.model(input_ids=piece_ids.to(self.device), position_ids=positions, past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
            stats.peak_kv_bytes = max(stats.peak_kv_bytes, cache.kv_bytes())   # the side forward's keys count
            for layer, length in zip(cache.layers, lengths):
                layer.truncate(length)
            column += n
        cache.query_observer = None


def _record_what_was_kept(stats: MemoryStats, state: "_LoopState", cache: MemoryCache) -> None:
    stats.tokens_seen = state.seen.tolist()
    stats.kept_per_layer_head = torch.stack([layer.valid.sum(-1).cpu() for layer in cache.layers])
    stats.final_kv_bytes = cache.kv_bytes()


@dataclass
class SharedPrefix:
    """A prompt's memory state just before its first update (see `shared_prefix`)."""
    key: tuple
    input_ids: torch.Tensor
    update_every: int
    row_capture: str
    cache: MemoryCache
    state: "_LoopState"
    stats: MemoryStats
    end: int
    last_logits: torch.Tensor

    def check(self, lm: "MemoryManagedLM", input_ids: torch.Tensor) -> None:
        if lm.policy.prefix_key() != self.key:
            raise ValueError(f"shared prefix was computed for {self.key}, not {lm.policy.prefix_key()}")
        if lm.update_every != self.update_every:
            raise ValueError(f"shared prefix was computed with update_every={self.update_every}")
        if lm.row_capture != self.row_capture:
            # the two captures round the outputs differently: a prefix continues only its own
            raise ValueError(f"shared prefix was computed with row_capture={self.row_capture!r}, "
                             f"not {lm.row_capture!r}")
        head = input_ids[:, :self.end].cpu()
        if head.shape != self.input_ids.shape or not torch.equal(head, self.input_ids):
            raise ValueError("shared prefix belongs to a different prompt")

    def restore(self):
        """Fresh copies (the caller's generation must not touch the stored state)."""
        cache = copy.copy(self.cache)
        cache.layers = [_clone_layer(layer) for layer in self.cache.layers]
        cache.release_buffers()
        state = copy.copy(self.state)
        state.seen = self.state.seen.clone()
        if state.history is not None:
            state.history = (list(state.history[0]), list(state.history[1]))
        stats = copy.deepcopy(self.stats)
        return cache, state, stats, self.end, self.last_logits


def _clone_layer(layer):
    new = copy.copy(layer)
    for name in ("keys", "values", "valid", "positions", "columns"):
        t = getattr(layer, name)
        setattr(new, name, None if t is None else t.clone())
    new.aux = {k: v.clone() for k, v in layer.aux.items()}
    return new


@dataclass
class _LoopState:
    positions: torch.Tensor
    mask: torch.Tensor
    next_update: int
    one_shot: bool = False     # compress once (at next_update), then never again
    seen: torch.Tensor = None
    last_query: tuple = None   # (positions, valid) of the newest chunk, for the update step
    newest: torch.Tensor = None  # [B] position of each row's newest token
    last_update: int = 0       # column of the previous update
    history: Optional[tuple] = None  # (ids, real) chunks so far, for a policy that re-reads them
    # how many columns the run will have read after its last forward (NEVER: not known): an
    # update due later never runs, so what the forwards before it observe feeds no decision
    last_column: int = NEVER

    def __post_init__(self):
        self.seen = torch.zeros(self.mask.shape[0], dtype=torch.long, device=self.mask.device)
