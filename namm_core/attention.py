"""The memory's attention function, registered in transformers' AttentionInterface.

It builds each layer's mask from the cache itself (per KV head validity, absolute positions,
the layer's sliding window), so layers and heads of different lengths are attended to
correctly, and it hands the attention rows to the policy when the policy asks for them.
Policies that need no attention values run on torch's fused sdpa kernel. Rows a policy reads
are captured either inline (an eager attention whose probabilities are also handed over; the
default) or separately (every output from torch's sdpa, the read rows' probabilities computed on
their own, without the multiplication with the values; meant for GPUs, where which sdpa kernel
runs with a mask and grouped heads decides whether it pays, and not measured on one). Models with
softcapped attention (Gemma 2) are always eager. `MemoryCache.row_capture`, chosen by
`MemoryManagedLM(row_capture=...)`.
Outside a memory-managed forward it behaves exactly like transformers' "sdpa".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import active_cache

ATTN_IMPLEMENTATION = "namm_memory"


def memory_mask(layer, query_positions, query_valid, sliding_window=None, heads=slice(None),
                slots=slice(None)) -> torch.Tensor:
    """[B, H_kv, Q, S] bool: which cached slot each query may attend to (only `heads`, `slots`)."""
    kpos = layer.positions[:, heads, slots].unsqueeze(-2)    # [B, H, 1, S]
    qpos = query_positions[:, None, :, None]                 # [B, 1, Q, 1]
    mask = layer.valid[:, heads, slots].unsqueeze(-2) & (kpos <= qpos)
    if sliding_window is not None:
        mask = mask & (kpos > qpos - sliding_window)
    # a left-padding query attends to everything valid: finite output that is never used
    return mask | ~query_valid[:, None, :, None]


def namm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = active_cache()
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer = cache.layers[module.layer_idx]
    window = kwargs.get("sliding_window") or layer.sliding_window
    n_rep = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    if cache.query_observer is not None:
        cache.query_observer(module.layer_idx, layer, query, scaling)

    observing = cache.observer is not None and (cache.observed_layers is None
                                                 or module.layer_idx in cache.observed_layers)
    if not observing and softcap is None:
        return _fused(layer, cache, query, key, value, window, scaling, n_rep).transpose(1, 2).contiguous(), None
    # rows before `observe_from` are not captured: fused there, eager after (softcapping: eager everywhere).
    # With a separate capture (GPUs) every row's output is fused and the captured rows' probabilities
    # are computed on their own, without multiplying them with the values.
    captured = min(cache.observe_from, query.shape[2]) if observing else 0    # first row handed to the observer
    separate = observing and softcap is None and cache.row_capture == "separate"
    skip = query.shape[2] if separate else captured if softcap is None else 0  # rows whose output is fused
    fused = _fused(layer, cache, query[:, :, :skip], key, value, window, scaling, n_rep, rows=slice(0, skip)) \
        if skip else None

    # eager path: the probabilities are needed (or softcapping is). Query heads are grouped
    # by their KV head, so keys are never copied per query head. Rows are processed in blocks
    # of ~8 MB of probabilities whose scores and probabilities live in scratch buffers reused by
    # every block and layer: a fresh tensor of that size costs page faults each time, and blocks
    # of 8-16 MB ran fastest on a CPU with AMX (bench/row_capture_bench.py --block-mb 4, 8, 16, 64). The
    # policy gets the chunk's GQA-averaged rows at once, gathered in a buffer reused across layers.
    B, Hq, Q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    grouped = query.view(B, Hkv, n_rep, Q, D)
    keys_t = key.transpose(-1, -2).reshape(B * Hkv, D, S)
    if skip == Q:                                              # every output from the fused kernel
        out = fused.transpose(1, 2).contiguous().view(B, Q, Hkv, n_rep, -1)
    else:
        out = query.new_empty(B, Q, Hkv, n_rep, value.shape[-1])
        if fused is not None:
            out[:, :skip] = fused.transpose(1, 2).reshape(B, skip, Hkv, n_rep, -1)
    observed = cache.attention_rows(B, Hkv, Q - captured, S, query.device) if observing else None
    first = first_masked_slot(layer, cache.chunk_positions, cache.chunk_valid, window)
    start = captured if separate else skip                     # the first row whose probabilities are needed
    step = rows_per_block(B * Hq * S * 4, Q - start, query.device)
    for r0 in range(start, Q, max(step, 1)):   # no rows to capture (start == Q): no step
        r1 = min(Q, r0 + step)
        n = r1 - r0
        q_block = grouped[:, :, :, r0:r1].reshape(B * Hkv, n_rep * n, D)
        # scores and probabilities live in buffers reused by every block and layer (cache.scratch)
        scores = cache.scratch("scores", (B * Hkv, n_rep * n, S), query.dtype, query.device)
        scores = scores.baddbmm_(q_block, keys_t, beta=0.0, alpha=scaling).view(B, Hkv, n_rep, n, S)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if first < S:  # slots before `first` are visible to every query: no mask to apply there
            # heads holding the same slots share one mask, broadcast over them
            heads = slice(0, 1) if layer.heads_uniform else slice(None)
            allowed = memory_mask(layer, cache.chunk_positions[:, r0:r1], cache.chunk_valid[:, r0:r1], window,
                                  heads=heads, slots=slice(first, None))
            # an additive bias is ~10x cheaper than a broadcast masked_fill on CPU
            bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device)
            scores[..., first:] += bias.masked_fill_(~allowed, float("-inf")).unsqueeze(2)
        # an observer reading the scores' dtype (bf16) gets the softmax written straight in it: on
        # CPU bit for bit the fp32 softmax rounded, what the model multiplies the values with
        probs_dtype = scores.dtype if observed is not None and observed.dtype == scores.dtype else torch.float32
        probs = torch.softmax(scores, dim=-1, dtype=probs_dtype,
                              out=cache.scratch("probs", scores.shape, probs_dtype, query.device))
        if not separate:
            weights = probs.view(B, Hkv, n_rep * n, S)
            if weights.dtype != value.dtype:
                weights = cache.scratch("weights", weights.shape, value.dtype, query.device).copy_(weights)
            block = torch.matmul(weights, value)
            out[:, r0:r1] = block.view(B, Hkv, n_rep, n, -1).permute(0, 3, 1, 2, 4)
        if observed is not None and r1 > captured:
            lo = max(r0, captured)                                 # one row per KV head (GQA)
            rows = observed[:, :, lo - captured:r1 - captured]
            work = None if rows.dtype == torch.float32 else \
                cache.scratch("group_sum", rows.shape, torch.float32, rows.device)
            mean_over_group(probs[:, :, :, lo - r0:], out=rows, work=work)
    if observed is not None:
        valid = cache.chunk_valid[:, captured:]
        if not bool(valid.all()):
            observed.mul_(valid[:, None, :, None])                 # padding queries observe nothing
        cache.observer(module.layer_idx, layer, observed)
    return out.view(B, Q, Hq, -1), None


def mean_over_group(probs: torch.Tensor, out: torch.Tensor, work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = probs.to(out.dtype).mean(dim=2), the same values, faster on CPU (where a reduction over
    a strided dim is slow; bench/bookkeeping_bench.py) for groups of up to 4 query heads: torch's CPU mean sums
    those in order in float32 and divides, as done here. Larger groups, other devices and other
    dtypes take torch.mean itself. `work`: a float32 tensor of out's shape to sum in when out is not
    float32 (else one is allocated)."""
    n = probs.shape[2]
    if n > 4 or out.device.type != "cpu" or out.dtype not in _SUMMED_IN_FLOAT32:
        return torch.mean(probs.to(out.dtype), dim=2, out=out)
    if n == 1:
        return out.copy_(probs[:, :, 0])
    if out.dtype == probs.dtype == torch.float32:
        acc = torch.add(probs[:, :, 0], probs[:, :, 1], out=out)
    elif work is not None:
        acc = work.copy_(probs[:, :, 0].to(out.dtype)).add_(probs[:, :, 1].to(out.dtype))
    else:
        acc = probs[:, :, 0].to(out.dtype).float().add_(probs[:, :, 1].to(out.dtype))
    for i in range(2, n):
        acc.add_(probs[:, :, i].to(out.dtype))
    acc.div_(n)
    return acc if acc is out else out.copy_(acc)


