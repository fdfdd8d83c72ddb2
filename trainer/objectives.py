"""Two-Stage Block-Attention Training (method.md §3): the losses, and one forward (stage 1) or one simulation step
(stage 2) of the Beagle block. Both stages and inference run the same block; they differ only in the mask and in
which context states the keys come from.

Shapes: `input_ids`, `loss_mask`, `attention_mask` are `(batch, T)`; `context_states` are the target states the keys
read (`(batch, T, hidden * len(target_layer_ids))`); `target_states` the top post-norm states ĥ regresses
(`(batch, T, hidden)`); soft labels hold the target's distribution at the supervised positions only, in row-major
order (`loss_mask` True), so the full-vocabulary distribution is never materialised for unsupervised tokens.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn import functional as F

from modeling_beagle.masking_beagle import inverse_block_mask, window_draft_mask, window_starts


@dataclass
class SoftLabels:
    """The target's next-token distribution at supervised positions, over the draft vocabulary.

    Either full (`probs` over the draft vocabulary) or sparse top-k (`indices` into the draft vocabulary and their
    `probs`, renormalised), as precomputed in an offline cache.
    """

    probs: torch.Tensor
    indices: torch.Tensor | None = None

    def _log_q(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """log softmax(draft_logits) at the labels' tokens."""
        log_q = draft_logits.float().log_softmax(-1)
        return log_q if self.indices is None else log_q.gather(-1, self.indices)

    def cross_entropy(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Per-position CE(P, softmax(draft_logits))."""
        return -(self.probs.float() * self._log_q(draft_logits)).sum(-1)

    def cross_entropy_and_overlap(self, draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position CE(P, Q) and the overlap Σ min(P, Q) over the labels' tokens, Q = softmax(draft_logits).

        With full labels the overlap is the chance that speculative sampling accepts one token drawn from Q (one minus
        the total variation distance); with sparse top-k labels (renormalised) it is summed over those tokens only.
        """
        log_q = self._log_q(draft_logits)
        probs = self.probs.float()
        return -(probs * log_q).sum(-1), torch.minimum(probs, log_q.exp()).sum(-1)

    def argmax(self) -> torch.Tensor:
        top = self.probs.argmax(-1)
        return top if self.indices is None else self.indices.gather(-1, top[..., None])[..., 0]

    def select(self, rows: torch.Tensor) -> "SoftLabels":
        return SoftLabels(self.probs[rows], None if self.indices is None else self.indices[rows])


def soft_labels_from_states(beagle, target_states: torch.Tensor) -> SoftLabels:
    """P_p = softmax(lm_head(h_p)), restricted to the draft vocabulary (and renormalised) when it is reduced.

    The target's head is applied to the (cached or freshly computed) top states; full-vocabulary logits are never
    stored.
    """
    with torch.no_grad():
        logits = bucketed_logits(beagle, target_states)
    return SoftLabels(logits.float().softmax(-1))


def window_offsets(positions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Offset i = p - s(p) + 1 of each query inside its window (1..k)."""
    return positions - starts + 1


def draw_window_offsets(batch: int, offset_range: int, device, generator=None) -> torch.Tensor:
    """ε per sequence, uniform in [0, offset_range)."""
    return torch.randint(0, offset_range, (batch,), device=device, generator=generator)


# The number of supervised positions changes with every batch. On CPU, oneDNN caches a primitive (with a packed copy
# of the weight: ~19 MB for an 8,192-row bf16 head) per matmul shape, so unbucketed row counts grew a training run's
# memory by tens of MB per step (measured: 17 GB after 350 steps). Rows are padded to a multiple of this.
HEAD_ROW_BUCKET = 256


def bucketed_logits(beagle, hidden: torch.Tensor) -> torch.Tensor:
    """`beagle.compute_logits(hidden)` for (N, d) rows, computed on N rounded up to `HEAD_ROW_BUCKET` zero rows (few
    distinct matmul shapes) and cut back to N; the padding rows get no gradient."""
    rows = hidden.shape[0]
    padded = -(-rows // HEAD_ROW_BUCKET) * HEAD_ROW_BUCKET
    if padded != rows:
        hidden = torch.cat([hidden, hidden.new_zeros(padded - rows, hidden.shape[-1])])
    return beagle.compute_logits(hidden)[:rows]


class PositionTerms(NamedTuple):
    """Per supervised position: CE(P, Q), the overlap Σ min(P, Q), SmoothL1(ĥ, h) and top-1 agreement."""

    ce: torch.Tensor
    overlap: torch.Tensor
    regression: torch.Tensor
    agree: torch.Tensor

    def loss(self, smooth_l1_weight: float, tv_weight: float = 0.0) -> torch.Tensor:
        """The per-position training loss: CE + λ_v SmoothL1, plus `tv_weight` × the total variation 1 - Σ min(P, Q)
        (the chance that sampling rejects the draft's token) when it is non-zero."""
        loss = self.ce + smooth_l1_weight * self.regression
        return loss + tv_weight * (1.0 - self.overlap) if tv_weight else loss


def position_losses(beagle, hidden: torch.Tensor, target_states: torch.Tensor, labels: SoftLabels) -> PositionTerms:
    """The loss terms per supervised position (`hidden`, `target_states` already gathered to those positions)."""
    logits = bucketed_logits(beagle, hidden)
    ce, overlap = labels.cross_entropy_and_overlap(logits)
    regression = F.smooth_l1_loss(hidden.float(), target_states.float(), reduction="none").mean(-1)
    agree = logits.argmax(-1) == labels.argmax()
    return PositionTerms(ce, overlap, regression, agree)


def next_token_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """t_{j+1} for the state h_j at each position j of a training row (`context_next_token`); the last position,
    whose state no query reads, repeats its own token."""
    return torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)


def _windows(input_ids: torch.Tensor, window: int, offsets: torch.Tensor):
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
    return positions, window_starts(positions, window, offsets)


def offset_weights(window: int, kind: str) -> torch.Tensor | None:
    """Per-offset loss weights of stage 1 (`BeagleConfig.stage1_offset_weights`), offsets 1..`window`, mean 1:
    `"uniform"` (the paper's, None) or `"decay"`, stage 2's β_i = k - i + 1."""
    if kind == "uniform":
        return None
    if kind == "decay":
        beta = torch.arange(window, 0, -1, dtype=torch.float32)
        return beta / beta.mean()
    raise ValueError(f"stage-1 offset weights expected 'uniform' or 'decay', found {kind!r}.")


def stage1_forward(beagle, input_ids, context_states, target_states, labels: SoftLabels, loss_mask, attention_mask,
                   window: int, offsets: torch.Tensor, smooth_l1_weight: float, forward=None,
                   weights: torch.Tensor | None = None, tv_weight: float = 0.0):
    """Stage 1: one forward with the inverse block mask (query p reads true keys j < s(p) only); every supervised
    query gets a loss, uniform weights unless `weights` (per offset 1..`window`, see `offset_weights`) are given.
    `forward` is the (possibly DDP-wrapped) module to call, default `beagle`.

    Returns the weighted mean loss over supervised positions and per-offset sums (CE, SmoothL1, top-1 agreement,
    count).
    """
    positions, starts = _windows(input_ids, window, offsets)
    out = (forward or beagle)(input_ids=input_ids, position_ids=positions, context_states=context_states,
                              context_valid=attention_mask.bool(), context_next_ids=next_token_ids(input_ids),
                              attention_mask=inverse_block_mask(positions, positions, starts), return_logits=False)
    supervised = loss_mask.bool()
    terms = position_losses(beagle, out.last_hidden_state[supervised], target_states[supervised], labels)
    query_offsets = window_offsets(positions, starts)[supervised]
    per_position = terms.loss(smooth_l1_weight, tv_weight)
    if weights is not None:
        per_position = per_position * weights.to(per_position.device)[query_offsets - 1]
    loss = per_position.sum() / supervised.sum().clamp(min=1)
    return loss, _per_offset(query_offsets, window, terms)


def positions_at_offset(length: int, window: int, offsets: torch.Tensor, step: int):
    """The positions p < `length` at offset `step` of their window (p = s(p) + step - 1, i.e. p = offset + step - 1
    modulo `window`), ascending, as `(batch, ceil(length / window))`, and which of them exist (are < `length`).

    Rows with fewer such positions are padded with the last position (`exists` False there).
    """
    first = (offsets + step - 1) % window
    slots = torch.arange(-(-length // window), device=offsets.device)
    positions = first[:, None] + window * slots
    exists = positions < length
    return positions.clamp(max=length - 1), exists


def stage2_step(beagle, input_ids, context_states, draft_buffer, target_states, labels: SoftLabels, loss_mask,
                attention_mask, window: int, offsets: torch.Tensor, step: int, smooth_l1_weight: float,
                forward=None, tv_weight: float = 0.0):
    """Stage 2, simulation step `step` (1..S): keys are [true states; draft buffer D], the queries never change.

    Query p reads true keys j < s(p) and the draft states of the earlier offsets of its own window. Only the queries
    at offset `step` are run: they alone get a loss and write D, and a query's output depends on its own token and
    the keys it reads, never on the other queries, so the other offsets' queries (a fraction (S - 1) / S of the
    block's query-side compute) would be computed for nothing. Returns the summed loss of the supervised queries at
    offset `step` (the caller weights it by β_t), their number, their statistics, the new states `(batch, T, hidden)`
    of the queries at offset `step` (zero elsewhere) and the mask of those queries (whose states the caller writes
    into D in place).
    """
    positions, starts = _windows(input_ids, window, offsets)
    at_step = window_offsets(positions, starts) == step
    query_positions, exists = positions_at_offset(input_ids.shape[1], window, offsets, step)
    query_starts = window_starts(query_positions, window, offsets)
    next_ids = next_token_ids(input_ids)  # D[p] is read with t_{p+1}, as at inference (the drafted tokens are true)
    mask = torch.cat([inverse_block_mask(query_positions, positions, query_starts),
                      window_draft_mask(query_positions, positions, query_starts, step)], dim=-1)
    out = (forward or beagle)(input_ids=input_ids.gather(1, query_positions), position_ids=query_positions,
                              context_states=context_states, context_valid=attention_mask.bool(),
                              context_next_ids=next_ids, draft_states=draft_buffer, draft_position_ids=positions,
                              draft_next_ids=next_ids, attention_mask=mask,
                              return_logits=False)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(query_positions)
    supervised = exists & loss_mask.bool().gather(1, query_positions)
    # Soft labels are stored in the row-major order of all supervised positions; query positions ascend per row.
    label_rows = (loss_mask.long().flatten().cumsum(0) - 1).view_as(loss_mask).gather(1, query_positions)[supervised]
    sup_rows, sup_positions = rows[supervised], query_positions[supervised]
    terms = position_losses(beagle, out.last_hidden_state[supervised], target_states[sup_rows, sup_positions],
                            labels.select(label_rows))
    loss_sum = terms.loss(smooth_l1_weight, tv_weight).sum()
    stats = _per_offset(torch.full_like(terms.ce, step, dtype=torch.long), window, terms)
    new_states = out.last_hidden_state
    states = new_states.new_zeros(*input_ids.shape, new_states.shape[-1]).index_put(
        (rows[exists], query_positions[exists]), new_states[exists])
    return loss_sum, supervised.sum(), stats, states, at_step


# The per-offset statistics `_per_offset` sums (besides "count"): what the trainers log and evaluate.
STAT_NAMES = ("ce", "overlap", "smooth_l1", "agree")


def _per_offset(offsets, window, terms: PositionTerms) -> dict:
    """Sums of each loss term per window offset (or draft step) 1..`window` (`STAT_NAMES`), and the counts."""
    index = (offsets - 1).clamp(0, window - 1)

    def by_offset(values):
        return torch.zeros(window, device=values.device).index_add_(0, index, values.float().detach())
    return {"ce": by_offset(terms.ce), "overlap": by_offset(terms.overlap), "smooth_l1": by_offset(terms.regression),
            "agree": by_offset(terms.agree), "count": by_offset(torch.ones_like(terms.ce))}
