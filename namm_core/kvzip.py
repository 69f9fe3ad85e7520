"""KVzip (Kim et al. 2025): keep the keys the model needs to reconstruct its own context.

After the context is in the cache, the model is asked to repeat it: a side forward reads
"Repeat the previous context exactly." (for later pieces: "Repeat the part of the previous
context exactly, starting with" and the `overlap` tokens before the piece), the chat template's
reply header, then the context tokens themselves (teacher forcing), in pieces of at most `chunk`
tokens. A key's importance is the largest attention any of those queries (and any query head of
its KV head) pays it, with the softmax taken over the piece's own original keys, the sinks and
the reconstruction's keys (causally). The side forward's keys are dropped afterwards; it costs
about one more prefill of the context.

The memory runs the reconstruction at every update, over the tokens that arrived since the
previous one, so every token is scored once, by the piece it belongs to (with one compression
after the whole prompt, the board's peers' protocol, the context is reconstructed at once, as in
kvpress). By default the whole model shares the budget (`modelwide`: KVzip's non-uniform
selection over all layers and heads) and the first 4 tokens are kept.
"""
from __future__ import annotations

import torch

from .policies import BudgetPolicy, Reconstruction
from .selection import Structure, sink_mask

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
_PLACEHOLDER = "\x00namm-kvzip\x00"


class KVzip(BudgetPolicy):
    name = "kvzip"
    reconstructs = True
    aux_shapes = {"kvzip": ()}
    default_structure = Structure(scope="modelwide", sinks=4)

    def __init__(self, budget, structure=None, chunk: int = 2048, overlap: int = 8):
        super().__init__(budget, structure)
        for label, value, least in (("chunk", chunk, 1), ("overlap", overlap, 0)):
            if isinstance(value, bool) or int(value) != value or value < least:
                raise ValueError(f"kvzip {label} must be a whole number >= {least}, got {value!r}")
        self.chunk, self.overlap = int(chunk), int(overlap)
        self._prompts: dict[str, torch.Tensor] | None = None

    def bind_tokenizer(self, tokenizer) -> None:
        encode = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)  # noqa: E731
        suffix = "\n"
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}],
                                                     add_generation_prompt=True, tokenize=False)
            suffix = rendered.split(_PLACEHOLDER, 1)[1]
        self._prompts = {"first": encode(FIRST_PROMPT), "next": encode(NEXT_PROMPT), "suffix": encode(suffix)}

    def new_sequence(self) -> None:
        if self._prompts is None:
            raise ValueError("kvzip needs the tokenizer to write its reconstruction prompt: "
                             "MemoryManagedLM(model, policy, tokenizer=tok) or policy.bind_tokenizer(tok)")

    def reconstruction_inputs(self, ids, previous):
        B, device = ids.shape[0], ids.device
        p = {k: v.to(device) for k, v in self._prompts.items()}
        pieces = []
        for start in range(0, ids.shape[1], self.chunk):
            before = torch.cat([previous, ids[:, :start]], dim=1)
            if before.shape[1] == 0:
                prompt = torch.cat([p["first"], p["suffix"]]).expand(B, -1)
            else:
                tail = before[:, before.shape[1] - min(self.overlap, before.shape[1]):]
                prompt = torch.cat([p["next"].expand(B, -1), tail, p["suffix"].expand(B, -1)], dim=1)
            pieces.append((torch.cat([prompt, ids[:, start:start + self.chunk]], dim=1), prompt.shape[1]))
        return pieces

    @torch.no_grad()
    def observe_reconstruction(self, layer_idx, layer, query, scaling, piece: Reconstruction):
        B, Hq, P, D = query.shape
        H, S = layer.keys.shape[1], layer.keys.shape[2]
        original = S - P                                           # the piece's keys are the last P slots
        slot = torch.arange(S, device=query.device)
        in_piece = (layer.columns >= piece.first_column) & (layer.columns < piece.end_column) & layer.valid
        in_piece[..., original:] = False
        visible = in_piece | (sink_mask(layer, self.structure.sinks) & layer.valid)
        visible[..., original:] = layer.valid[..., original:]
        # the reconstruction's own keys causally: query i sees reconstruction keys 0..i
        causal = slot[original:].view(P, 1) >= slot.view(1, S)                           # [P, S]
        causal[:, :original] = True
        rows = piece.query_valid.view(B, 1, P, 1)
        best = torch.zeros(B, H, S, device=query.device)
        group = Hq // H
        for h in range(H):
            q = query[:, h * group:(h + 1) * group].float()                                # [B, g, P, D]
            logits = scaling * (q @ layer.keys[:, h].float().transpose(-1, -2).unsqueeze(1))  # [B, g, P, S]
            allowed = visible[:, h].view(B, 1, 1, S) & causal.view(1, 1, P, S)
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num()
            best[:, h] = (probs * rows).amax(dim=(1, 2))
        layer.aux["kvzip"] = torch.where(in_piece, best, layer.aux["kvzip"])

    def score(self, layer_idx, layer, step):
        return layer.aux["kvzip"]