_SUMMED_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def _fused(layer, cache, query, key, value, window, scaling, n_rep, rows=slice(None)) -> torch.Tensor:
    """[B, H_q, Q, D] attention of the chunk's query `rows` on torch's fused kernel."""
    positions, valid = cache.chunk_positions[:, rows], cache.chunk_valid[:, rows]
    if layer.heads_uniform:  # one mask for all heads
        mask = memory_mask(layer, positions, valid, window, heads=slice(0, 1))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=n_rep > 1)
    # per KV head: each group of query heads with its own mask (broadcast, not copied)
    mask = memory_mask(layer, positions, valid, window)
    return torch.cat([
        F.scaled_dot_product_attention(query[:, h * n_rep:(h + 1) * n_rep], key[:, h:h + 1], value[:, h:h + 1],
                                       attn_mask=mask[:, h:h + 1], scale=scaling, enable_gqa=n_rep > 1)
        for h in range(key.shape[1])], dim=1)


def first_masked_slot(layer, query_positions, query_valid, sliding_window=None) -> int:
    """The first cache slot some query of the chunk may not see (S if none): slots before it
    are valid and older than every query, so attention needs no mask there."""
    S = layer.positions.shape[-1]
    if sliding_window is not None:
        return 0
    oldest_query = query_positions.masked_fill(~query_valid, 2**62).amin(-1)          # [B]
    hidden = ~layer.valid | (layer.positions > oldest_query.view(-1, 1, 1))           # [B, H, S]
    hidden = hidden.any(dim=(0, 1))
    return int(hidden.int().argmax()) if bool(hidden.any()) else S


def rows_per_block(bytes_per_row: int, n_rows: int, device: torch.device) -> int:
    """Query rows per eager-attention block: ~8 MB of probabilities on CPU, up to
    256 MB on accelerators (bounds peak memory at long contexts); a multiple of 16 rows when split."""
    budget = EAGER_BLOCK_BYTES if device.type == "cpu" else EAGER_BLOCK_BYTES_ACCELERATOR
    rows = (budget // max(bytes_per_row, 1)) // 16 * 16
    return n_rows if rows >= n_rows else max(16, rows)


EAGER_BLOCK_BYTES = 8 << 20
EAGER_BLOCK_BYTES_ACCELERATOR = 256 << 20


def register() -> str:
    """Register the memory attention once; returns its implementation name."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_IMPLEMENTATION, namm_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


_registered = False
