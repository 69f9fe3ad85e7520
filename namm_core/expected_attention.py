"""Expected Attention (Devoto et al. 2025): keep the keys that future queries are expected to
attend to, estimated from the statistics of the queries seen so far. No training.

At every memory update, per layer and query head:
- the queries since the previous update (the first `sinks` positions left out), taken back
  before RoPE, give a mean mu and a covariance Sigma;
- the rotation is averaged over the next `future` positions, R = mean_p R_p, and the future query
  is q ~ N(R mu, R Sigma R^T);
- the expected logit of key k is E[s q.k] in the exp: z = s (R mu).k + s^2 k^T (R Sigma R^T) k / 2
  (s the model's attention scaling); a softmax over the cached keys (sinks left out) gives the
  expected attention p, averaged over the query heads of each KV head;
- the score is (p + epsilon) * ||v||, the value norm weighing how much a key can move the output.
The first `sinks` tokens are always kept. kvpress's leaderboard runs it with epsilon 0.01 inside
AdaKV's head-adaptive budgets: `expected_attention:B/epsilon=0.01/adakv`.

With one compression after the whole prompt (the board's peers' protocol) the statistics cover
every prompt query, as in kvpress; with updates during the prefill they cover the queries since
the last update.
"""
from __future__ import annotations

import torch

from .policies import BudgetPolicy
from .rope import Rotary
from .selection import Structure, sink_mask


class ExpectedAttention(BudgetPolicy):
    name = "expected_attention"
    needs_queries = True
    observations_feed_updates_only = True
    default_structure = Structure(sinks=4)

    def __init__(self, budget, structure=None, future: int = 512, epsilon: float = 0.0, covariance: int = 1,
                 vnorm: int = 1):
        super().__init__(budget, structure)
        if isinstance(future, bool) or int(future) != future or future < 1:
            raise ValueError(f"expected_attention future must be a whole number >= 1, got {future!r}")
        if not float(epsilon) >= 0:
            raise ValueError(f"expected_attention epsilon must be >= 0, got {epsilon!r}")
        for label, value in (("covariance", covariance), ("vnorm", vnorm)):
            if value not in (0, 1):
                raise ValueError(f"expected_attention {label} must be 0 or 1, got {value!r}")
        self.future, self.epsilon = int(future), float(epsilon)
        self.covariance, self.vnorm = int(covariance), int(vnorm)
        self.rotary: Rotary | None = None
        self._stats: dict[int, list] = {}

    def bind_model(self, model) -> None:
        self.rotary = Rotary(model)

    def new_sequence(self) -> None:
        if self.rotary is None:
            raise ValueError("expected_attention needs the model's rotary embedding: MemoryManagedLM binds it, "
                             "or call policy.bind_model(model)")
        self._stats = {}

    def observe_queries(self, layer_idx, layer, query, scaling, step):
        """Accumulate the sums of the queries before RoPE and of their outer products."""
        keep = step.query_valid & (step.query_positions >= self.structure.sinks)          # [B, Q]
        pre = self.rotary.unrotate(query, step.query_positions, layer_idx) * keep[:, None, :, None]
        total = pre.sum(2)                                                                # [B, Hq, D]
        outer = pre.transpose(-1, -2) @ pre                                               # [B, Hq, D, D]
        count = keep.sum(-1).float()                                                      # [B]
        if layer_idx in self._stats:
            old = self._stats[layer_idx]
            total, outer, count = old[0] + total, old[1] + outer, old[2] + count
        self._stats[layer_idx] = [total, outer, count, scaling]

    def score(self, layer_idx, layer, step):
        if layer_idx not in self._stats:
            raise RuntimeError(f"expected_attention: no queries of layer {layer_idx} were observed since the last update")
        total, outer, count, scaling = self._stats[layer_idx]
        n = count.clamp(min=1).view(-1, 1, 1)
        mean = total / n                                                                  # [B, Hq, D]
        cov = outer / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)           # biased, as kvpress
        R = self.rotary.mean_rotation(layer.newest_positions().amax(dim=(1, 2)) + 1, self.future, layer_idx)
        mean = (R.unsqueeze(1) @ mean.unsqueeze(-1)).squeeze(-1)
        keys = layer.keys.float()                                                         # [B, H, S, D]
        B, H, S, D = keys.shape
        group = mean.shape[1] // H
        mean = mean.view(B, H, group, D)
        logits = scaling * torch.einsum("bhsd,bhgd->bhgs", keys, mean)
        if self.covariance:
            cov = (R.unsqueeze(1) @ cov @ R.transpose(-1, -2).unsqueeze(1)).view(B, H, group, D, D)
            spread = torch.einsum("bhsd,bhgde,bhse->bhgs", keys, cov, keys)
            logits = logits + 0.5 * scaling * scaling * spread
        counted = layer.valid & ~sink_mask(layer, self.structure.sinks)
        logits = logits.masked_fill(~counted.unsqueeze(2), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num().mean(2)                        # [B, H, S]
        scores = probs + self.epsilon
        if self.vnorm:
            scores = scores * layer.values.float().norm(dim=-1)
        return scores

    def after_update(self, layer_idx, layer):
        self._stats.pop(layer_idx, None)     # the next update looks at the queries that follow

