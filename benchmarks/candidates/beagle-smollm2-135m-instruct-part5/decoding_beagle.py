"""Beagle's own speculative decoding loop: EAGLE-2 dynamic draft trees and batches of padded prompts.

Reached through transformers' `custom_generate` mechanism:

    target.generate(ids, custom_generate=beagle_generate, beagle=beagle)                  # the exported callable
    target.generate(ids, custom_generate="path/to/beagle", assistant_model=beagle,         # the checkpoint folder's
                    trust_remote_code=True)                                                # custom_generate/generate.py

One round, for every row of the batch at once:
  1. draft: Beagle expands a tree from the row's pending token (the "root", not yet read by the target): the top-k
     children of the `top_k` best frontier nodes by cumulative draft log-probability, for `depth` levels; the
     `total_tokens` best nodes are kept (a chain is the tree with top_k = 1). With `min_prob`, nodes whose path the
     draft itself gives less than that probability are dropped and drafting stops once no frontier node reaches it.
     With `prompt_lookup_num_tokens`, the continuation that followed an earlier occurrence of the row's own last
     tokens joins the tree as one more branch, merged where the tree shares it (`prompt_lookup_rule`: the longest
     repeated suffix by default, or transformers' n-gram rule).
  2. verify: one target forward over [root; kept nodes] with a tree attention mask and explicit positions.
  3. accept: walk down from the root. At each node the target picks its token exactly as plain decoding would
     (argmax, or a sample from its processed distribution); if a child carries that token the walk descends,
     otherwise that token is the round's bonus. Every emitted token is the target's own choice given its prefix, so
     greedy output equals plain greedy and sampled output has exactly the target's distribution (with a
     deterministic tree this is the lossless multi-candidate rule). When sampling, the tree's children are by
     default draws from the draft's distribution (`draft_sampled_tree`), and the target's token at a node comes from
     recursive rejection sampling over them (`recursive_rejection_sample`): a drawn child is taken with probability
     min(1, p/q) instead of p, still exactly the target's distribution.
  4. keep only the accepted path's rows in the target's cache (gathered to the front of the round's slots; rows
     that accepted fewer tokens get masked slots), append the path's true states to Beagle's cache.
"""

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_beagle import BeagleCache
from .generation_beagle import (
    BeagleGenerationError,
    BeagleGenerationStats,
    cache_kwargs,
    check_empty_target_cache,
    check_generation_config,
    check_no_assistant_settings,
    draft_topk,
    gumbel_noise,
    sample_categorical,
    target_states,
)
from .masking_beagle import to_attention_mask, tree_ancestor_mask
from .prepack_beagle import is_prepacked


@dataclass
class TreeShape:
    """Size of the draft tree: `depth` levels, `top_k` children per expanded node, `total_tokens` nodes verified.

    `min_prob` (default 0: off) prunes the tree by the draft's own confidence, as EAGLE-2 reads it (the draft's path
    probability approximates the chance that the target accepts the path): a node whose cumulative draft probability
    (the product of the draft's probabilities along its path) is below `min_prob` is not verified, and drafting stops
    at the first level where no frontier node reaches it (its descendants could only score lower). At least one node
    is verified. Unconfident rounds then cost fewer draft steps and a smaller verification.
    """

    depth: int
    top_k: int
    total_tokens: int
    min_prob: float = 0.0

    def __post_init__(self):
        for name in ("depth", "top_k", "total_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BeagleGenerationError(f"tree `{name}` expected a positive integer, found {value!r}.")
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)) or not 0 <= self.min_prob < 1:
            raise BeagleGenerationError(f"tree `min_prob` expected a probability in [0, 1), found {self.min_prob!r}.")
        max_nodes = self.top_k + (self.depth - 1) * self.top_k * self.top_k
        if self.total_tokens > max_nodes:
            raise BeagleGenerationError(
                f"tree `total_tokens` expected at most {max_nodes} (top_k + (depth-1)*top_k^2 for depth={self.depth}, "
                f"top_k={self.top_k}), found {self.total_tokens}."
            )


_VERIFY_COST_CACHE: dict = {}
# Forward sizes the auto tree measures: steps of 2 where CPU curves turn from flat to rising, so the budget can land
# between powers of two (a 2-core EPYC's bf16 curve crosses 1.35x somewhere between 8 and 24 tokens, by the run).
VERIFY_COST_COUNTS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64)


@torch.no_grad()
def verification_cost_samples(target, counts=VERIFY_COST_COUNTS, prefix: int = 256, repeats: int = 3,
                              rounds: int = 1) -> dict:
    """Times (s) of target forwards over `n` new tokens on top of a `prefix`-token cache, `{n: [seconds, ...]}`:
    `rounds` passes over all counts (interleaved, so that a slow spell of a shared machine spreads over every count),
    each timing `repeats` forwards per count after one untimed warm-up forward per count."""
    device = target.device
    ids = torch.randint(0, target.config.get_text_config().vocab_size, (1, prefix + max(counts)), device=device)
    cache = DynamicCache(config=target.config)
    target(ids[:, :prefix], **cache_kwargs(target, cache), use_cache=True)
    times = {n: [] for n in counts}
    for round_index in range(rounds):
        for n in counts:
            for i in range(repeats + (round_index == 0)):
                start = time.perf_counter()
                target(ids[:, prefix : prefix + n], **cache_kwargs(target, cache), use_cache=True)
                elapsed = time.perf_counter() - start
                cache.crop(-n)
                if round_index or i:
                    times[n].append(elapsed)
    return times


COST_STATISTICS = {"median": statistics.median, "min": min}


def measure_verification_cost(target, counts=VERIFY_COST_COUNTS, prefix: int = 256, repeats: int = 3,
                              rounds: int = 1, statistic: str = "median") -> dict:
    """One time (s) per number of new tokens `n`: `statistic` ("median" or "min") of `verification_cost_samples`."""
    if statistic not in COST_STATISTICS:
        raise BeagleGenerationError(f"measure_verification_cost: `statistic` expected one of {sorted(COST_STATISTICS)}, "
                                    f"found {statistic!r}.")
    samples = verification_cost_samples(target, counts, prefix, repeats, rounds)
    return {n: COST_STATISTICS[statistic](ts) for n, ts in samples.items()}


