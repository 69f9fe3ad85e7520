"""The memory-managed KV cache.

Each layer stores keys and values as [B, H_kv, S, D] like transformers' DynamicLayer, plus
what eviction per head needs:
  valid     [B, H_kv, S] bool   False for evicted-but-padded slots and left padding
  positions [B, H_kv, S] long   absolute RoPE position of the token in each slot
  columns   [B, H_kv, S] long   processing step (column of the padded batch) it arrived at
  aux       {name: [B, H_kv, S, ...]}  per-token statistics of the policy
After an eviction the layer is compacted to the longest kept row, so the tensors really
shrink; heads that keep fewer tokens carry invalid slots that attention masks out.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .files import text_config


class MemoryLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False

    def __init__(self, sliding_window: Optional[int] = None):
        super().__init__()
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.valid: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None
        self.columns: Optional[torch.Tensor] = None
        self.aux: dict[str, torch.Tensor] = {}
        # True while every KV head holds the same slots (no per-head eviction yet): attention
        # can then use one mask broadcast over heads, which is about 2x faster on CPU
        self.heads_uniform = True
        # the column up to which a policy has read this layer's attention rows (NAMM: rows not
        # captured before the next read are folded as zero attention)
        self.rows_read_until = 0
        self._buffers: dict[str, torch.Tensor] = {}   # field name -> buffer its view lives in

    # slots reserved when a single token is appended: decoding writes in place for this many
    DECODE_RESERVE = 64

    # --- transformers' layer interface -------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        B, H, _, D = key_states.shape
        dev = key_states.device
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.valid = torch.zeros(B, H, 0, dtype=torch.bool, device=dev)
        self.positions = torch.zeros(B, H, 0, dtype=torch.long, device=dev)
        self.columns = torch.zeros(B, H, 0, dtype=torch.long, device=dev)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("MemoryLayer is filled through MemoryCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.positions = self.columns = None
        self.aux = {}
        self._buffers = {}
        self.heads_uniform = True
        self.rows_read_until = 0
        self.is_initialized = False

    # --- memory operations -------------------------------------------------------------
    def append(self, key_states, value_states, positions, valid, columns, aux_shapes):
        """Append a chunk: key/value [B, H, Q, D]; positions, valid, columns [B, Q].

        Fields are views into buffers with room to spare when decoding, so a decoded token is
        written in place instead of copying the whole layer (which made decoding at 8k tokens
        ~10x slower than its arithmetic). A field someone replaced since (a policy's new aux
        tensor, a compaction) gets a fresh buffer.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, Q, _ = key_states.shape
        S = self.keys.shape[2]
        expand = lambda t: t.unsqueeze(1).expand(B, H, Q)  # noqa: E731
        for name, trailing in aux_shapes.items():
            if name not in self.aux:
                self.aux[name] = torch.zeros(B, H, S, *trailing, device=key_states.device)
        incoming = {"keys": key_states, "values": value_states, "valid": expand(valid),
                    "positions": expand(positions), "columns": expand(columns)}
        fields = {**{name: getattr(self, name) for name in incoming}, **{"aux." + n: t for n, t in self.aux.items()}}
        for name, current in fields.items():
            buffer = self._buffers.get(name)
            in_buffer = (buffer is not None and current.data_ptr() == buffer.data_ptr()
                         and current.stride() == buffer.stride() and current.shape == buffer[:, :, :S].shape)
            if not (in_buffer and buffer.shape[2] >= S + Q):
                # a field its policy replaces after every forward gets no reserve: it would be wasted
                replaced = buffer is not None and not in_buffer
                room = S + Q + (self.DECODE_RESERVE if Q == 1 and not replaced else 0)
                buffer = current.new_empty(B, H, room, *current.shape[3:])
                buffer[:, :, :S] = current
                self._buffers[name] = buffer
            if name in incoming:
                buffer[:, :, S:S + Q] = incoming[name]
            else:  # a policy's per-token statistics start at zero
                buffer[:, :, S:S + Q].zero_()
            view = buffer[:, :, :S + Q]
            if name.startswith("aux."):
                self.aux[name[4:]] = view
            else:
                setattr(self, name, view)
        return self.keys, self.values

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the slots where keep [B, H, S] is True; shrink to the longest kept row."""
        keep = keep & self.valid
        self.heads_uniform = self.heads_uniform and bool((keep == keep[:, :1]).all())
        S = keep.shape[-1]
        length = int(keep.sum(-1).max()) if S else 0
        # kept slots first, each row in its original (position) order
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :length]
        if bool((order == order[:1, :1]).all()):
            # one kept set for every row and head (a model-wide memory, batch 1): index_select gives
            # the same tensors, ~5x faster than gather on CPU for keys and values (bench/bookkeeping_bench.py)
            index = order[0, 0]
            gather = lambda t: t.index_select(2, index)  # noqa: E731
        else:
            gather = lambda t: t.gather(2, order.view(*order.shape, *([1] * (t.dim() - 3))).expand(  # noqa: E731
                *order.shape, *t.shape[3:]))
        self.keys, self.values = gather(self.keys), gather(self.values)
        self.valid = keep.gather(2, order)
        self.positions = self.positions.gather(2, order)
        self.columns = self.columns.gather(2, order)
        self.aux = {name: gather(t) for name, t in self.aux.items()}
        self._buffers = {}

    def truncate(self, length: int) -> None:
        """Drop every slot from `length` on (a reconstruction's keys after its side forward);
        the fields stay views of their buffers, so the next append writes in place."""
        for name in ("keys", "values", "valid", "positions", "columns"):
            setattr(self, name, getattr(self, name)[:, :, :length])
        self.aux = {name: t[:, :, :length] for name, t in self.aux.items()}

    def newest_positions(self) -> torch.Tensor:
        """[B, H, 1] the newest valid position of every (batch row, KV head)."""
        return self.positions.masked_fill(~self.valid, -1).amax(-1, keepdim=True)

    def kv_bytes(self) -> int:
        """Bytes of the key and value slots held (not counting a decode reserve of at most
        DECODE_RESERVE slots)."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class MemoryCache(Cache):
    """A transformers Cache whose layers can evict per head. One per generation."""

    def __init__(self, config, aux_shapes: Optional[dict] = None):
        text = text_config(config)
        n_layers = text.num_hidden_layers
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * n_layers
        window = getattr(text, "sliding_window", None)
        layers = [MemoryLayer(window if kind == "sliding_attention" else None) for kind in layer_types[:n_layers]]
        super().__init__(layers=layers)
        self.aux_shapes = dict(aux_shapes or {})
        # set by the generation loop before each forward
        self.chunk_positions: Optional[torch.Tensor] = None
        self.chunk_valid: Optional[torch.Tensor] = None
        self.chunk_columns: Optional[torch.Tensor] = None
        # observer(layer_idx, layer, attn [B, H_kv, Q, S] in `observe_dtype`) receives the attention the
        # chunk's queries paid to the cache; None keeps attention on the fast sdpa path
        self.observer = None
        # query_observer(layer_idx, layer, query [B, H_q, Q, D] post-RoPE, scaling): the chunk's queries
        self.query_observer = None
        # layers the observer wants (None: all); only they hold the policy's per-token statistics
        self.observed_layers: Optional[set[int]] = None
        # the first row of the chunk the observer gets (set by the generation loop; rows before it
        # attend with the fused kernel and are not captured)
        self.observe_from = 0
        # the dtype of the rows handed to the observer (set by the generation loop from the policy)
        self.observe_dtype = torch.float32
        # how observed rows are captured (see namm_core.attention): "inline" or "separate"
        self.row_capture = "inline"
        self._scratch: dict[str, torch.Tensor] = {}   # name -> storage (attention_rows, scratch)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        observed = self.observed_layers is None or layer_idx in self.observed_layers
        return self.layers[layer_idx].append(key_states, value_states, self.chunk_positions, self.chunk_valid,
                                             self.chunk_columns, self.aux_shapes if observed else {})

    def set_chunk(self, positions, valid, columns) -> None:
        self.chunk_positions, self.chunk_valid, self.chunk_columns = positions, valid, columns

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def attention_rows(self, B: int, H: int, Q: int, S: int, device) -> torch.Tensor:
        """A [B, H, Q, S] buffer (`observe_dtype`) for the attention handed to the observer, reused
        by every layer and chunk (a fresh tensor this large costs page faults on each forward);
        valid only until the next call."""
        return self.scratch("rows", (B, H, Q, S), self.observe_dtype, device)

    def scratch(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor of `shape` for intermediate values of one attention block (scores,
        probabilities), reused by every block, layer and chunk: on CPU a fresh tensor of a few MB
        per block costs page faults each time. Valid until the next call with the same name."""
        n = math.prod(shape)
        storage = self._scratch.get(name)
        if storage is None or storage.numel() < n or storage.device != torch.device(device) or storage.dtype != dtype:
            self._scratch[name] = storage = torch.empty(n, dtype=dtype, device=device)
        return storage[:n].view(shape)

    def release_buffers(self) -> None:
        """Drop scratch space and decode reserves (before the cache is stored for reuse)."""
        self._scratch = {}
        for layer in self.layers:
            layer._buffers = {}

    @contextmanager
    def active(self):
        """Route the memory attention function to this cache during a forward."""
        token = _ACTIVE_CACHE.set(self)
        try:
            yield self
        finally:
            _ACTIVE_CACHE.reset(token)


_ACTIVE_CACHE: contextvars.ContextVar[Optional[MemoryCache]] = contextvars.ContextVar("namm_active_cache", default=None)


def active_cache() -> Optional[MemoryCache]:
    return _ACTIVE_CACHE.get()
