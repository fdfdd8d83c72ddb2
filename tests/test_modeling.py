"""The Beagle block: masks, attention backends, the cache, target families."""

import pytest
import torch
from conftest import FAMILIES, make_target, target_states

from modeling_beagle import (
    BeagleCache,
    BeagleConfig,
    BeagleModel,
    context_causal_mask,
    tree_ancestor_mask,
)


def make_beagle(target, **overrides):
    torch.manual_seed(7)
    beagle = BeagleModel.from_target(target, **overrides).eval()
    # Random (not zero-initialised) parameters so every path is exercised with non-trivial values.
    with torch.no_grad():
        for p in beagle.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return beagle


@pytest.mark.parametrize("recency_bias, query_newest_state", [(False, False), (True, False), (False, True)],
                         ids=["plain", "recency", "newest-state"])
@pytest.mark.parametrize("null_kv_slot", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_no_leakage(llama_target, null_kv_slot, attn, recency_bias, query_newest_state):
    """Changing a true state at j >= p leaves the output at p unchanged; changing one at j < p changes it."""
    beagle = make_beagle(llama_target, null_kv_slot=null_kv_slot, attn_implementation=attn, recency_bias=recency_bias,
                         query_newest_state=query_newest_state)
    ids = torch.randint(0, 96, (1, 12))
    h = target_states(llama_target, ids)
    base = beagle(input_ids=ids, context_states=h).last_hidden_state
    assert torch.isfinite(base).all()
    for j in range(12):
        h2 = h.clone()
        h2[:, j] += torch.randn_like(h2[:, j])
        out = beagle(input_ids=ids, context_states=h2).last_hidden_state
        for p in range(12):
            changed = not torch.equal(out[:, p], base[:, p])
            assert changed == (j < p), f"state {j} {'leaked into' if changed else 'did not reach'} query {p}"


def random_mask(batch, q, k, generator):
    mask = torch.rand(batch, q, k, generator=generator) < 0.5
    mask[:, 0] = False  # the empty first row
    mask[:, -1] = True  # a full row
    return mask


@pytest.mark.parametrize("recency_bias", [False, True])
@pytest.mark.parametrize("null_kv_slot", [True, False])
def test_eager_matches_sdpa_with_random_masks(llama_target, null_kv_slot, recency_bias):
    beagle = make_beagle(llama_target, null_kv_slot=null_kv_slot, recency_bias=recency_bias)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (3, 9), generator=g)
    h = target_states(llama_target, ids)
    d = torch.randn(3, 9, 64, generator=g)
    mask = random_mask(3, 9, 18, g)
    outs = {}
    for attn in ("eager", "sdpa"):
        beagle.set_attn_implementation(attn)
        out = beagle(input_ids=ids, context_states=h, draft_states=d,
                     draft_position_ids=torch.arange(9).expand(3, -1), attention_mask=mask)
        assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.logits).all()
        outs[attn] = out.last_hidden_state
    rel = (outs["eager"] - outs["sdpa"]).norm() / outs["eager"].norm()
    assert rel < 1e-5
    if not null_kv_slot:
        # A row that reads nothing gets no attention output: z = x + MLP(norm(x)), identical for any context.
        other = beagle(input_ids=ids, context_states=torch.randn_like(h), draft_states=d,
                       draft_position_ids=torch.arange(9).expand(3, -1), attention_mask=mask).last_hidden_state
        assert torch.equal(other[:, 0], outs["sdpa"][:, 0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_recency_bias_penalises_distance_from_the_most_recent_state(llama_target, attn):
    """recency_bias adds -slope_h * (p - 1 - j) to head h's score of the state at j: with zero slopes the draft is
    the unbiased one (same weights); with steep slopes query p reads (almost) only the state at p - 1."""
    plain = make_beagle(llama_target, attn_implementation=attn)
    biased = BeagleModel.from_target(llama_target, attn_implementation=attn, recency_bias=True).eval()
    biased.load_state_dict({**biased.state_dict(), **plain.state_dict()})  # the same weights, plus the slopes
    ids = torch.randint(0, 96, (2, 12))
    h = target_states(llama_target, ids)
    with torch.no_grad():
        biased.block.cross_attn.recency_slopes.zero_()
    torch.testing.assert_close(biased(input_ids=ids, context_states=h).last_hidden_state,
                               plain(input_ids=ids, context_states=h).last_hidden_state, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        biased.block.cross_attn.recency_slopes.fill_(60.0)
    base = biased(input_ids=ids, context_states=h).last_hidden_state
    p = 9
    for j, expect_change in ((p - 1, True), (p - 2, False), (2, False)):
        h2 = h.clone()
        h2[:, j] += 3 * torch.randn_like(h2[:, j])
        out = biased(input_ids=ids, context_states=h2).last_hidden_state[:, p]
        assert (not torch.allclose(out, base[:, p], atol=1e-4)) == expect_change, j


def test_recency_bias_refuses_flash_kernels():
    from modeling_beagle.masking_beagle import to_attention_mask

    allowed = torch.ones(1, 2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot add Beagle's recency bias"):
        to_attention_mask(allowed, "flash_attention_2", torch.float32, bias=torch.zeros(1, 4, 2, 3))


def test_first_row_without_context_is_finite(llama_target):
    for null_kv_slot in (True, False):
        beagle = make_beagle(llama_target, null_kv_slot=null_kv_slot)
        out = beagle(input_ids=torch.tensor([[5]]), position_ids=torch.tensor([[0]]))
        assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("recency_bias, query_newest_state", [(False, False), (True, False), (False, True)],
                         ids=["plain", "recency", "newest-state"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_step_by_step_equals_full_forward(llama_target, attn, recency_bias, query_newest_state):
    beagle = make_beagle(llama_target, attn_implementation=attn, recency_bias=recency_bias,
                         query_newest_state=query_newest_state)
    ids = torch.randint(0, 96, (2, 10))
    h = target_states(llama_target, ids)
    full = beagle(input_ids=ids, context_states=h)
    cache = BeagleCache()
    beagle.append_context(cache, h[:, :3], torch.arange(3).expand(2, -1))  # prefill: projection only
    for p in range(3, 10):
        step = beagle(input_ids=ids[:, p : p + 1], position_ids=torch.full((2, 1), p), past_key_values=cache)
        torch.testing.assert_close(step.last_hidden_state[:, 0], full.last_hidden_state[:, p], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.logits[:, 0], full.logits[:, p], rtol=1e-5, atol=1e-5)
        beagle.append_context(cache, h[:, p : p + 1], torch.full((2, 1), p))
    assert cache.num_true == 10 and cache.num_draft == 0


@pytest.mark.parametrize("variant", [{}, {"query_newest_state": True}, {"context_next_token": True}],
                         ids=["plain", "newest-state", "next-token"])
def test_cached_draft_chain_equals_full_forward_with_draft_states(llama_target, variant):
    """A draft round with lazily appended draft states equals one uncached forward over [true; draft] keys."""
    beagle = make_beagle(llama_target, **variant)
    ids = torch.randint(0, 96, (1, 9))
    n = 5  # true states h_0..h_4; draft round starts at position 5
    h = target_states(llama_target, ids)[:, :n]
    cache = BeagleCache()
    beagle.append_context(cache, h, torch.arange(n)[None], next_ids=ids[:, 1 : n + 1])
    states, steps = [], []
    for d in range(4):
        pos = n + d
        kwargs = {}
        if d > 0:
            kwargs = dict(draft_states=states[-1], draft_position_ids=torch.tensor([[pos - 1]]),
                          draft_next_ids=ids[:, pos : pos + 1])
        out = beagle(input_ids=ids[:, pos : pos + 1], position_ids=torch.tensor([[pos]]), past_key_values=cache, **kwargs)
        states.append(out.last_hidden_state)
        steps.append(out.last_hidden_state)
    assert cache.num_draft == 3
    cache.discard_drafts()
    assert cache.num_draft == 0 and cache.length == n
    # Uncached: query positions n..n+3 over [h_0..h_4 ; ĥ_n..ĥ_{n+2}] with the position-causal rule.
    drafts = torch.cat(states[:3], dim=1)
    full = beagle(input_ids=ids[:, n : n + 4], position_ids=torch.arange(n, n + 4)[None], context_states=h,
                  context_next_ids=ids[:, 1 : n + 1], draft_states=drafts, draft_position_ids=torch.arange(n, n + 3)[None],
                  draft_next_ids=ids[:, n + 1 : n + 4])
    torch.testing.assert_close(full.last_hidden_state, torch.cat(steps, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_context_next_token_reads_each_state_with_the_token_that_followed_it(llama_target, attn):
    """`context_next_token`: the query at p reads the tokens t_1..t_p (each with the state before it) and no later
    token; the projection starts at zero (the paper's block); the forward refuses states without their tokens."""
    from trainer.objectives import next_token_ids

    plain = BeagleModel.from_target(llama_target).eval()
    fused = BeagleModel.from_target(llama_target, context_next_token=True).eval()
    assert torch.equal(fused.block.next_token_proj.weight, torch.zeros(64, 64))
    ids = torch.randint(0, 96, (1, 12))
    h = target_states(llama_target, ids)
    next_ids = next_token_ids(ids)
    fused.load_state_dict({**plain.state_dict(), "block.next_token_proj.weight": torch.zeros(64, 64)})
    torch.testing.assert_close(fused(input_ids=ids, context_states=h, context_next_ids=next_ids).last_hidden_state,
                               plain(input_ids=ids, context_states=h).last_hidden_state)
    beagle = make_beagle(llama_target, attn_implementation=attn, context_next_token=True)
    base = beagle(input_ids=ids, context_states=h, context_next_ids=next_ids).last_hidden_state
    for k in range(12):
        other = ids.clone()
        other[0, k] = (other[0, k] + 1) % 96
        out = beagle(input_ids=other, context_states=h, context_next_ids=next_token_ids(other)).last_hidden_state
        for p in range(12):
            changed = not torch.equal(out[:, p], base[:, p])
            assert changed == (k == p or 1 <= k < p), f"token {k} {'reached' if changed else 'did not reach'} query {p}"
    with pytest.raises(ValueError, match="context_next_ids"):
        beagle(input_ids=ids, context_states=h)
    with pytest.raises(ValueError, match="draft_next_ids"):
        beagle(input_ids=ids, context_states=h, context_next_ids=next_ids, draft_states=h,
               draft_position_ids=torch.arange(12)[None])


def test_query_newest_state_adds_the_newest_readable_state():
    """`query_newest_state`: each query adds the features of its readable key at the highest position (true or
    draft), nothing when it may read none; the cache refuses to mix appends with and without features."""
    from modeling_beagle.modeling_beagle import newest_state_features

    features = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1).expand(-1, -1, 3)
    positions = torch.tensor([[0, 1, 2, 2, 3], [4, 0, 1, 2, 3]])
    allowed = torch.tensor([[[True, True, False, False, False],    # newest readable: position 1 (slot 1)
                             [True, False, False, True, False],    # position 2 in slot 3 (a draft slot)
                             [False, False, False, False, False]],  # nothing readable: zero
                            [[True, True, True, True, True],        # position 4 in slot 0
                             [False, True, True, False, False],     # position 1 in slot 2
                             [False, True, False, False, False]]])
    picked = newest_state_features(features, allowed, positions)
    assert picked[..., 0].tolist() == [[1.0, 3.0, 0.0], [5.0, 7.0, 6.0]]
    target = make_target("llama")
    beagle = BeagleModel.from_target(target, query_newest_state=True)
    assert beagle.block.state_proj is not None and BeagleModel.from_target(target).block.state_proj is None
    cache = BeagleCache()
    beagle.append_context(cache, torch.randn(1, 3, 64), torch.arange(3)[None])
    assert cache.features.shape == (1, 3, 64)
    keys, values, _ = beagle.project_context(torch.randn(1, 1, 64), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="features"):
        cache.append(keys, values, torch.tensor([[3]]))


def test_cache_refuses_true_states_while_drafts_are_cached(llama_target):
    beagle = make_beagle(llama_target)
    cache = BeagleCache()
    beagle.append_context(cache, torch.randn(1, 2, 64), torch.arange(2)[None])
    beagle.append_context(cache, torch.randn(1, 1, 64), torch.tensor([[2]]), draft=True)
    with pytest.raises(RuntimeError, match="discard_drafts"):
        beagle.append_context(cache, torch.randn(1, 1, 64), torch.tensor([[2]]))


def test_padded_batch_matches_unpadded_rows(llama_target):
    """Left-padded context (invalid slots) gives each row the same output as running it alone."""
    beagle = make_beagle(llama_target)
    a = torch.randint(0, 96, (1, 7))
    b = torch.randint(0, 96, (1, 4))
    ha, hb = target_states(llama_target, a), target_states(llama_target, b)
    cache = BeagleCache()
    states = torch.cat([ha[:, :6], torch.cat([torch.zeros(1, 3, 64), hb[:, :3]], dim=1)])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]])
    valid = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    beagle.append_context(cache, states, positions, valid)
    out = beagle(input_ids=torch.tensor([[a[0, 6]], [b[0, 3]]]), position_ids=torch.tensor([[6], [3]]),
                 past_key_values=cache)
    ref_a = beagle(input_ids=a, context_states=ha).last_hidden_state[:, 6]
    ref_b = beagle(input_ids=b, context_states=hb).last_hidden_state[:, 3]
    torch.testing.assert_close(out.last_hidden_state[0, 0], ref_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state[1, 0], ref_b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_from_target_families(family):
    target = make_target(family)
    beagle = BeagleModel.from_target(target).eval()
    cfg = target.config
    assert beagle.config.hidden_size == cfg.hidden_size
    assert beagle.config.num_key_value_heads == cfg.num_key_value_heads
    assert beagle.config.vocab_size == cfg.vocab_size
    assert beagle.config.target_model_type == cfg.model_type
    attn = target.model.layers[0].self_attn
    assert beagle.config.attention_bias == (attn.q_proj.bias is not None)
    assert (beagle.block.cross_attn.q_proj.bias is not None) == (attn.q_proj.bias is not None)
    ids = torch.randint(0, 96, (2, 8))
    out = beagle(input_ids=ids, context_states=target_states(target, ids))
    assert out.logits.shape == (2, 8, 96) and torch.isfinite(out.logits).all()
    # Shared by reference: the target's modules, not copies, and none of them saved with Beagle.
    assert beagle.get_input_embeddings() is target.get_input_embeddings()
    assert not any(k.startswith(("embed", "lm_head")) for k in beagle.state_dict())
    assert not any(p.data_ptr() == target.get_input_embeddings().weight.data_ptr() for p in beagle.parameters())


def test_qwen2_target_has_attention_bias():
    beagle = BeagleModel.from_target(make_target("qwen2"))
    assert beagle.config.attention_bias is True


def test_logits_use_the_target_head(llama_target):
    beagle = make_beagle(llama_target)
    ids = torch.randint(0, 96, (1, 5))
    out = beagle(input_ids=ids, context_states=target_states(llama_target, ids))
    torch.testing.assert_close(out.logits, llama_target.lm_head(out.last_hidden_state))


def test_multi_layer_features(llama_target):
    beagle = make_beagle(llama_target, target_layer_ids=[0, 1, -1])
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        hs = llama_target(ids, output_hidden_states=True).hidden_states
    feats = torch.cat([hs[i] for i in (0, 1, -1)], dim=-1)
    out = beagle(input_ids=ids, context_states=feats)
    assert out.logits.shape == (1, 6, 96)
    with pytest.raises(ValueError, match="context_states"):
        beagle(input_ids=ids, context_states=hs[-1])


def test_reduced_draft_vocabulary(llama_target):
    beagle = make_beagle(llama_target, draft_vocab_size=32)
    d2t = torch.randperm(96)[:32]
    beagle.set_draft_vocabulary(d2t)
    ids = torch.randint(0, 96, (1, 6))
    out = beagle(input_ids=ids, context_states=target_states(llama_target, ids))
    full = llama_target.lm_head(out.last_hidden_state)
    torch.testing.assert_close(out.logits, full[..., d2t])


def test_gradients_reach_the_block_but_not_the_target(llama_target):
    beagle = BeagleModel.from_target(llama_target, attn_implementation="eager").train()
    beagle.activation_checkpointing_enable()
    ids = torch.randint(0, 96, (2, 8))
    out = beagle(input_ids=ids, context_states=target_states(llama_target, ids))
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in beagle.parameters() if p.requires_grad)
    assert llama_target.lm_head.weight.grad is None and not llama_target.lm_head.weight.requires_grad


@pytest.mark.parametrize("null_kv_slot", [True, False])
def test_recency_slope_gradient_matches_eager(llama_target, null_kv_slot):
    """With trainable slopes, sdpa (the bias inside its float mask) and eager (the bias added to the scores) must give
    the same output and the same gradient for every parameter, slopes included, on random masks over true and draft
    states (an empty row, a full row)."""
    beagle = make_beagle(llama_target, null_kv_slot=null_kv_slot, recency_bias=True, noise_scale=0.0).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 9), generator=g)
    h = target_states(llama_target, ids)
    d = torch.randn(3, 9, 64, generator=g)
    mask = random_mask(3, 9, 18, g)
    outs, grads = {}, {}
    for attn in ("eager", "sdpa"):
        beagle.set_attn_implementation(attn)
        beagle.zero_grad()
        out = beagle(input_ids=ids, context_states=h, draft_states=d, draft_position_ids=torch.arange(9).expand(3, -1),
                     attention_mask=mask)
        (out.logits.float().logsumexp(-1).mean() + out.last_hidden_state.square().mean()).backward()
        outs[attn] = out.last_hidden_state.detach()
        grads[attn] = {n: p.grad.clone() for n, p in beagle.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outs["sdpa"], outs["eager"], rtol=1e-5, atol=1e-5)
    assert grads["eager"]["block.cross_attn.recency_slopes"].abs().min() > 0
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_same_code_path(llama_target):
    beagle = make_beagle(llama_target)
    ids = torch.randint(0, 96, (1, 6))
    h = target_states(llama_target, ids)
    ref = beagle(input_ids=ids, context_states=h).last_hidden_state
    beagle_bf16 = beagle.to(torch.bfloat16)
    out = beagle_bf16(input_ids=ids, context_states=h.bfloat16()).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_tree_ancestor_mask_matches_brute_force():
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, -1], [-1, -1, 0, 1, 2, 3, 4, 5]])
    mask = tree_ancestor_mask(parents)
    for b in range(2):
        for i in range(8):
            ancestors, node = {i}, i
            while parents[b, node] >= 0:
                node = int(parents[b, node])
                ancestors.add(node)
            assert {a for a in range(8) if mask[b, i, a]} == ancestors


def test_context_causal_mask_is_strict():
    q = torch.tensor([[0, 3]])
    k = torch.arange(5)[None]
    assert context_causal_mask(q, k).tolist() == [[[False] * 5, [True, True, True, False, False]]]


def test_config_defaults_follow_method_md():
    cfg = BeagleConfig()
    assert cfg.target_layer_ids == [-1]
    assert cfg.final_norm is False and cfg.norm_kv is True
    assert cfg.noise_type == "uniform" and cfg.noise_scale == 0.2
    assert cfg.grad_through_draft_states is False and cfg.draft_vocab_size is None
    assert cfg.offset_range is None and cfg.effective_offset_range == cfg.stage1_window
    assert cfg.smooth_l1_weight == 10.0 and cfg.stage2_steps == 4
