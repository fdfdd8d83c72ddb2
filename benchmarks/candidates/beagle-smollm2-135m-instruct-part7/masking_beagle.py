"""Beagle's attention masks as small named functions.

Every mask is a boolean tensor of shape `(batch, num_queries, num_keys)`: `True` where the query may read the key.
Inference, stage-1 and stage-2 training use the same block and differ only in which of these masks they pass and
which context states they feed. Masks compose with `&` and `|`; `to_attention_mask` turns one into what the
selected attention backend expects.

Notation (method.md): query row p holds token t_p at position p; a key holds a context state c_j at position j.
"""

import torch


def context_causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Query p reads keys at positions j < p (the diagonal is masked: h_p already encodes t_{p+1})."""
    return key_positions[:, None, :] < query_positions[:, :, None]


def key_padding_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Every query reads only valid (non-padding) keys."""
    return key_valid[:, None, :].expand(-1, num_queries, -1)


def window_starts(positions: torch.Tensor, window: int, offset: torch.Tensor) -> torch.Tensor:
    """Start s(p) of the window holding position p, for windows `offset + w * window` (w any integer).

    `offset` has one entry per sequence (shape `(batch,)`), drawn from [0, window) or a narrower range.
    """
    shifted = positions - offset[:, None]
    return torch.div(shifted, window, rounding_mode="floor") * window + offset[:, None]


def inverse_block_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Stage 1: query p reads true keys j < s(p) only; every key inside its own window is hidden."""
    return key_positions[:, None, :] < starts[:, :, None]


def window_draft_mask(
    query_positions: torch.Tensor, draft_positions: torch.Tensor, starts: torch.Tensor, step: int
) -> torch.Tensor:
    """Stage 2, draft half of the keys at simulation step t: query p reads draft state m iff
    s(p) <= m < p and m's offset in that window (m - s(p) + 1) is below t."""
    m = draft_positions[:, None, :]
    s = starts[:, :, None]
    return (m >= s) & (m < query_positions[:, :, None]) & (m - s + 1 < step)


def tree_ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """Self-and-ancestor mask of a draft tree.

    `parents` has shape `(batch, nodes)`: the index of each node's parent, or -1 for a root. Parents must precede
    their children. Returns `(batch, nodes, nodes)`, `True` at [i, a] when a is i or an ancestor of i.
    """
    batch, nodes = parents.shape
    mask = torch.eye(nodes, dtype=torch.bool, device=parents.device).expand(batch, -1, -1).clone()
    rows = torch.arange(batch, device=parents.device)
    for i in range(nodes):  # parents precede children, so a parent's row is complete when its child reads it
        p = parents[:, i]
        mask[:, i] |= mask[rows, p.clamp(min=0)] & (p >= 0)[:, None]
    return mask


def to_attention_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype,
                      bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Convert a boolean `(batch, q, k)` mask into the 4D form the selected attention backend accepts.

    `bias` `(batch, heads, q, k)`, optional: scores added where `allowed` (the recency bias). It needs a kernel that
    adds a float mask (eager, sdpa, flex_attention); flash kernels take none.
    Rows that read nothing must be handled by the caller (see `BeagleAttention`): no backend defines them.
    """
    allowed = allowed[:, None, :, :]
    if attn_implementation in ("flash_attention_2", "flash_attention_3"):
        if bias is not None:
            raise ValueError(f"attn_implementation={attn_implementation!r} cannot add Beagle's recency bias (flash "
                             "kernels take no score bias). Use attn_implementation='sdpa' or 'eager', or a draft "
                             "trained with recency_bias=False.")
        # Flash kernels take no arbitrary masks: only "every query reads every key" is expressible.
        if not bool(allowed.all()):
            raise ValueError(
                f"attn_implementation={attn_implementation!r} cannot express this Beagle mask (it only supports "
                "queries that read every key, e.g. chain drafting at batch size 1). Use attn_implementation='sdpa' "
                "or 'eager' for training and tree drafting."
            )
        return None
    if bias is None:
        if attn_implementation == "sdpa":
            return allowed
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    # eager, flex_attention and custom kernels registered in transformers (and sdpa with a bias) take an additive
    # float mask.
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


def key_distances(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """`(batch, q, k)`: how many positions key j lies behind the most recent one query p may read, p - 1 - j
    (0 for the state at p - 1; clamped at 0 for keys a query does not read)."""
    return (query_positions[:, :, None] - 1 - key_positions[:, None, :]).clamp(min=0)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 i / num_heads), i = 1..num_heads: from a sharp recency focus to nearly none."""
    return torch.pow(2.0, -8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)


__all__ = [
    "alibi_slopes",
    "key_distances",
    "context_causal_mask",
    "key_padding_mask",
    "window_starts",
    "inverse_block_mask",
    "window_draft_mask",
    "tree_ancestor_mask",
    "to_attention_mask",
]
