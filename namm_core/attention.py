"""The memory's attention function, registered in transformers' AttentionInterface.

It builds each layer's mask from the cache itself (per KV head validity, absolute positions,
the layer's sliding window), so layers and heads of different lengths are attended to
correctly, and it hands the attention rows to the policy when the policy asks for them.
Policies that need no attention values run on torch's fused sdpa kernel.
Outside a memory-managed forward it behaves exactly like transformers' "sdpa".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import active_cache

ATTN_IMPLEMENTATION = "namm_memory"


def memory_mask(layer, query_positions, query_valid, sliding_window=None, heads=slice(None)) -> torch.Tensor:
    """[B, H_kv, Q, S] bool: which cached slot each query may attend to (only `heads`)."""
    kpos = layer.positions[:, heads].unsqueeze(-2)    # [B, H, 1, S]
    qpos = query_positions[:, None, :, None]          # [B, 1, Q, 1]
    mask = layer.valid[:, heads].unsqueeze(-2) & (kpos <= qpos)
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

    if cache.observer is None and softcap is None:
        if layer.heads_uniform:  # one mask for all heads
            mask = memory_mask(layer, cache.chunk_positions, cache.chunk_valid, window, heads=slice(0, 1))
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                 enable_gqa=n_rep > 1)
        else:  # per KV head: each group of query heads with its own mask (broadcast, not copied)
            mask = memory_mask(layer, cache.chunk_positions, cache.chunk_valid, window)
            out = torch.cat([
                F.scaled_dot_product_attention(query[:, h * n_rep:(h + 1) * n_rep], key[:, h:h + 1],
                                               value[:, h:h + 1], attn_mask=mask[:, h:h + 1], scale=scaling,
                                               enable_gqa=n_rep > 1)
                for h in range(key.shape[1])], dim=1)
        return out.transpose(1, 2).contiguous(), None

    mask = memory_mask(layer, cache.chunk_positions, cache.chunk_valid, window)

    # eager path: the probabilities are needed (or softcapping is). Query heads are grouped
    # by their KV head, so keys are never copied per query head.
    B, Hq, Q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    grouped = query.reshape(B, Hkv, n_rep * Q, D)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scaling).view(B, Hkv, n_rep, Q, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill_(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.view(B, Hkv, n_rep * Q, S).to(value.dtype), value).view(B, Hq, Q, -1)
    if cache.observer is not None:
        per_kv_head = probs.mean(dim=2) * cache.chunk_valid[:, None, :, None]  # padding queries observe nothing
        cache.observer(module.layer_idx, layer, per_kv_head)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the memory attention (idempotent); returns its implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, namm_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