def tree_shape_for_costs(costs: dict, tolerance: float = 1.35) -> TreeShape:
    """The tree for a verification-cost curve (`{new tokens: forward time}`, with 1 among the keys): verify as many
    nodes as cost at most `tolerance` times a one-token forward (at least 4). The budget ends before the first size
    over the tolerance, so a lucky sample further up the curve does not stretch it. The nodes go two to a parent,
    one level per pair up to depth 8, and wider only beyond the 30 nodes a 2-wide tree of depth 8 can hold: a third
    child per node is rarely accepted and costs verification (docs/findings.md, "Tree width on the EPYC")."""
    if 1 not in costs:
        raise BeagleGenerationError(f"tree_shape_for_costs: the cost of a one-token forward (key 1) is needed, found "
                                    f"keys {sorted(costs)}.")
    total = 4
    for n in sorted(costs):
        if costs[n] > tolerance * costs[1]:
            break
        total = max(total, n)
    depth = min(max(3, -(-total // 2)), 8)
    top_k = 2 if total <= 2 + (depth - 1) * 4 else min(-(-total // depth), 8)
    total = min(total, top_k + (depth - 1) * top_k * top_k)
    return TreeShape(depth=depth, top_k=top_k, total_tokens=total)


def auto_tree_shape(target, tolerance: float = 1.35) -> TreeShape:
    """`tree_shape_for_costs` on the target's verification-cost curve on this machine, measured once per target, dtype
    and packing (`VERIFY_COST_COUNTS`, 3 interleaved rounds of 3 forwards per count, the fastest of each count's 9:
    a busy spell of a shared machine only adds time, and the minimum keeps the tree the same from one measurement
    to the next more often than the median: `benchmarks/auto_tree_stability.py`)."""
    key = (id(target), str(target.device), str(target.dtype), is_prepacked(target))  # packing changes the curve
    if key not in _VERIFY_COST_CACHE:
        _VERIFY_COST_CACHE[key] = measure_verification_cost(target, rounds=3, statistic="min")
    return tree_shape_for_costs(_VERIFY_COST_CACHE[key], tolerance)


# ------------------------------------------------------------------------------------------------- drafting
def _self_and_ancestors(nodes: torch.Tensor, parents: torch.Tensor, depth: int) -> torch.Tensor:
    """`(batch, q, depth + 1)`: each node's id followed by its ancestors' ids, ending with -1 (the root)."""
    chain, current = [nodes], nodes
    for _ in range(depth):
        current = torch.where(current >= 0, parents.gather(1, current.clamp(min=0).flatten(1)).view_as(current), current)
        chain.append(current)
    return torch.stack(chain, dim=-1)


@torch.no_grad()
def draft_tree(beagle, cache: BeagleCache, roots: torch.Tensor, root_positions: torch.Tensor, shape: TreeShape):
    """Expand an EAGLE-2 dynamic draft tree per row from `roots` `(batch,)` at `root_positions` `(batch,)`.

    Returns `tokens`, `parents` (index of the parent among the returned nodes, -1 for the root) and `depths`
    (1 = child of the root), each `(batch, n)` with n = `total_tokens`, or fewer when `shape.min_prob` prunes (every
    row keeps as many nodes as the row with the most confident ones), parents before children. The draft states of
    expanded nodes are appended to `cache` (method.md §2); the caller drops them with `cache.discard_drafts()`.
    """
    return _expand_tree(beagle, cache, roots, root_positions, shape)[:3]


@torch.no_grad()
def draft_sampled_tree(beagle, cache: BeagleCache, roots: torch.Tensor, root_positions: torch.Tensor,
                       shape: TreeShape, temperature: float = 1.0):
    """`draft_tree` for sampled decoding: each expanded node's `top_k` children are a sample without replacement
    from the draft's distribution at `temperature` (Gumbel top-k, in sampling order) instead of its k most probable
    tokens, so that `recursive_rejection_sample` can verify them against the target's distribution (a sampled draft
    token can be accepted with probability min(1, p/q), where a fixed one only with p). Which nodes are expanded
    still follows the cumulative draft probability, but nodes are kept in sibling groups (the best parents' groups
    first), each group a prefix of its sampling order: a value-based choice among siblings would bias the sample.

    Returns `tokens`, `parents`, `depths` as `draft_tree`, plus `ranks` `(batch, n)` (each node's place in its
    parent's sampling order) and `dists` `(batch, n + 1, draft vocabulary)`: at index 0 the distribution the root's
    children were sampled from, at index i + 1 node i's (zeros where node i has no children).
    """
    if not temperature or temperature <= 0:
        raise BeagleGenerationError(f"draft_sampled_tree: `temperature` expected a positive number, found {temperature!r}.")
    return _expand_tree(beagle, cache, roots, root_positions, shape, temperature)


def sampled_child_scores(log_q: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """The log value of sampled children `drawn` `(batch, q, k)` (draft-vocabulary ids, in sampling order) under
    draft log-probabilities `log_q` `(batch, q, vocabulary)`: how the tree ranks them for expanding and keeping.

    Their draft log-probability, as for top-k children. A child drawn first is taken by recursive rejection sampling
    far more often than its q says (`benchmarks/sampled_acceptance.py`), but valuing children by their rank and q
    measured that way raised τ at T = 1 by 0.16-0.19 and verified more nodes for it, with no net speedup
    (`benchmarks/sampled_tree_variants.py`, which swaps this function).
    """
    return log_q.gather(-1, drawn)


def _expand_tree(beagle, cache: BeagleCache, roots: torch.Tensor, root_positions: torch.Tensor, shape: TreeShape,
                 temperature: float | None = None):
    batch, device, k = roots.shape[0], roots.device, shape.top_k
    log_min_prob = math.log(shape.min_prob) if shape.min_prob > 0 else -math.inf
    if cache.num_draft:
        raise RuntimeError("draft_tree: the cache still holds draft states; call `cache.discard_drafts()` first.")
    true_allowed = cache.positions < root_positions[:, None]  # (batch, true slots); padding is masked by the model
    empty = torch.empty(batch, 0, dtype=torch.long, device=device)
    tokens, parents, depths = empty, empty, empty
    scores = torch.empty(batch, 0, device=device)
    # Each cached draft slot belongs to one node: it holds the draft state of that node's parent, read with the
    # node's own token (the token that followed the state on this path: `context_next_token`). The node and its
    # descendants read it; its siblings hold slots of their own.
    slot_nodes = empty
    frontier = torch.full((batch, 1), -1, dtype=torch.long, device=device)
    frontier_tokens, frontier_scores = roots[:, None], torch.zeros(batch, 1, device=device)
    states = None  # the frontier's slots: each frontier node's parent's draft state
    ranks, group_scores, dists, owners = empty, scores, [], []  # sampled trees: sibling order, parent's score
    for level in range(shape.depth):
        draft_kwargs = {}
        if states is not None:
            slot_nodes = torch.cat([slot_nodes, frontier], dim=1)
            draft_kwargs = dict(draft_states=states, draft_next_ids=frontier_tokens,
                                draft_position_ids=(root_positions[:, None] + level - 1).expand(-1, states.shape[1]))
        lineage = _self_and_ancestors(frontier, parents, level)  # (batch, q, level + 1)
        draft_allowed = (slot_nodes[:, None, :, None] == lineage[:, :, None, :]).any(-1)
        num_queries = frontier.shape[1]
        allowed = torch.cat([true_allowed[:, None, :].expand(-1, num_queries, -1), draft_allowed], dim=-1)
        out = beagle(input_ids=frontier_tokens, position_ids=(root_positions[:, None] + level).expand(-1, num_queries),
                     past_key_values=cache, attention_mask=allowed, **draft_kwargs)
        if temperature is None:
            child_scores, child_tokens = draft_topk(beagle, out.logits, k)
        else:
            log_q = (out.logits.float() / temperature).log_softmax(-1)
            # Gumbel top-k: k draws without replacement, in order
            drawn = (log_q + gumbel_noise(log_q)).topk(k, dim=-1).indices
            child_scores = sampled_child_scores(log_q, drawn)
            child_tokens = beagle.draft_to_target[drawn] if beagle.draft_to_target is not None else drawn
            dists.append(log_q.exp())
            owners.append(frontier)
            ranks = torch.cat([ranks, torch.arange(k, device=device).expand(batch, num_queries, k).flatten(1)], dim=1)
            group_scores = torch.cat([group_scores, frontier_scores[..., None].expand(-1, -1, k).flatten(1)], dim=1)
        # Strictly below the parent, so any top-N selection by score contains every selected node's ancestors.
        child_scores = (frontier_scores[..., None] + child_scores - 1e-6).flatten(1)
        child_tokens = child_tokens.flatten(1)
        first = tokens.shape[1]
        tokens = torch.cat([tokens, child_tokens], dim=1)
        parents = torch.cat([parents, frontier[..., None].expand(-1, -1, k).flatten(1)], dim=1)
        scores = torch.cat([scores, child_scores], dim=1)
        depths = torch.cat([depths, torch.full_like(child_tokens, level + 1)], dim=1)
        if level + 1 == shape.depth:
            break
        best = child_scores.topk(k, dim=-1).indices
        if beagle.config.concat_draft_states:  # child c of this level is a child of query c // k
            hidden = out.last_hidden_state
            states = hidden.gather(1, (best // k)[..., None].expand(-1, -1, hidden.shape[-1]))
        frontier = first + best
        frontier_tokens, frontier_scores = child_tokens.gather(1, best), child_scores.gather(1, best)
        if shape.min_prob > 0 and bool((frontier_scores < log_min_prob).all()):
            break  # every deeper node would score lower still: none would be kept
    num_keep = min(shape.total_tokens, scores.shape[1])
    if temperature is None:
        if shape.min_prob > 0:
            num_keep = min(num_keep, max(1, int((scores >= log_min_prob).sum(-1).max())))
        keep = scores.topk(num_keep, dim=-1).indices
    else:
        # Whole sibling groups, best parent first (ties: the shallower group), each group in its sampling order; only
        # the last group taken may be cut short, which leaves a prefix of its draws.
        if shape.min_prob > 0:
            num_keep = min(num_keep, max(k, int((group_scores >= log_min_prob).sum(-1).max())))
        order = ranks.sort(dim=-1, stable=True).indices
        order = order.gather(1, depths.gather(1, order).sort(dim=-1, stable=True).indices)
        order = order.gather(1, group_scores.gather(1, order).sort(dim=-1, descending=True, stable=True).indices)
        keep = order[:, :num_keep]
    keep = keep.sort(dim=-1).values
    new_index = torch.full_like(parents, -1)
    new_index.scatter_(1, keep, torch.arange(num_keep, device=device).expand(batch, -1))
    kept_parents = parents.gather(1, keep)
    kept_parents = torch.where(kept_parents >= 0, new_index.gather(1, kept_parents.clamp(min=0)), kept_parents)
    kept = tokens.gather(1, keep), kept_parents, depths.gather(1, keep)
    if temperature is None:
        return kept
    # the distribution each kept node's children were drawn from, at the node's index + 1 (the root's at 0); an
    # expanded node that was not kept writes into one extra slot, dropped
    dists, owners = torch.cat(dists, dim=1), torch.cat(owners, dim=1)
    slot = torch.where(owners >= 0, new_index.gather(1, owners.clamp(min=0)) + 1, 0)
    slot = torch.where((owners >= 0) & (slot == 0), num_keep + 1, slot)
    node_dists = dists.new_zeros(batch, num_keep + 2, dists.shape[-1])
    node_dists.scatter_(1, slot[..., None].expand(-1, -1, dists.shape[-1]), dists)
    return (*kept, ranks.gather(1, keep), node_dists[:, :-1])


# ------------------------------------------------------------------------------------------ prompt-lookup branch
def ngram_match(sequence: torch.Tensor, max_ngram: int) -> tuple[int, int]:
    """transformers' prompt-lookup match for one row: the end position of the earliest earlier occurrence of the
    sequence's last n-gram, for the largest n <= `max_ngram` that has one, and n; (-1, 0) when none has."""
    length = sequence.shape[0]
    for n in range(min(max_ngram, length - 1), 0, -1):
        ends = (sequence.unfold(0, n, 1) == sequence[-n:]).all(-1).nonzero().flatten() + n - 1
        ends = ends[ends < length - 1]
        if ends.numel():
            return int(ends[0]), n
    return -1, 0


def following_tokens(sequence: torch.Tensor, end: int, num_tokens: int) -> list[int]:
    """Up to `num_tokens` tokens that followed position `end` (transformers' prompt-lookup proposal)."""
    return sequence[end + 1 : end + 1 + num_tokens].tolist()


def prompt_lookup(sequence: torch.Tensor, num_tokens: int, max_ngram: int) -> list[int]:
    """transformers' prompt-lookup proposal for one row: up to `num_tokens` tokens that followed the earliest earlier
    occurrence of the sequence's last n-gram, for the largest n <= `max_ngram` that has one; [] when none has."""
    end, _ = ngram_match(sequence, max_ngram)
    return following_tokens(sequence, end, num_tokens) if end >= 0 else []


def suffix_matches(sequence: torch.Tensor, max_ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The earlier occurrences of the sequence's last token (`ends`, their positions, in order) and how many tokens
    of the sequence's end each matches (`matched`, counted up to `max_ngram`)."""
    length = sequence.shape[0]
    ends = (sequence[:-1] == sequence[-1]).nonzero().flatten()
    offsets = torch.arange(min(max_ngram, length - 1), device=sequence.device)
    earlier = ends[:, None] - offsets[None]
    same = (earlier >= 0) & (sequence[earlier.clamp(min=0)] == sequence[length - 1 - offsets][None])
    return ends, same.long().cumprod(1).sum(1)


def suffix_match(sequence: torch.Tensor, max_ngram: int = 32, latest: bool = True) -> tuple[int, int]:
    """The earlier occurrence of the sequence's end with the longest match (counted up to `max_ngram` tokens; ties:
    the latest occurrence, or the earliest with `latest=False`): its end position and the match length; (-1, 0)
    when the last token never occurred before."""
    if sequence.shape[0] < 2:
        return -1, 0
    ends, matched = suffix_matches(sequence, max_ngram)
    if ends.numel() == 0:
        return -1, 0
    best = int(matched.max())
    candidates = ends[matched == best]
    return int(candidates[-1] if latest else candidates[0]), best


def periodic_continuation(sequence: torch.Tensor, end: int, num_tokens: int) -> list[int]:
    """`num_tokens` tokens that followed position `end`; where they run into the sequence's own end, repeated with
    the period `len(sequence) - 1 - end` (the current end follows the occurrence at `end` the same way)."""
    period = sequence.shape[0] - 1 - end
    proposal = sequence[end + 1 : end + 1 + num_tokens].tolist()
    while len(proposal) < num_tokens:
        proposal.append(proposal[len(proposal) - period])
    return proposal


def suffix_lookup(sequence: torch.Tensor, num_tokens: int, max_ngram: int = 32, latest: bool = True,
                  min_ngram: int = 1) -> list[int]:
    """A lookup proposal for one row from the longest repeated suffix: up to `num_tokens` tokens that followed the
    earlier occurrence of the sequence's end with the longest match (`suffix_match`); [] when no match reaches
    `min_ngram` tokens.

    Where the continuation runs into the sequence's own end, the proposal repeats with the match's period
    (`periodic_continuation`).
    """
    end, matched = suffix_match(sequence, max_ngram, latest)
    if num_tokens < 1 or end < 0 or matched < min_ngram:
        return []
    return periodic_continuation(sequence, end, num_tokens)


def add_lookup_branch(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, proposals: list[list[int]]):
    """Merge one proposed continuation of the root per row into a draft tree (`draft_tree`'s layout).

    The proposal follows the tree as long as the tree already holds its tokens; its remaining tokens are appended as
    a chain below the last shared node. Rows are brought to one node count with copies of their first node (same
    token, same parent, later index): the accept walk descends into the first matching child, so a copy is never on
    an accepted path (a row with no node at all, finished in a copy-mode round, gets token-0 children of its root,
    never walked). Returns the merged `tokens, parents, depths` and `from_lookup` (True for nodes only the
    proposal holds).
    """
    rows = []
    for b, proposal in enumerate(proposals):
        row_tokens, row_parents, row_depths = tokens[b].tolist(), parents[b].tolist(), depths[b].tolist()
        children = {(p, t): i for i, (p, t) in reversed(list(enumerate(zip(row_parents, row_tokens))))}
        added, node = [], -1
        for depth, token in enumerate(proposal, start=1):
            if (node, token) in children:
                node = children[(node, token)]
                continue
            row_tokens.append(token)
            row_parents.append(node)
            row_depths.append(depth)
            node = len(row_tokens) - 1
            added.append(node)
        rows.append((row_tokens, row_parents, row_depths, added))
    width = max(len(r[0]) for r in rows)
    merged = torch.empty(3, len(rows), width, dtype=torch.long)
    from_lookup = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (row_tokens, row_parents, row_depths, added) in enumerate(rows):
        pad = width - len(row_tokens)
        first = (row_tokens[0], row_parents[0], row_depths[0]) if row_tokens else (0, -1, 1)  # (a finished row)
        merged[0, b] = torch.tensor(row_tokens + [first[0]] * pad)
        merged[1, b] = torch.tensor(row_parents + [first[1]] * pad)
        merged[2, b] = torch.tensor(row_depths + [first[2]] * pad)
        from_lookup[b, added] = True
    merged = merged.to(tokens.device)
    return merged[0], merged[1], merged[2], from_lookup


# ----------------------------------------------------------------------------------------------- target cache
def _keep_cache_rows(cache: DynamicCache, start: int, index: torch.Tensor) -> None:
    """Keep, per batch row, the slots `start + index[b]` of the last forward (in that order) and drop the rest: the
    kept rows are written over the first slots of that forward in place and the cache is cut after them (a view; the
    next forward's concatenation copies it anyway), so the prefix is not copied once more. When every row kept a
    prefix of the forward's slots (no draft token accepted, or the first-ranked path), cutting is all it takes."""
    width = index.shape[1]
    kept_in_place = bool((index == torch.arange(width, device=index.device)).all())
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            if not kept_in_place:
                idx = index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[-1])
                tensor[:, :, start : start + width] = tensor[:, :, start:].gather(2, idx)
            setattr(layer, name, tensor[:, :, : start + width])


def _compact_cache(cache: DynamicCache, kv_valid: torch.Tensor, prompt_len: int, length: int) -> None:
    """Lay the cache out as the returned sequences are (plain `generate`'s cache for them): each row's prompt slots,
    then its valid generated slots in order, `length` slots in all. In a batch, rows that accepted fewer tokens in a
    round leave masked slots behind, which a later call continuing from the cache would otherwise read as tokens.
    Slots past a shorter row's end repeat its last one (its output is padded there)."""
    rows = [list(range(prompt_len)) + (kv_valid[b, prompt_len:].nonzero().flatten() + prompt_len).tolist()
            for b in range(kv_valid.shape[0])]
    index = torch.tensor([row[:length] + [row[-1]] * (length - len(row)) for row in rows], device=kv_valid.device)
    _keep_cache_rows(cache, 0, index)


# The target's cache arrives as `cache` from transformers 5.24 on, as `past_key_values` before.
ALLOWED_MODEL_KWARGS = {"attention_mask", "cache", "past_key_values", "use_cache", "position_ids", "logits_to_keep",
                        "cache_position"}


def resolve_tree_shape(target, beagle, tree_shape) -> TreeShape:
    """"auto" and "chain" prune by the draft's `draft_confidence_threshold` (as the assisted chain stops on it)."""
    if tree_shape is None or tree_shape == "auto":
        return replace(auto_tree_shape(target), min_prob=beagle.config.draft_confidence_threshold)
    if tree_shape == "chain":
        k = beagle.config.num_draft_tokens
        return TreeShape(depth=k, top_k=1, total_tokens=k, min_prob=beagle.config.draft_confidence_threshold)
    if isinstance(tree_shape, TreeShape):
        return tree_shape
    if isinstance(tree_shape, dict):
        return TreeShape(**tree_shape)
    raise BeagleGenerationError(f"`tree_shape` expected 'auto', 'chain', a TreeShape or a dict of depth/top_k/"
                                f"total_tokens[/min_prob], found {tree_shape!r}.")


@dataclass(frozen=True)
class LookupRule:
    """One of the loop's prompt-lookup rules: how a row's match is found (`match(sequence, max_ngram)` -> (end
    position, match length)), how the proposal continues from it (`continuation(sequence, end, num_tokens)`), and the
    longest match it reads when `max_matching_ngram_size` is not set."""

    match: Callable[[torch.Tensor, int], tuple[int, int]]
    continuation: Callable[[torch.Tensor, int, int], list[int]]
    max_ngram: int


LOOKUP_RULES = {"suffix": LookupRule(suffix_match, periodic_continuation, 32),
                "ngram": LookupRule(ngram_match, following_tokens, 2)}


def _require_int(name: str, value, least: int, kind: str) -> None:
    """Refuse a loop setting that is not an int (a bool is not one) of at least `least`, naming it and `kind`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BeagleGenerationError(f"`{name}` expected {kind}, found {value!r}.")


def resolve_prompt_lookup(generation_config, rule: str = "suffix", default_tokens: int = 0) -> tuple[int, int]:
    """`prompt_lookup_num_tokens` / `max_matching_ngram_size` (transformers' prompt-lookup settings) for the loop's
    lookup tokens under `rule`: (0, _) when off. A call that sets no `prompt_lookup_num_tokens` gets
    `default_tokens` (the draft's `config.default_prompt_lookup_num_tokens`); 0 turns the lookup off. The match
    length defaults to 32 tokens for "suffix" and to 2 for "ngram", as in transformers."""
    if rule not in LOOKUP_RULES:
        raise BeagleGenerationError(f"`prompt_lookup_rule` expected one of {sorted(LOOKUP_RULES)}, found {rule!r}.")
    num_tokens = getattr(generation_config, "prompt_lookup_num_tokens", None)
    num_tokens = default_tokens if num_tokens is None else num_tokens
    _require_int("prompt_lookup_num_tokens", num_tokens, 0, "an integer >= 0 (0: off)")
    max_ngram = getattr(generation_config, "max_matching_ngram_size", None)
    max_ngram = LOOKUP_RULES[rule].max_ngram if max_ngram is None else max_ngram
    _require_int("max_matching_ngram_size", max_ngram, 1, "a positive integer")
    return num_tokens, max_ngram


# Copy mode's defaults in greedy decoding: from a 4-token match, verify 32 lookup tokens and no draft (fp32, 20 MT-bench
# first turns, identical texts: τ +0.31, 3% less time; matches of 4-6 and branches of 16-32 tokens alike; results log,
# Session 27). Off when sampling, where it did not pay (10 MT-bench first turns at T = 1).
LOOKUP_COPY_MATCH, LOOKUP_COPY_TOKENS = 4, 32
# The chain path's copy rounds (`target.generate(assistant_model=beagle, prompt_lookup_num_tokens=N)`, `ChainLookup`)
# start at a 2-token match: a chain round proposes the lookup continuation or the draft, not both, and on the target's
# replies the 10 tokens after a 2-token match are taken 1.7 (MT-bench) / 2.0 (HumanEval) at a time on average, after a
# 1-token match 0.5, against the draft chain's ~0.7 per round (`benchmarks/results/lookup_match_lengths.md`). On identical
# fp32 texts (10 MT-bench first turns) matches of 2 / 3 / 4 gave τ 2.41 / 2.30 / 2.27 (results log, Session 33). When
# sampling, a sampled text repeats a passage token for token less often: from a 4-token match (T = 1, 20 + 20 MT-bench
# and HumanEval first turns: 1.040x / 1.091x the chain's total tokens/s, against 1.003x / 1.067x from 2 tokens and
# 1.042x / 1.059x from 8; per prompt 8 against 4 1.007x / 0.967x by median; results log, Session 34). A copy round
# proposes all N tokens whatever the match's length: at most 2 or 3 per matched token (`LOOKUP_TOKENS_PER_MATCH` below)
# ran level (AMX Xeon, bf16, 20 + 20 first turns: 0.98-1.01x by median, 0.98-1.05x by total; results log, Session 39).
# Longer copies from a long match (up to 16 / 32 tokens from a 4-token match, `ChainLookup.extend_match`) were level
# too (EPYC, bf16 20 + 20 and fp32 10 first / second turns: 16 tokens 1.02-1.05x by median, 1.00-1.03x by total; 32
# tokens 0.94-1.03x; results log, Session 40): copy rounds propose N tokens.
CHAIN_LOOKUP_MATCH, CHAIN_LOOKUP_MATCH_SAMPLING = 2, 4
# Outside copy rounds the loop's lookup branch proposes at most 3 tokens per matched token (a 1-token match 3, a 2-token
# match 6, ...): a short match's continuation is rarely right for long and every proposed token is verified. With the
# 6,2,12 tree on the 2-core EPYC, against the uncapped 10-token branch per prompt by median: T = 0 fp32 MT-bench 1.054x
# (identical texts; 1.03-1.05x in two runs with 6,3,16), bf16 MT-bench 0.994x and HumanEval 1.120x, T = 1 bf16 1.018x /
# 1.037x (20 + 20 first turns each; results log, Sessions 32, 37 and 38). On the AMX Xeon, T = 0 fp32 1.031x /
# 1.026x (identical texts; bf16 0.923x / 1.012x on texts that differ per method; results log, Session 39).
LOOKUP_TOKENS_PER_MATCH = 3


def resolve_copy_mode(copy_match, copy_tokens, do_sample: bool = False, lookup: bool = True) -> tuple[int, int]:
    """The loop's copy mode: (`lookup_copy_match`, `lookup_copy_tokens`), a match length (0: off) and a branch length;
    None takes the defaults: `LOOKUP_COPY_MATCH` in greedy decoding, off when sampling, and `LOOKUP_COPY_TOKENS`.
    Copy mode extends the lookup branch: without one (`lookup` False) setting it is refused rather than ignored."""
    if not lookup and (copy_match or copy_tokens is not None):
        raise BeagleGenerationError("`lookup_copy_match` / `lookup_copy_tokens` expected only with the lookup branch "
                                    "(copy mode extends it), found them with the lookup off "
                                    "(`prompt_lookup_num_tokens` 0).")
    if copy_match is None:
        copy_match = 0 if do_sample else LOOKUP_COPY_MATCH
    copy_tokens = LOOKUP_COPY_TOKENS if copy_tokens is None else copy_tokens
    for name, value, least in (("lookup_copy_match", copy_match, 0), ("lookup_copy_tokens", copy_tokens, 1)):
        _require_int(name, value, least, "a non-negative integer (0: off)" if least == 0 else "a positive integer")
    return copy_match, copy_tokens


def _resolve_lookup_setting(name: str, value, default, lookup: bool, role: str, zero_is_off: bool = False):
    """An int setting of the lookup branch (None: `default`): positive, or also 0 (off) where `zero_is_off`; refused
    without the branch it `role`s, rather than ignored (but for 0, off like the branch)."""
    if value is None:
        return default
    if not lookup and not (zero_is_off and value == 0):
        raise BeagleGenerationError(f"`{name}` expected only with the lookup branch it {role}, found it with the lookup "
                                    "off (`prompt_lookup_num_tokens` 0).")
    _require_int(name, value, 0 if zero_is_off else 1,
                 "a non-negative integer (0: off) or None" if zero_is_off else "a positive integer or None")
    return value


def resolve_lookup_tokens_per_match(per_match, lookup: bool = True) -> int:
    """`lookup_tokens_per_match`: the lookup branch's tokens per matched token outside copy rounds; None takes
    `LOOKUP_TOKENS_PER_MATCH`, 0 turns the cap off (every branch has `prompt_lookup_num_tokens`). 0 without the
    lookup branch."""
    return _resolve_lookup_setting("lookup_tokens_per_match", per_match, LOOKUP_TOKENS_PER_MATCH if lookup else 0,
                                   lookup, "shortens", zero_is_off=True)


def resolve_lookup_min_match(min_match, lookup: bool = True) -> int:
    """`lookup_min_match`: the shortest match that proposes a lookup branch (None: 1, every match)."""
    return _resolve_lookup_setting("lookup_min_match", min_match, 1, lookup, "gates")


# ------------------------------------------------------------------------------------------------ the loop
def recursive_rejection_sample(p: torch.Tensor, q: torch.Tensor, candidates: list[int]) -> tuple[int, bool]:
    """One token distributed exactly as `p` (a probability vector), using draft `candidates` drawn in this order
    without replacement from `q` (same vocabulary): candidate c is taken with probability min(1, p(c) / q(c)); after a
    rejection p becomes the normalised max(p - q, 0) and q loses c (renormalised), and if every candidate is rejected
    the token is drawn from what is left of p (recursive rejection sampling; each step is the speculative-sampling rule
    for the current residual and proposal, so the result has exactly the distribution p). Returns the token and
    whether it is one of the candidates."""
    p, q = p.double(), q.double()
    for c in candidates:
        if float(torch.rand((), dtype=torch.float64, device=p.device) * q[c]) < float(p[c]):
            return c, True
        residual = (p - q).clamp_(min=0)
        total = residual.sum()
        if total > 0:  # (zero only when p == q, where c was taken with probability 1)
            p = residual / total
        q = q.clone()
        q[c] = 0
        left = q.sum()
        if left <= 0:  # q held only the candidates drawn so far: no later candidate can follow
            break
        q = q / left
    return int(sample_categorical(p)), False


@torch.no_grad()
def beagle_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    beagle=None,
    tree_shape=None,
    beagle_streamer=None,
    sampled_drafts=None,
    prompt_lookup_rule: str = "suffix",
    lookup_copy_match: int | None = None,
    lookup_copy_tokens: int | None = None,
    lookup_tokens_per_match: int | None = None,
    lookup_min_match: int | None = None,
    **model_kwargs,
):
    """Speculative decoding with Beagle draft trees, for batches of (left-)padded prompts.

    Use as `target.generate(input_ids, custom_generate=beagle_generate, beagle=beagle, tree_shape=...)`.
    `tree_shape`: "auto" (default: sized from this machine's verification-cost curve), "chain", a `TreeShape`, or a
    dict with depth / top_k / total_tokens. `prompt_lookup_num_tokens=N` (transformers' prompt-lookup setting) adds
    to every round's tree up to N tokens that followed an earlier occurrence of the row's last tokens in its prompt
    and output, as one more branch verified in the same forward (lossless like every branch). `prompt_lookup_rule`
    picks the occurrence: "suffix" (default) the latest one of the longest repeated suffix, up to
    `max_matching_ngram_size` tokens (default 32), repeating with its period where the continuation reaches the end
    (`suffix_lookup`); "ngram" transformers' rule, the earliest occurrence of the last n-gram, n <=
    `max_matching_ngram_size` (default 2) (`prompt_lookup`). Copy mode: in a round where every row's match is at least
    `lookup_copy_match` tokens long (default: 4 in greedy decoding, 0 (off) when sampling) and at least
    `lookup_min_match`, and the rule continues it, the text is copying an earlier passage, which the draft rarely
    continues better than the passage does: Beagle does not draft, and the round verifies only the lookup branch,
    extended to `lookup_copy_tokens` tokens (default 32); the rounds are counted in
    `beagle.generation_stats.copy_rounds`. `lookup_tokens_per_match=K` (default 3; 0: off) shortens the
    branch of a round that is not copying to at most K tokens per matched token (a 1-token match proposes K tokens, a
    2-token match 2K, up to `prompt_lookup_num_tokens`): a short match's continuation is rarely right for long, and
    every proposed token is verified. `lookup_min_match=M` (default 1) proposes a branch only from a match of at
    least M tokens. Statistics of the run are left in `beagle.generation_stats`.
    transformers does not hand `streamer` or `tokenizer` to a `custom_generate` callable: pass the streamer as
    `beagle_streamer=` and stop strings as a `StopStringCriteria` in `stopping_criteria`, or call
    `generate_with_own_loop`, which does both (as the checkpoint folder's `custom_generate/generate.py` does).
    `sampled_drafts` (sampling only; default: on when `do_sample`): draw each node's children from the draft's
    distribution at the generation temperature (`draft_sampled_tree`) and verify them with recursive rejection
    sampling, instead of the draft's top-k tokens accepted only when the target samples them.
    """
    streamer = streamer if streamer is not None else beagle_streamer
    if beagle is None or not callable(getattr(beagle, "beagle_candidate_generator", None)):
        raise BeagleGenerationError("`beagle` expected a Beagle draft model (pass `beagle=beagle` to generate), "
                                    f"found {type(beagle).__name__}.")
    check_generation_config(generation_config)
    check_no_assistant_settings(generation_config)
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise BeagleGenerationError(f"`{flag}` expected False with Beagle's own decoding loop, found True: use "
                                        "`target.generate(..., assistant_model=beagle)` (batch size 1) for it.")
    unknown = set(k for k, v in model_kwargs.items() if v is not None) - ALLOWED_MODEL_KWARGS
    if unknown:
        raise BeagleGenerationError(f"model inputs expected only input_ids and attention_mask with Beagle's own loop, "
                                    f"found {sorted(unknown)}.")
    if synced_gpus:
        raise BeagleGenerationError("`synced_gpus` expected False: Beagle's loop does not run under ZeRO-3/FSDP sync.")
    beagle.ensure_bound_to(model)
    shape = resolve_tree_shape(model, beagle, tree_shape)
    lookup_tokens, max_ngram = resolve_prompt_lookup(generation_config, prompt_lookup_rule,
                                                     beagle.config.default_prompt_lookup_num_tokens)
    if generation_config.use_cache is False:
        raise BeagleGenerationError("`use_cache` expected True with Beagle's own loop, found False: speculative "
                                    "decoding verifies each round against the target's KV cache.")
    check_empty_target_cache(model_kwargs, dynamic_only=True)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    batch, prompt_len = input_ids.shape
    if streamer is not None and batch > 1:
        raise BeagleGenerationError(f"`streamer` expected batch size 1, found {batch}.")
    if batch > 1 and any(isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor) for p in logits_processor):
        raise BeagleGenerationError(f"`guidance_scale` expected batch size 1 with Beagle's own loop, found {batch}: "
                                    "the guidance processor runs the unconditional model over the whole batch one "
                                    "step at a time, while the loop's rows advance by different numbers of tokens; "
                                    "generate one prompt per call.")
    device = input_ids.device
    do_sample = bool(generation_config.do_sample)
    if sampled_drafts is None:
        sampled_drafts = do_sample
    if not isinstance(sampled_drafts, bool) or (sampled_drafts and not do_sample):
        raise BeagleGenerationError(f"`sampled_drafts` expected a bool, and True only with do_sample=True; found "
                                    f"{sampled_drafts!r} with do_sample={do_sample}.")
    draft_temperature = float(generation_config.temperature or 1.0)
    layer_ids = list(beagle.config.target_layer_ids)
    eos = generation_config._eos_token_tensor
    pad = generation_config._pad_token_tensor
    pad = int(pad) if pad is not None else (int(eos.flatten()[0]) if eos is not None else 0)
    max_new = generation_config.max_length - prompt_len
    copy_match, copy_tokens = resolve_copy_mode(lookup_copy_match, lookup_copy_tokens, do_sample, bool(lookup_tokens))
    per_match = resolve_lookup_tokens_per_match(lookup_tokens_per_match, bool(lookup_tokens))
    min_match = resolve_lookup_min_match(lookup_min_match, bool(lookup_tokens))
    lookup_rule = LOOKUP_RULES[prompt_lookup_rule]
    stats = BeagleGenerationStats()
    beagle.generation_stats = stats

    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kv_valid = attention_mask.bool()
    first_valid = attention_mask.long().argmax(-1).tolist()  # the first prompt token of each left-padded row
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    rows_seq = [input_ids[b] for b in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    num_new = [0] * batch

    def processed(b: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[None].float()
        if len(logits_processor) > 0:
            # Rows advance by different numbers of tokens, so each is processed on its own, as row b of a batch made
            # of copies of it: processors built for the whole batch (one prompt padding length per row for
            # repetition_penalty, prefix_allowed_tokens_fn's batch_id) read row b's settings.
            logits = logits_processor(rows_seq[b][None].repeat(batch, 1), logits.repeat(batch, 1))[b : b + 1]
        return logits[0]

    def choose(b: int, logits: torch.Tensor) -> int:
        logits = processed(b, logits)
        if do_sample:
            return int(sample_categorical(logits.softmax(-1)))
        return int(logits.argmax(-1))

    def choose_among_sampled(b: int, logits: torch.Tensor, node: int) -> int:
        """The target's token at `node`: its sampled children first (recursive rejection sampling against the draft
        distribution they were drawn from), then a draw from the residual, which a fixed (lookup) child may match."""
        p = processed(b, logits).softmax(-1)
        children = ((tree_parents[b] == node) & (ranks[b] >= 0)).nonzero().flatten()
        if children.numel() == 0:  # a leaf, or a node of the lookup branch
            return int(sample_categorical(p))
        children = children[ranks[b, children].argsort()].tolist()
        q = dists[b, node]
        if beagle.draft_to_target is not None:
            q = q.new_zeros(p.shape[-1]).index_copy_(0, beagle.draft_to_target.to(q.device), q)
        token, _ = recursive_rejection_sample(p, q, [int(inputs[b, c]) for c in children])
        return token

    def emit(b: int, token: int) -> None:
        rows_seq[b] = torch.cat([rows_seq[b], torch.tensor([token], device=device)])
        num_new[b] += 1
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        stop = num_new[b] >= max_new or (eos is not None and bool((eos == token).any()))
        if not stop and len(stopping_criteria) > 0:
            stop = bool(stopping_criteria(rows_seq[b][None], None).any())
        if stop:
            done[b] = True

    # Prefill: the target reads the prompts; Beagle only projects their states (no draft forward).
    started = time.perf_counter()
    # Only the last position's logits are read (as plain `generate` does): a prompt's full logits would cost a head
    # matmul and a (prompt x vocabulary) tensor for nothing.
    last_only = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                **cache_kwargs(model, cache), use_cache=True, output_hidden_states=layer_ids, **last_only)
    if not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
        raise BeagleGenerationError("the target's cache expected full-attention DynamicCache layers, found "
                                    f"{sorted({type(l).__name__ for l in cache.layers})} (sliding-window caches cannot "
                                    "keep a tree's accepted path).")
    roots = torch.empty(batch, dtype=torch.long, device=device)
    for b in range(batch):
        roots[b] = choose(b, out.logits[b, -1])
        emit(b, int(roots[b]))
    beagle_cache = beagle.new_draft_cache()
    beagle.append_context(beagle_cache, target_states(out, layer_ids), positions, kv_valid,
                          next_ids=torch.cat([input_ids[:, 1:], roots[:, None]], dim=1))
    root_positions = positions[:, -1] + 1
    stats.verify_time_s += time.perf_counter() - started

    while not bool(done.all()):
        # 1. Draft.
        started = time.perf_counter()
        proposals, copying = None, False
        if lookup_tokens:
            # each row's match (end position, length); copy mode when every unfinished row's is long enough
            found = [((-1, 0) if done[b] else lookup_rule.match(rows_seq[b][first_valid[b]:], max_ngram))
                     for b in range(batch)]
            copying = bool(copy_match) and all(done[b] or (found[b][1] >= copy_match and max_new - num_new[b] > 1)
                                               for b in range(batch))

            def branch(b: int, num: int) -> list[int]:
                if done[b] or found[b][0] < 0 or found[b][1] < min_match:
                    return []
                return lookup_rule.continuation(rows_seq[b][first_valid[b]:], found[b][0],
                                                min(num, max_new - num_new[b] - 1))

            # a row's branch: the copy length, or the lookup length (at most `per_match` per matched token). A copy
            # round verifies nothing but its branches, so it needs one for every unfinished row: where a row has none
            # (its match is below `lookup_min_match`, or the rule continues it by no token) the round drafts instead
            if copying:
                proposals = [branch(b, copy_tokens) for b in range(batch)]
                copying = all(done[b] or proposals[b] for b in range(batch))
            if not copying:
                proposals = [branch(b, min(lookup_tokens, (per_match or lookup_tokens) * found[b][1]))
                             for b in range(batch)]
        if copying:
            stats.copy_rounds += 1
            tokens = parents = depths = ranks = torch.empty(batch, 0, dtype=torch.long, device=device)
        elif sampled_drafts:
            tokens, parents, depths, ranks, dists = draft_sampled_tree(beagle, beagle_cache, roots, root_positions,
                                                                       shape, draft_temperature)
        else:
            tokens, parents, depths = draft_tree(beagle, beagle_cache, roots, root_positions, shape)
        beagle_cache.discard_drafts()
        from_lookup = None
        if lookup_tokens:
            tokens, parents, depths, from_lookup = add_lookup_branch(tokens, parents, depths, proposals)
        if sampled_drafts:  # lookup nodes (and the walk's root) are fixed, not drawn: rank -1
            ranks = F.pad(ranks, (1, tokens.shape[1] - ranks.shape[1]), value=-1)
        drafted_depth = int(depths.max())
        drafted_at = time.perf_counter()
        stats.draft_time_s += drafted_at - started

        # 2. Verify [root; nodes] in one forward with the tree mask over the cached prefix.
        num_nodes = tokens.shape[1]
        inputs = torch.cat([roots[:, None], tokens], dim=1)
        tree_parents = torch.cat([torch.full((batch, 1), -1, device=device, dtype=torch.long),
                                  torch.where(parents >= 0, parents + 1, 0)], dim=1)
        allowed = torch.cat([kv_valid[:, None, :].expand(-1, num_nodes + 1, -1), tree_ancestor_mask(tree_parents)], -1)
        past = kv_valid.shape[1]
        out = model(input_ids=inputs, position_ids=root_positions[:, None] + F.pad(depths, (1, 0)),
                    attention_mask=to_attention_mask(allowed, model.config._attn_implementation, model.dtype),
                    **cache_kwargs(model, cache), use_cache=True, output_hidden_states=layer_ids)

        # 3. Accept: walk down from the root taking the target's own choice at every node.
        paths = [[0] for _ in range(batch)]
        for b in range(batch):
            if done[b]:
                continue
            node = 0
            while True:
                if sampled_drafts:
                    token = choose_among_sampled(b, out.logits[b, node], node)
                else:
                    token = choose(b, out.logits[b, node])
                emit(b, token)
                match = ((tree_parents[b] == node) & (inputs[b] == token)).nonzero()
                if done[b] or match.numel() == 0:
                    roots[b] = token
                    break
                node = int(match[0, 0])
                paths[b].append(node)
            stats.drafted.append(drafted_depth)
            stats.accepted.append(len(paths[b]) - 1)
            if from_lookup is not None:
                stats.accepted_from_lookup.append(int(from_lookup[b, [n - 1 for n in paths[b][1:]]].sum()))

        # 4. Keep only the accepted paths in both caches.
        lengths = torch.tensor([len(p) for p in paths], device=device)
        width = int(lengths.max())
        index = torch.tensor([p + [p[-1]] * (width - len(p)) for p in paths], device=device)
        _keep_cache_rows(cache, past, index)
        path_valid = torch.arange(width, device=device)[None] < lengths[:, None]
        kv_valid = torch.cat([kv_valid, path_valid], dim=1)
        states = target_states(out, layer_ids)
        states = states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))
        # each accepted state is followed by the next node on its path, the last one by the new root (bonus token)
        next_ids = torch.cat([inputs.gather(1, index)[:, 1:], roots[:, None]], dim=1)
        next_ids = next_ids.scatter(1, (lengths - 1)[:, None], roots[:, None])
        beagle.append_context(beagle_cache, states, root_positions[:, None] + torch.arange(width, device=device),
                              path_valid, next_ids=next_ids)
        root_positions = root_positions + lengths
        stats.verify_time_s += time.perf_counter() - drafted_at

    if streamer is not None:
        streamer.end()
    longest = max(seq.shape[0] for seq in rows_seq)
    if not bool(kv_valid[:, prompt_len:].all()):
        _compact_cache(cache, kv_valid, prompt_len, longest - 1)
    sequences = torch.full((batch, longest), pad, dtype=input_ids.dtype, device=device)
    for b, seq in enumerate(rows_seq):
        sequences[b, : seq.shape[0]] = seq
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, **cache_kwargs(GenerateDecoderOnlyOutput, cache))
    return sequences


def generate_with_own_loop(target, beagle, *args, **kwargs):
    """`target.generate(*args, **kwargs)` through Beagle's own loop (`beagle_generate`): what a checkpoint's
    `custom_generate/generate.py` runs. transformers hands a `custom_generate` callable only the arguments it does not
    know itself, and builds stop strings' criterion from a tokenizer it then no longer has: the streamer goes on as
    `beagle_streamer`, and the stop strings transformers would use (the call's, else the passed `generation_config`'s,
    else the target's saved `generation_config`'s) become a `StopStringCriteria` built here with `tokenizer`, which the
    loop checks after every token."""
    streamer = kwargs.pop("streamer", None)
    tokenizer = kwargs.pop("tokenizer", None)
    config = kwargs.get("generation_config")
    saved = getattr(getattr(target, "generation_config", None), "stop_strings", None)
    if "stop_strings" in kwargs:
        stop_strings = kwargs.pop("stop_strings")
    else:
        stop_strings = getattr(config, "stop_strings", None) or saved
    if getattr(config, "stop_strings", None) is not None:
        kwargs["generation_config"] = config = copy.deepcopy(config)
        config.stop_strings = None
    if saved is not None:
        # transformers fills a setting left unset by the call from the target's saved config: only the call clears it
        kwargs["stop_strings"] = None
    if stop_strings:
        if tokenizer is None:
            raise BeagleGenerationError(f"`stop_strings` ({stop_strings!r}) expected the target's tokenizer as "
                                        "`tokenizer=`, found none.")
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
        kwargs["stopping_criteria"] = criteria
    return target.generate(*args, custom_generate=beagle_generate, beagle=beagle, streamer=streamer,
                           beagle_streamer=streamer, **kwargs)
