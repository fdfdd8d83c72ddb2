"""Beagle's own decoding loop (custom_generate): draft trees, batches, losslessness, tree verification."""

import collections
import io
from contextlib import redirect_stdout

import pytest
import torch
from conftest import briefly_train, make_target, trained_pair
from test_generation import _chi_square_p_value, _exact_joint_of_tokens_2_and_3, tiny_tokenizer
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from modeling_beagle import (
    BeagleCache,
    BeagleGenerationError,
    BeagleModel,
    TreeShape,
    beagle_generate,
    draft_sampled_tree,
    draft_tree,
    recursive_rejection_sample,
)
from modeling_beagle.decoding_beagle import (
    _keep_cache_rows,
    add_lookup_branch,
    auto_tree_shape,
    measure_verification_cost,
    prompt_lookup,
    tree_shape_for_costs,
    verification_cost_samples,
)
from modeling_beagle.generation_beagle import cache_kwargs, gumbel_noise, sample_categorical
from modeling_beagle.masking_beagle import to_attention_mask, tree_ancestor_mask

SHAPES = ["chain", TreeShape(depth=4, top_k=3, total_tokens=10), TreeShape(depth=3, top_k=2, total_tokens=6),
          TreeShape(depth=6, top_k=4, total_tokens=24), TreeShape(depth=1, top_k=1, total_tokens=1),
          TreeShape(depth=5, top_k=3, total_tokens=12, min_prob=0.05)]


def spec(target, beagle, ids, shape, **kwargs):
    return target.generate(ids, custom_generate=beagle_generate, beagle=beagle, tree_shape=shape, **kwargs)


def test_greedy_identity_trees_and_chains_over_many_prompts():
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(21)
    accepted = 0
    for i in range(60):
        shape = SHAPES[i % len(SHAPES)]
        ids = torch.randint(3, 96, (1, int(torch.randint(1, 20, (1,), generator=g))), generator=g)
        new = int(torch.randint(1, 40, (1,), generator=g))
        ref = target.generate(ids, do_sample=False, max_new_tokens=new)
        out = spec(target, beagle, ids, shape, do_sample=False, max_new_tokens=new)
        assert torch.equal(out, ref), f"prompt {i} with {shape}: output differs from plain greedy"
        accepted += sum(beagle.generation_stats.accepted)
    assert accepted > 100


def test_greedy_identity_with_masked_gqa_sdpa(monkeypatch):
    """transformers' TRANSFORMERS_SDPA_FORCE_GQA=1 (the README's CPU tip: masked verification forwards use the sdpa
    kernel's grouped-query attention instead of repeating key/value heads) keeps the tree loop lossless, for single
    prompts and for padded batches, whose masks also hide padding."""
    target, beagle = trained_pair()
    assert target.config._attn_implementation == "sdpa"
    assert target.config.num_key_value_heads < target.config.num_attention_heads  # grouped-query attention
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    sdpa, masked_gqa_calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording_sdpa(*args, **kwargs):
        masked_gqa_calls.append(bool(kwargs.get("enable_gqa")) and kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    g = torch.Generator().manual_seed(8)
    accepted = 0
    for i in range(12):
        shape = SHAPES[i % len(SHAPES)]
        if i % 2:
            ids, mask = padded_batch(g, 3)
        else:
            ids = torch.randint(3, 96, (1, int(torch.randint(2, 20, (1,), generator=g))), generator=g)
            mask = torch.ones_like(ids)
        new = int(torch.randint(5, 30, (1,), generator=g))
        ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new)
        out = spec(target, beagle, ids, shape, attention_mask=mask, do_sample=False, max_new_tokens=new,
                   prompt_lookup_num_tokens=4)
        assert torch.equal(out, ref), f"case {i} with {shape}: output differs from plain greedy under masked GQA"
        accepted += sum(beagle.generation_stats.accepted)
    assert accepted > 20
    assert sum(masked_gqa_calls) > 100  # the verification forwards did take the masked GQA kernel path


def padded_batch(g, batch, vocab=96, pad=0):
    lengths = torch.randint(1, 14, (batch,), generator=g)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        ids[b, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("shape", ["chain", TreeShape(depth=4, top_k=3, total_tokens=10),
                                   TreeShape(depth=4, top_k=3, total_tokens=10, min_prob=0.1)],
                         ids=["chain", "tree", "pruned-tree"])
def test_greedy_identity_batches_of_mixed_lengths(shape):
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(4)
    per_round_differs = False
    for _ in range(8):
        ids, mask = padded_batch(g, int(torch.randint(2, 6, (1,), generator=g)))
        new = int(torch.randint(5, 30, (1,), generator=g))
        ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new)
        out = spec(target, beagle, ids, shape, attention_mask=mask, do_sample=False, max_new_tokens=new)
        assert torch.equal(out, ref)
        # rows accepted different numbers of tokens in the same round
        rows = ids.shape[0]
        accepted = torch.tensor(beagle.generation_stats.accepted[: rows * (len(beagle.generation_stats.accepted) // rows)])
        per_round_differs |= bool((accepted.view(-1, rows).max(1).values != accepted.view(-1, rows).min(1).values).any())
    assert per_round_differs


def test_prefill_computes_the_head_only_at_each_rows_last_position():
    """The prompt's logits before the last position are never read: the prefill asks the target for the last one only
    (`logits_to_keep=1`, as plain `generate` does), and the padded batch's output is still plain greedy's."""
    target, beagle = trained_pair()
    ids, mask = padded_batch(torch.Generator().manual_seed(9), 3)
    rows_seen = []
    head = target.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[:2]))
    try:
        out = spec(target, beagle, ids, TreeShape(depth=3, top_k=2, total_tokens=6), attention_mask=mask,
                   do_sample=False, max_new_tokens=12)
    finally:
        hook.remove()
    assert ids.shape[1] > 1 and rows_seen[0] == (ids.shape[0], 1)  # the first head call is the prefill's
    assert torch.equal(out, target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12))


def test_greedy_identity_batches_with_eos_inside_drafts():
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(8)
    for _ in range(6):
        ids, mask = padded_batch(g, 3)
        free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, eos_token_id=None)
        eos = int(free[0, ids.shape[1] + int(torch.randint(2, 25, (1,), generator=g))])
        for shape in ("chain", TreeShape(depth=5, top_k=2, total_tokens=8)):
            kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
            assert torch.equal(spec(target, beagle, ids, shape, **kwargs), target.generate(ids, **kwargs))


def test_batches_with_row_dependent_processors_and_the_returned_cache():
    """In a batch, processors built for the whole batch read each row's own settings (repetition_penalty's prompt
    padding length per row, prefix_allowed_tokens_fn's batch_id); guidance is refused; the returned cache is laid out
    as plain generate's, so a later call continuing from it gives plain generate's continuation."""
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(11)
    shape = TreeShape(depth=4, top_k=2, total_tokens=8)
    seen = set()

    def allowed(batch_id, sentence):
        seen.add(batch_id)
        return list(range(3, 50)) if batch_id % 2 == 0 else list(range(40, 96))

    for _ in range(4):
        ids, mask = padded_batch(g, 3)
        for kwargs in (dict(repetition_penalty=1.3), dict(prefix_allowed_tokens_fn=allowed)):
            ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, **kwargs)
            seen.clear()
            out = spec(target, beagle, ids, shape, attention_mask=mask, do_sample=False, max_new_tokens=12, **kwargs)
            assert torch.equal(out, ref), kwargs
            assert "prefix_allowed_tokens_fn" not in kwargs or seen == {0, 1, 2}
        ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
        out = spec(target, beagle, ids, shape, attention_mask=mask, do_sample=False, max_new_tokens=12,
                   return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref.sequences)
        assert out.past_key_values.get_seq_length() == ref.past_key_values.get_seq_length()
        more = torch.cat([ref.sequences, torch.randint(3, 96, (3, 2), generator=g)], dim=1)
        # a row that ended early is padded after its end (the pad slots' states are not the same): masked out
        more_mask = torch.cat([mask, (more[:, mask.shape[1] :] != 0).long()], dim=1)
        continued = [target.generate(more, attention_mask=more_mask, do_sample=False, max_new_tokens=6, cache=cache)
                     for cache in (ref.past_key_values, out.past_key_values)]
        assert torch.equal(continued[0], continued[1])
    with pytest.raises(BeagleGenerationError, match="`guidance_scale` expected batch size 1"):
        spec(target, beagle, ids, shape, attention_mask=mask, do_sample=False, max_new_tokens=4, guidance_scale=1.5)


def test_greedy_identity_with_classifier_free_guidance():
    """Classifier-free guidance's processor runs the target on its own cache, one new token per call: the own loop
    calls it once per emitted token, so it stays exact (the assisted path refuses it: test_generation)."""
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(8)
    accepted = 0
    for _ in range(6):
        ids = torch.randint(1, 96, (1, int(torch.randint(2, 10, (1,), generator=g))), generator=g)
        ref = target.generate(ids, do_sample=False, max_new_tokens=30, guidance_scale=1.8)
        for shape in ("chain", TreeShape(depth=4, top_k=2, total_tokens=8)):
            out = spec(target, beagle, ids, shape, do_sample=False, max_new_tokens=30, guidance_scale=1.8,
                       prompt_lookup_num_tokens=5)
            assert torch.equal(out, ref), shape
            accepted += sum(beagle.generation_stats.accepted)
    assert accepted > 30


def test_greedy_identity_with_processors_streamer_and_dict_output():
    target, beagle = trained_pair()
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([[5, 17, 33, 8]])
    texts = []
    for use_beagle in (False, True):
        buffer = io.StringIO()
        streamer = TextStreamer(tokenizer)
        kwargs = dict(do_sample=False, max_new_tokens=25, repetition_penalty=1.2, streamer=streamer,
                      return_dict_in_generate=True)
        with redirect_stdout(buffer):
            if use_beagle:
                out = spec(target, beagle, ids, TreeShape(3, 3, 8), beagle_streamer=streamer, **kwargs)
            else:
                out = target.generate(ids, **kwargs)
        texts.append((out, buffer.getvalue()))
    (ref, ref_text), (out, out_text) = texts
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, ref.sequences) and out_text == ref_text


def test_custom_generate_from_checkpoint_folder(tmp_path):
    target, beagle = trained_pair()
    beagle.save_pretrained(tmp_path)
    assert (tmp_path / "custom_generate" / "generate.py").is_file()
    ids = torch.tensor([[9, 3, 44, 12]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=20)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        out = target.generate(ids, custom_generate=str(tmp_path), assistant_model=beagle, trust_remote_code=True,
                              do_sample=False, max_new_tokens=20, tree_shape="chain",
                              streamer=TextStreamer(tiny_tokenizer()))
    assert torch.equal(out, ref) and beagle.generation_stats.rounds > 0
    assert buffer.getvalue() == tiny_tokenizer().decode(ref[0]) + "\n"


def test_auto_tree_shape_is_valid():
    target, _ = trained_pair()
    shape = auto_tree_shape(target)
    assert shape.total_tokens >= 4 and shape.depth >= 3
    assert shape.total_tokens <= shape.top_k + (shape.depth - 1) * shape.top_k**2


def test_verification_cost_samples_and_statistics():
    target, _ = trained_pair()
    samples = verification_cost_samples(target, counts=(1, 4), prefix=8, repeats=2, rounds=3)
    assert sorted(samples) == [1, 4] and all(len(ts) == 6 and min(ts) > 0 for ts in samples.values())
    costs = measure_verification_cost(target, counts=(1, 4), prefix=8, statistic="min")
    assert sorted(costs) == [1, 4] and all(c > 0 for c in costs.values())
    with pytest.raises(BeagleGenerationError, match="statistic"):
        measure_verification_cost(target, counts=(1,), prefix=8, statistic="mean")


def test_tree_shape_for_costs_stops_at_the_first_size_over_the_tolerance():
    # a CPU-like curve: flat to 8 tokens, then rising, with a lucky sample at 16 under the tolerance
    costs = {1: 1.0, 2: 1.0, 4: 0.98, 6: 1.02, 8: 1.1, 10: 1.2, 12: 1.3, 14: 1.4, 16: 1.33, 20: 1.6, 32: 2.0}
    assert tree_shape_for_costs(costs) == TreeShape(depth=6, top_k=2, total_tokens=12)
    # one measurement across the tolerance moves the budget by one step of the curve, not by a factor of 2
    assert tree_shape_for_costs({**costs, 12: 1.36}).total_tokens == 10
    assert tree_shape_for_costs({**costs, 14: 1.34}).total_tokens == 16
    assert tree_shape_for_costs(costs, tolerance=1.15).total_tokens == 8
    # two children per node, one level per pair, up to the 30 nodes of a 2-wide depth-8 tree; wider beyond
    assert tree_shape_for_costs({1: 1.0, 16: 1.0, 20: 1.4}) == TreeShape(depth=8, top_k=2, total_tokens=16)
    assert tree_shape_for_costs({1: 1.0, 24: 1.0, 32: 1.4}) == TreeShape(depth=8, top_k=2, total_tokens=24)
    assert tree_shape_for_costs({1: 1.0, 30: 1.0, 32: 1.4}) == TreeShape(depth=8, top_k=2, total_tokens=30)
    assert tree_shape_for_costs({1: 1.0, 32: 1.0, 48: 1.4}) == TreeShape(depth=8, top_k=4, total_tokens=32)
    # a flat curve (a GPU's) takes the largest size measured; a steep one keeps the minimum of 4 nodes
    assert tree_shape_for_costs({n: 1.0 for n in (1, 8, 64)}) == TreeShape(depth=8, top_k=8, total_tokens=64)
    assert tree_shape_for_costs({1: 1.0, 2: 1.5, 4: 2.0}) == TreeShape(depth=3, top_k=2, total_tokens=4)
    for shape in (tree_shape_for_costs({1: 1.0, n: 1.0}) for n in range(1, 65)):
        assert shape.total_tokens <= shape.top_k + (shape.depth - 1) * shape.top_k**2
    with pytest.raises(BeagleGenerationError, match="one-token forward"):
        tree_shape_for_costs({8: 1.0, 16: 1.2})


# ------------------------------------------------------------------------------------------ tree machinery
def _prefix_cache(target, prefix):
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(prefix, **cache_kwargs(target, cache), use_cache=True)
    return cache


def test_tree_verified_in_one_forward_equals_each_branch_alone():
    target = make_target("llama", initializer_range=0.2)
    prefix = torch.randint(3, 96, (1, 9))
    # root (index 0) and nodes 1..7; parents precede children
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3, 5]])
    tokens = torch.randint(3, 96, (1, 8))
    depth = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 3]])
    mask = torch.cat([torch.ones(1, 8, 9, dtype=torch.bool), tree_ancestor_mask(parents)], dim=-1)
    for attn in ("eager", "sdpa"):
        target.set_attn_implementation(attn)
        cache = _prefix_cache(target, prefix)
        with torch.no_grad():
            tree_logits = target(tokens, position_ids=9 + depth, **cache_kwargs(target, cache), use_cache=True,
                                 attention_mask=to_attention_mask(mask, attn, torch.float32)).logits
        for leaf in (4, 6, 7):
            branch, node = [], leaf
            while node >= 0:
                branch.insert(0, node)
                node = int(parents[0, node])
            with torch.no_grad():
                prefix_cache = cache_kwargs(target, _prefix_cache(target, prefix))
                alone = target(tokens[:, branch], **prefix_cache, use_cache=True).logits
            torch.testing.assert_close(tree_logits[:, branch], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", [[0, 2, 4, 5], [0, 1, 3], [0, 1], [0]])  # gathered; the last two cut only
def test_cache_gather_keeps_only_the_accepted_path(path):
    target = make_target("llama", initializer_range=0.2)
    prefix = torch.randint(3, 96, (1, 6))
    parents = torch.tensor([[-1, 0, 0, 1, 2, 4]])
    tokens = torch.randint(3, 96, (1, 6))
    depth = torch.tensor([[0, 1, 1, 2, 2, 3]])
    mask = torch.cat([torch.ones(1, 6, 6, dtype=torch.bool), tree_ancestor_mask(parents)], dim=-1)
    cache = _prefix_cache(target, prefix)
    with torch.no_grad():
        target(tokens, position_ids=6 + depth, **cache_kwargs(target, cache), use_cache=True,
               attention_mask=to_attention_mask(mask, "sdpa", torch.float32))
    _keep_cache_rows(cache, 6, torch.tensor([path]))
    assert cache.get_seq_length() == 6 + len(path)
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        after = target(nxt, **cache_kwargs(target, cache), use_cache=True).logits
        direct = target(torch.cat([prefix, tokens[:, path], nxt], dim=1)).logits[:, -1:]
    torch.testing.assert_close(after, direct, rtol=1e-5, atol=1e-5)


def _true_context(target, beagle, ids):
    """A Beagle cache holding the target's states of `ids` except the last column (the roots), at positions 0.."""
    with torch.no_grad():
        states = target(ids, output_hidden_states=True).hidden_states[-1]
    cache = BeagleCache()
    n = ids.shape[1] - 1
    beagle.append_context(cache, states[:, :n], torch.arange(n).expand(ids.shape[0], -1))
    return cache


def test_draft_tree_structure():
    target, beagle = trained_pair()
    ids = torch.randint(3, 96, (2, 7))
    cache = _true_context(target, beagle, ids)
    shape = TreeShape(depth=4, top_k=3, total_tokens=12)
    tokens, parents, depths = draft_tree(beagle, cache, ids[:, 6], torch.tensor([6, 6]), shape)
    assert tokens.shape == parents.shape == depths.shape == (2, 12)
    for b in range(2):
        for i in range(12):
            p = int(parents[b, i])
            assert p < i and (p == -1) == (depths[b, i] == 1)
            if p >= 0:
                assert depths[b, i] == depths[b, p] + 1
    # depth-1 nodes are Beagle's top choices for the root
    assert cache.num_draft > 0
    cache.discard_drafts()
    with torch.no_grad():
        first = beagle(input_ids=ids[:, 6:], position_ids=torch.tensor([[6], [6]]), past_key_values=cache).logits
    top = first[:, 0].topk(3).indices
    for b in range(2):
        assert set(tokens[b][depths[b] == 1].tolist()) <= set(top[b].tolist())


def test_draft_topk_in_the_draft_vocabulary_equals_topk_over_the_target_vocabulary():
    """The tree ranks a reduced-vocabulary draft's children in the draft vocabulary: the same log-probabilities and
    (target) ids as a top-k over the logits scattered into the target's vocabulary."""
    from modeling_beagle.generation_beagle import draft_logits_to_target_vocab, draft_topk

    target = make_target("llama")
    torch.manual_seed(3)
    beagle = BeagleModel.from_target(target, attn_implementation="eager", draft_vocab_size=40).eval()
    beagle.set_draft_vocabulary(torch.randperm(target.config.vocab_size)[:40])
    beagle.bind_target(target)
    logits = torch.randn(2, 3, 40)
    scores, ids = draft_topk(beagle, logits, 4)
    full_scores, full_ids = draft_logits_to_target_vocab(beagle, logits).log_softmax(-1).topk(4, dim=-1)
    torch.testing.assert_close(scores, full_scores)
    assert torch.equal(ids, full_ids)
    assert set(ids.flatten().tolist()) <= set(beagle.draft_to_target.tolist())


def _paths(tokens, parents):
    """Each node of one row as the tuple of tokens from the root's child down to it."""
    paths = []
    for i in range(tokens.shape[0]):
        p = int(parents[i])
        paths.append((paths[p] if p >= 0 else ()) + (int(tokens[i]),))
    return paths


def test_min_prob_prunes_the_tree_to_its_most_confident_nodes():
    target, beagle = trained_pair()
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        states = target(ids, output_hidden_states=True).hidden_states[-1]
    forwards = []
    hook = beagle.register_forward_hook(lambda module, args, output: forwards.append(1))

    def drafted(shape):
        cache = BeagleCache()
        beagle.append_context(cache, states[:, :6], torch.arange(6).expand(2, -1))
        forwards.clear()
        return draft_tree(beagle, cache, ids[:, 6], torch.tensor([6, 6]), shape), len(forwards)

    (full, full_forwards) = drafted(TreeShape(depth=4, top_k=3, total_tokens=12))
    (pruned, pruned_forwards) = drafted(TreeShape(depth=4, top_k=3, total_tokens=12, min_prob=0.05))
    (sure, sure_forwards) = drafted(TreeShape(depth=4, top_k=3, total_tokens=12, min_prob=0.999))
    hook.remove()
    assert full_forwards == 4 and full[0].shape == (2, 12)
    # Pruning keeps a prefix of the same ranking: every kept path is one the unpruned tree verifies too.
    n = pruned[0].shape[1]
    assert 1 <= n < 12 and pruned_forwards <= 4
    for b in range(2):
        assert set(_paths(pruned[0][b], pruned[1][b])) <= set(_paths(full[0][b], full[1][b]))
    # A threshold nothing reaches: one node (the draft's first choice) and no draft step after the first.
    assert sure[0].shape == (2, 1) and sure_forwards == 1 and bool((sure[2] == 1).all())
    # The first-level node kept is the draft's argmax for the root.
    with torch.no_grad():
        cache = BeagleCache()
        beagle.append_context(cache, states[:, :6], torch.arange(6).expand(2, -1))
        first = beagle(input_ids=ids[:, 6:], position_ids=torch.tensor([[6], [6]]), past_key_values=cache).logits
    assert torch.equal(sure[0][:, 0], first[:, 0].argmax(-1))


def test_tree_shape_resolution_and_min_prob_validation():
    from modeling_beagle.decoding_beagle import resolve_tree_shape

    target, beagle = trained_pair()
    threshold = beagle.config.draft_confidence_threshold
    assert resolve_tree_shape(target, beagle, "auto").min_prob == threshold
    chain = resolve_tree_shape(target, beagle, "chain")
    assert (chain.top_k, chain.total_tokens, chain.min_prob) == (1, beagle.config.num_draft_tokens, threshold)
    assert resolve_tree_shape(target, beagle, dict(depth=3, top_k=2, total_tokens=4, min_prob=0.2)).min_prob == 0.2
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(BeagleGenerationError, match="min_prob"):
            TreeShape(depth=3, top_k=2, total_tokens=4, min_prob=bad)


# ------------------------------------------------------------------------------------------ prompt-lookup branch
def test_prompt_lookup_proposes_what_transformers_prompt_lookup_proposes():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    g = torch.Generator().manual_seed(0)
    found = 0
    for _ in range(300):
        sequence = torch.randint(0, int(torch.randint(2, 7, (1,), generator=g)),
                                 (int(torch.randint(2, 30, (1,), generator=g)),), generator=g)
        num_tokens, max_ngram = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        reference = PromptLookupCandidateGenerator(num_output_tokens=num_tokens, max_matching_ngram_size=max_ngram,
                                                   max_length=1000)
        candidates, _ = reference.get_candidates(sequence[None])
        proposal = prompt_lookup(sequence, num_tokens, max_ngram)
        assert proposal == candidates[0, sequence.shape[0] :].tolist(), (sequence.tolist(), num_tokens, max_ngram)
        found += bool(proposal)
    assert 50 < found < 300  # both outcomes exercised


def _suffix_lookup_reference(sequence: list[int], num_tokens: int, max_ngram: int, latest: bool, min_ngram: int):
    """suffix_lookup written out with Python loops: every earlier end, its match length, the periodic proposal."""
    n = len(sequence)
    matches = []
    for end in range(n - 1):
        length = 0
        while length < max_ngram and end - length >= 0 and sequence[end - length] == sequence[n - 1 - length]:
            length += 1
        matches.append(length)
    if num_tokens < 1 or not matches or max(matches) < max(min_ngram, 1):
        return []
    ends = [e for e, m in enumerate(matches) if m == max(matches)]
    end = ends[-1] if latest else ends[0]
    extended = list(sequence)
    while len(extended) < end + 1 + num_tokens:
        extended.append(extended[len(extended) - (n - 1 - end)])
    return extended[end + 1 : end + 1 + num_tokens]


def test_suffix_lookup_takes_the_longest_repeated_suffix():
    from modeling_beagle.decoding_beagle import suffix_lookup

    g = torch.Generator().manual_seed(1)
    kinds = set()
    for _ in range(400):
        sequence = torch.randint(0, int(torch.randint(2, 6, (1,), generator=g)),
                                 (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        num_tokens, max_ngram = int(torch.randint(0, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        latest, min_ngram = bool(torch.randint(0, 2, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        proposal = suffix_lookup(sequence, num_tokens, max_ngram, latest, min_ngram)
        assert proposal == _suffix_lookup_reference(sequence.tolist(), num_tokens, max_ngram, latest, min_ngram)
        if not latest:  # the earliest occurrence of the longest match up to n tokens is transformers' n-gram rule,
            reference = prompt_lookup(sequence, num_tokens, max_ngram)  # which stops at the sequence's end
            if min_ngram == 1:
                assert proposal[: len(reference)] == reference and (bool(proposal) == bool(reference))
            kinds.add("extended" if len(proposal) > len(reference) else "same")
        kinds.add("found" if proposal else "none")
    assert kinds == {"extended", "same", "found", "none"}
    # hand-checked: the longest match wins over an earlier 2-gram; ties go to the latest occurrence
    sequence = torch.tensor([1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3])
    assert suffix_lookup(sequence, 5) == [9, 1, 2, 3, 9]  # after the latest "1 2 3", repeating with period 4
    assert suffix_lookup(sequence, 5, latest=False) == [4, 1, 2, 3, 9]
    assert suffix_lookup(torch.tensor([5, 7, 7, 7]), 4) == [7, 7, 7, 7]
    assert suffix_lookup(torch.tensor([1, 2, 9, 2]), 3, min_ngram=2) == []


def test_lookup_branch_merges_into_the_tree():
    target, beagle = trained_pair()
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(5))
    cache = _true_context(target, beagle, ids)
    tokens, parents, depths = draft_tree(beagle, cache, ids[:, 6], torch.tensor([6, 6, 6]),
                                         TreeShape(depth=3, top_k=2, total_tokens=6))
    tree_paths = [_paths(tokens[b], parents[b]) for b in range(3)]
    deepest = max(tree_paths[0], key=len)
    proposals = [list(deepest) + [90, 91],  # runs along row 0's deepest path, then leaves the tree
                 [], [95, 94, 93]]  # nothing for row 1; row 2: (almost surely) off the tree from the root
    merged, merged_parents, merged_depths, from_lookup = add_lookup_branch(tokens, parents, depths, proposals)
    assert merged.shape == merged_parents.shape == merged_depths.shape == from_lookup.shape
    assert torch.equal(merged[:, :6], tokens) and torch.equal(merged_parents[:, :6], parents)
    for b, proposal in enumerate(proposals):
        added = [p for p in (tuple(proposal[:i]) for i in range(1, len(proposal) + 1)) if p not in tree_paths[b]]
        paths = _paths(merged[b], merged_parents[b])
        real = 6 + len(added)
        assert paths[:real] == tree_paths[b] + added  # the tree unchanged, then the proposal's new nodes in order
        assert from_lookup[b].tolist() == [False] * 6 + [True] * len(added) + [False] * (merged.shape[1] - real)
        assert all(len(path) == int(d) for path, d in zip(paths, merged_depths[b]))
        assert all(int(p) < i for i, p in enumerate(merged_parents[b]))  # parents before children
        # padding: copies of the row's first node, so the accept walk (first matching child) never picks them
        assert all(paths[i] == paths[0] and int(merged_parents[b, i]) == int(merged_parents[b, 0])
                   for i in range(real, merged.shape[1]))
    assert int(from_lookup[0].sum()) == 2 and int(from_lookup[1].sum()) == 0 and int(from_lookup[2].sum()) == 3


@pytest.mark.parametrize("copy_match", [0, 2], ids=["tree-every-round", "copy-mode"])
@pytest.mark.parametrize("rule", ["suffix", "ngram"])
@pytest.mark.parametrize("shape", ["chain", TreeShape(depth=3, top_k=2, total_tokens=6, min_prob=0.05)],
                         ids=["chain", "pruned-tree"])
def test_greedy_identity_with_the_lookup_branch(shape, rule, copy_match, monkeypatch):
    """The lookup branch is one more branch of the verified tree: output stays plain greedy, single rows and padded
    batches, and the branch's tokens are accepted (the peaky tiny target repeats itself, as greedy text does). In copy
    mode, rounds whose every row matches at least `lookup_copy_match` tokens verify only the (longer) lookup branch,
    and Beagle does not draft in them."""
    import modeling_beagle.decoding_beagle as decoding

    drafts = []
    for name in ("draft_tree", "draft_sampled_tree"):
        real = getattr(decoding, name)
        monkeypatch.setattr(decoding, name, lambda *args, _real=real, **kwargs: drafts.append(1) or _real(*args, **kwargs))
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(8)
    from_lookup = copy_rounds = 0
    copy = dict(lookup_copy_match=copy_match, lookup_copy_tokens=7)

    def check_stats(stats, single_row=True):
        nonlocal from_lookup, copy_rounds
        assert len(stats.accepted_from_lookup) == stats.rounds
        assert all(0 <= f <= a for f, a in zip(stats.accepted_from_lookup, stats.accepted))
        if single_row:  # (stats count rounds per row)
            assert len(drafts) == stats.rounds - stats.copy_rounds  # no draft in copy rounds, one in every other round
        drafts.clear()
        from_lookup += sum(stats.accepted_from_lookup)
        copy_rounds += stats.copy_rounds

    for i in range(16):
        ids = torch.randint(3, 96, (1, int(torch.randint(2, 16, (1,), generator=g))), generator=g)
        new = int(torch.randint(1, 48, (1,), generator=g))
        ref = target.generate(ids, do_sample=False, max_new_tokens=new)
        out = spec(target, beagle, ids, shape, do_sample=False, max_new_tokens=new, prompt_lookup_num_tokens=1 + i % 6,
                   max_matching_ngram_size=[None, 1, 3][i % 3], prompt_lookup_rule=rule, **copy)
        assert torch.equal(out, ref), f"prompt {i}: output differs from plain greedy"
        check_stats(beagle.generation_stats)
    for _ in range(6):
        ids, mask = padded_batch(g, int(torch.randint(2, 5, (1,), generator=g)))
        new = int(torch.randint(5, 40, (1,), generator=g))
        ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new)
        out = spec(target, beagle, ids, shape, attention_mask=mask, do_sample=False, max_new_tokens=new,
                   prompt_lookup_num_tokens=4, prompt_lookup_rule=rule, **copy)
        assert torch.equal(out, ref)
        check_stats(beagle.generation_stats, single_row=False)
    assert from_lookup > 20, "the lookup branch was rarely accepted: the test would not exercise it"
    if copy_match:
        assert copy_rounds > 4, "copy mode rarely started: the test would not exercise it"
    else:
        assert copy_rounds == 0


@pytest.mark.parametrize("rule", ["suffix", "ngram"])
def test_lookup_tokens_per_match_shortens_the_branch_by_its_match(rule, monkeypatch):
    """`lookup_tokens_per_match=K`: a round that does not copy asks the rule for at most K tokens per matched token
    (and `prompt_lookup_num_tokens` at most; K = 3 by default, 0 lifts the cap); copy rounds keep `lookup_copy_tokens`;
    the output stays plain greedy."""
    import modeling_beagle.decoding_beagle as decoding

    real = decoding.LOOKUP_RULES[rule]
    asked = []  # (match length, tokens asked for) per continuation

    def match(sequence, max_ngram):
        found = real.match(sequence, max_ngram)
        asked.append([found[1], None])
        return found

    def continuation(sequence, end, num_tokens):
        asked[-1][1] = num_tokens
        return real.continuation(sequence, end, num_tokens)

    monkeypatch.setitem(decoding.LOOKUP_RULES, rule, decoding.LookupRule(match, continuation, real.max_ngram))
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(12)
    shortened, copied, uncapped = collections.Counter(), 0, 0
    for i in range(16):
        ids = torch.randint(3, 96, (1, int(torch.randint(2, 16, (1,), generator=g))), generator=g)
        new, k, copy_match = 40, (1, 2, None, 0)[i % 4], (2 if i >= 12 else 0)
        cap = {None: 3, 0: 6}.get(k, k)  # None: the default, 3; 0: off, the whole `prompt_lookup_num_tokens`
        asked.clear()
        out = spec(target, beagle, ids, TreeShape(depth=3, top_k=2, total_tokens=6), do_sample=False,
                   max_new_tokens=new, prompt_lookup_num_tokens=6, prompt_lookup_rule=rule, lookup_tokens_per_match=k,
                   lookup_copy_match=copy_match, lookup_copy_tokens=9)
        assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=new))
        for length, num in asked:
            if num is None:  # no earlier occurrence: no branch
                continue
            if copy_match and length >= copy_match:
                assert num <= 9
                copied += num > 6  # longer than any lookup branch: a copy round's
            else:
                assert num <= min(6, cap * length)
                shortened[k] += num == cap * length < 6
                uncapped += k == 0 and length == 1 and num == 6
    assert min(shortened[k] for k in (1, 2, None)) > 5 and copied > 2 and uncapped > 2, \
        "the test would not exercise the shortened branch (each K and the default), the uncapped one or copy mode"


def test_lookup_min_match_proposes_branches_only_from_long_matches(monkeypatch):
    """`lookup_min_match=M`: the rule's continuation is asked for only where the match is M tokens or more; the
    output stays plain greedy."""
    import modeling_beagle.decoding_beagle as decoding

    real = decoding.LOOKUP_RULES["suffix"]
    matches, continued = [], []  # match lengths found / of the matches continued

    def match(sequence, max_ngram):
        found = real.match(sequence, max_ngram)
        matches.append(found[1])
        return found

    def continuation(sequence, end, num_tokens):
        continued.append(matches[-1])
        return real.continuation(sequence, end, num_tokens)

    monkeypatch.setitem(decoding.LOOKUP_RULES, "suffix", decoding.LookupRule(match, continuation, real.max_ngram))
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(13)
    for i in range(8):
        ids = torch.randint(3, 96, (1, int(torch.randint(2, 16, (1,), generator=g))), generator=g)
        out = spec(target, beagle, ids, TreeShape(depth=3, top_k=2, total_tokens=6), do_sample=False,
                   max_new_tokens=40, prompt_lookup_num_tokens=6, lookup_copy_match=0, lookup_min_match=3)
        assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=40))
    assert continued and min(continued) >= 3
    assert sum(0 < m < 3 for m in matches) > 20, "the test would not exercise short matches"


def test_copy_mode_starts_only_from_matches_that_propose_a_branch(monkeypatch):
    """With `lookup_min_match` above `lookup_copy_match`, a round whose match lies between the two drafts as usual:
    copy mode (no draft) starts only from a match long enough to propose the branch it verifies, so no round verifies
    its root token alone; the output stays plain greedy."""
    import modeling_beagle.decoding_beagle as decoding

    real = decoding.add_lookup_branch
    rounds = []  # (drafted nodes, lookup tokens proposed) per round

    def recorded(tokens, parents, depths, proposals):
        rounds.append((tokens.shape[1], len(proposals[0])))
        return real(tokens, parents, depths, proposals)

    monkeypatch.setattr(decoding, "add_lookup_branch", recorded)
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(17)
    copy_rounds = 0
    for i in range(8):
        ids = torch.randint(3, 12, (1, int(torch.randint(4, 16, (1,), generator=g))), generator=g)
        out = spec(target, beagle, ids, TreeShape(depth=3, top_k=2, total_tokens=6), do_sample=False,
                   max_new_tokens=40, prompt_lookup_num_tokens=6, lookup_copy_match=2, lookup_min_match=4)
        assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=40))
        copy_rounds += beagle.generation_stats.copy_rounds
    assert all(drafted or proposed for drafted, proposed in rounds), "a round verified only its root token"
    assert copy_rounds > 0, "the test would not exercise copy mode"
    assert sum(drafted == 0 for drafted, _ in rounds) == copy_rounds


def test_copy_mode_falls_back_to_drafting_when_the_rule_continues_no_match(monkeypatch):
    """A lookup rule (a `LOOKUP_RULES` plugin) that finds long matches but continues them by no token: the rounds
    that would copy draft as usual (no round without a node to verify), and the output stays plain greedy."""
    import modeling_beagle.decoding_beagle as decoding

    real = decoding.LOOKUP_RULES["suffix"]
    monkeypatch.setitem(decoding.LOOKUP_RULES, "suffix",
                        decoding.LookupRule(real.match, lambda sequence, end, num: [], real.max_ngram))
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(19)
    for i in range(4):
        ids = torch.randint(3, 8, (1, 12), generator=g)  # few distinct tokens: long matches from the start
        out = spec(target, beagle, ids, TreeShape(depth=3, top_k=2, total_tokens=6), do_sample=False,
                   max_new_tokens=30, prompt_lookup_num_tokens=6, lookup_copy_match=2)
        assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=30))
        assert beagle.generation_stats.copy_rounds == 0


def test_bad_prompt_lookup_settings_are_refused():
    from modeling_beagle.decoding_beagle import (
        resolve_copy_mode,
        resolve_lookup_min_match,
        resolve_lookup_tokens_per_match,
        resolve_prompt_lookup,
    )

    assert resolve_prompt_lookup(GenerationConfig()) == (0, 32)  # the suffix rule reads matches up to 32 tokens
    assert resolve_prompt_lookup(GenerationConfig(), "ngram") == (0, 2)  # transformers' default
    assert resolve_prompt_lookup(GenerationConfig(prompt_lookup_num_tokens=5, max_matching_ngram_size=3)) == (5, 3)
    # a call without the setting gets the draft's default; a call's own value, 0 (off) included, wins over it
    assert resolve_prompt_lookup(GenerationConfig(), default_tokens=10) == (10, 32)
    assert resolve_prompt_lookup(GenerationConfig(prompt_lookup_num_tokens=0), default_tokens=10) == (0, 32)
    assert resolve_prompt_lookup(GenerationConfig(prompt_lookup_num_tokens=3), default_tokens=10) == (3, 32)
    with pytest.raises(BeagleGenerationError, match="prompt_lookup_rule"):
        resolve_prompt_lookup(GenerationConfig(prompt_lookup_num_tokens=5), "longest")
    for bad in (-2, 1.5, True):
        config = GenerationConfig()
        config.prompt_lookup_num_tokens = bad
        with pytest.raises(BeagleGenerationError, match="prompt_lookup_num_tokens"):
            resolve_prompt_lookup(config)
    config = GenerationConfig(prompt_lookup_num_tokens=4)
    config.max_matching_ngram_size = 0
    with pytest.raises(BeagleGenerationError, match="max_matching_ngram_size"):
        resolve_prompt_lookup(config)
    assert resolve_copy_mode(0, 1) == (0, 1) and resolve_copy_mode(4, 32) == (4, 32)
    assert resolve_copy_mode(None, 32) == (4, 32) and resolve_copy_mode(None, 32, do_sample=True) == (0, 32)
    assert resolve_copy_mode(2, 8, do_sample=True) == (2, 8)  # on when asked for, sampling too
    for bad in (-1, 2.0, True, "4"):
        with pytest.raises(BeagleGenerationError, match="lookup_copy_match"):
            resolve_copy_mode(bad, 32)
        with pytest.raises(BeagleGenerationError, match="lookup_copy_tokens"):
            resolve_copy_mode(4, bad)
    with pytest.raises(BeagleGenerationError, match="lookup_copy_tokens"):
        resolve_copy_mode(4, 0)
    assert resolve_copy_mode(None, None) == (4, 32) and resolve_copy_mode(0, None, lookup=False) == (0, 32)
    for copy_match, copy_tokens in ((4, None), (None, 16)):  # copy mode asked for without the lookup branch
        with pytest.raises(BeagleGenerationError, match="lookup off"):
            resolve_copy_mode(copy_match, copy_tokens, lookup=False)
    assert resolve_lookup_tokens_per_match(None) == 3 and resolve_lookup_tokens_per_match(5) == 5
    assert resolve_lookup_tokens_per_match(0) == 0 and resolve_lookup_tokens_per_match(None, lookup=False) == 0
    assert resolve_lookup_tokens_per_match(0, lookup=False) == 0  # off, like the branch it would shorten
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(BeagleGenerationError, match="lookup_tokens_per_match"):
            resolve_lookup_tokens_per_match(bad)
    target, beagle = trained_pair()
    off = dict(do_sample=False, max_new_tokens=4, prompt_lookup_num_tokens=0)
    with pytest.raises(BeagleGenerationError, match=r"lookup off \(`prompt_lookup_num_tokens` 0\)"):
        spec(target, beagle, torch.tensor([[5, 6, 7]]), "chain", lookup_copy_match=4, **off)
    with pytest.raises(BeagleGenerationError, match="lookup_tokens_per_match.*lookup off"):
        spec(target, beagle, torch.tensor([[5, 6, 7]]), "chain", lookup_tokens_per_match=2, **off)
    assert resolve_lookup_min_match(None) == 1 and resolve_lookup_min_match(4) == 4
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(BeagleGenerationError, match="lookup_min_match"):
            resolve_lookup_min_match(bad)
    with pytest.raises(BeagleGenerationError, match="lookup_min_match.*lookup off"):
        spec(target, beagle, torch.tensor([[5, 6, 7]]), "chain", lookup_min_match=2, **off)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("shape, new, lookup, sampled", [
    (TreeShape(depth=2, top_k=2, total_tokens=4), 3, {}, False),
    (TreeShape(depth=2, top_k=2, total_tokens=4), 3, {}, True),
    # one draft node and up to two lookup tokens (max_new_tokens=4 leaves room for them): the branch gets accepted
    (TreeShape(depth=1, top_k=1, total_tokens=1), 4, {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 1}, False),
    (TreeShape(depth=1, top_k=1, total_tokens=1), 4, {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 1}, True),
    # copy mode whenever the last token occurred before: such rounds verify a 3-token lookup branch and no draft
    (TreeShape(depth=2, top_k=2, total_tokens=4), 4, {"prompt_lookup_num_tokens": 1, "max_matching_ngram_size": 1,
                                                       "lookup_copy_match": 1, "lookup_copy_tokens": 3}, True),
], ids=["top-k-tree", "sampled-tree", "top-k-tree-and-lookup", "sampled-tree-and-lookup", "sampled-tree-copy-mode"])
def test_tree_sampling_matches_target_distribution(shape, new, lookup, sampled):
    """Sampled output of the own loop has exactly the target's distribution, with fixed (top-k) children accepted when
    the target samples them and with sampled children verified by recursive rejection sampling (`sampled_drafts`),
    each with and without the (fixed) lookup branch."""
    target = make_target("llama", vocab_size=8, initializer_range=0.2, eos_token_id=None, bos_token_id=None,
                         pad_token_id=0)
    torch.manual_seed(0)
    beagle = briefly_train(BeagleModel.from_target(target, attn_implementation="eager", noise_type="none"), target,
                           steps=60)
    prompt = torch.tensor([[1, 5, 2, 7]])
    exact = _exact_joint_of_tokens_2_and_3(target, prompt,
                                           LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(6)]))
    counts = torch.zeros(64)
    accepted = from_lookup = copy_rounds = 0
    torch.manual_seed(7)
    for _ in range(1200):
        out = spec(target, beagle, prompt, shape, do_sample=True, temperature=0.8, top_k=6, max_new_tokens=new,
                   sampled_drafts=sampled, **lookup)
        t2, t3 = out[0, 5:7].tolist()
        counts[t2 * 8 + t3] += 1
        accepted += sum(beagle.generation_stats.accepted)
        from_lookup += sum(beagle.generation_stats.accepted_from_lookup)
        copy_rounds += beagle.generation_stats.copy_rounds
    assert accepted > 120, "tree branches were rarely accepted: the test would not exercise the descent"
    if lookup:  # with sampled drafts the lookup branch is reached only through the residual draw: rarer
        assert from_lookup > (25 if sampled else 60), "the lookup branch was rarely accepted: the test would not exercise it"
    if lookup.get("lookup_copy_match") == 1:
        assert copy_rounds > 100, "copy mode rarely started: the test would not exercise it"
    assert _chi_square_p_value(counts, exact) > 1e-3


def _biased_rejection_sample(p, q, candidates):
    """A plausible-looking wrong rule (after a rejection, draw from p itself instead of the residual)."""
    for c in candidates:
        if float(torch.rand(()) * q[c]) < float(p[c]):
            return c, True
    return int(torch.multinomial(p, 1)), False


def test_sample_categorical_and_gumbel_noise_have_exactly_the_distribution():
    """The loop's samplers: `sample_categorical` (inverse CDF) draws each row of unnormalised weights with exactly
    their distribution and never a zero-weight token, even at the uniform's extremes; Gumbel top-1 is a softmax draw.
    The chi-square test has the power to reject a slightly sharpened distribution on the same number of draws."""
    torch.manual_seed(0)
    weights = torch.tensor([[0.0, 3.0, 2.5, 0.0, 1.2, 0.8, 0.5, 0.0], [1.0, 0.0, 0.0, 0.5, 0.25, 2.0, 0.25, 0.0]])
    probs = weights / weights.sum(-1, keepdim=True)
    draws = torch.stack([sample_categorical(weights) for _ in range(20000)])  # (draws, rows)
    assert draws.shape == (20000, 2) and draws.dtype == torch.long
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=8).float()
        assert counts[weights[row] == 0].sum() == 0
        assert _chi_square_p_value(counts, probs[row]) > 1e-3
        sharpened = probs[row] ** 1.15 / (probs[row] ** 1.15).sum()
        assert _chi_square_p_value(counts, sharpened) < 1e-6
    logits = torch.tensor([1.0, -0.5, 2.0, 0.3, -3.0, 0.0])
    firsts = torch.stack([(logits + gumbel_noise(logits)).argmax() for _ in range(20000)])
    assert _chi_square_p_value(torch.bincount(firsts, minlength=6).float(), logits.softmax(-1)) > 1e-3


@pytest.mark.parametrize("uniform", [0.0, 1.0])
def test_sample_categorical_at_the_uniforms_extremes(monkeypatch, uniform):
    """u = 0 must not pick a leading zero-weight token; u rounding up to the total must not run past the last
    non-zero one (nor off the end)."""
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, uniform, **kw))
    weights = torch.tensor([[0.0, 0.3, 0.7, 0.0]])
    assert int(sample_categorical(weights)) == (1 if uniform == 0.0 else 2)


def test_recursive_rejection_sample_has_exactly_the_target_distribution():
    """Candidates drawn without replacement from q (Gumbel top-k) and verified by `recursive_rejection_sample` give
    tokens distributed as p; the chi-square test has the power to reject a biased rule on the same draws."""
    torch.manual_seed(0)
    p = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    q = torch.tensor([0.05, 0.10, 0.40, 0.30, 0.10, 0.05])
    counts = {"exact": torch.zeros(6), "biased": torch.zeros(6)}
    taken = 0
    for _ in range(20000):
        candidates = (q.log() - torch.empty(6).exponential_().log()).topk(3).indices.tolist()
        token, accepted = recursive_rejection_sample(p, q, candidates)
        assert not accepted or token in candidates
        counts["exact"][token] += 1
        taken += accepted
        counts["biased"][_biased_rejection_sample(p, q, candidates)[0]] += 1
    assert _chi_square_p_value(counts["exact"], p) > 1e-3
    assert _chi_square_p_value(counts["biased"], p) < 1e-6
    # three candidates accept more often than one draft token would (sum of min(p, q) = 0.55 here)
    assert taken / 20000 > 0.7
    # the draft equal to the target: its first candidate is always taken
    assert all(recursive_rejection_sample(p, p, [c])[1] for c in range(6))


def test_sampled_draft_tree_keeps_sibling_groups_in_sampling_order():
    """`draft_sampled_tree`: children are distinct draws from the draft's distribution at the given temperature, kept
    as whole sibling groups (only the last group cut short, to a prefix of its draws), parents before children; the
    returned distributions are the draft's at each expanded node."""
    target, beagle = trained_pair()
    ids = torch.randint(3, 96, (2, 7))
    cache = _true_context(target, beagle, ids)
    shape = TreeShape(depth=3, top_k=3, total_tokens=7)  # groups of 3: the root's, a second one whole, then one of 3
    torch.manual_seed(3)
    tokens, parents, depths, ranks, dists = draft_sampled_tree(beagle, cache, ids[:, 6], torch.tensor([6, 6]), shape,
                                                               temperature=0.7)
    cache.discard_drafts()
    assert tokens.shape == parents.shape == depths.shape == ranks.shape == (2, 7) and dists.shape[:2] == (2, 8)
    with torch.no_grad():
        first = beagle(input_ids=ids[:, 6:], position_ids=torch.tensor([[6], [6]]), past_key_values=cache).logits
    assert torch.allclose(dists[:, 0], (first[:, 0].float() / 0.7).softmax(-1), atol=1e-5)
    for b in range(2):
        groups = {}
        for i in range(7):
            parent = int(parents[b, i])
            assert parent < i and (parent == -1) == (depths[b, i] == 1)
            groups.setdefault(parent, []).append(i)
        assert sorted(len(g) for g in groups.values()) == [1, 3, 3]
        for parent, members in groups.items():
            assert sorted(int(ranks[b, i]) for i in members) == list(range(len(members)))  # a prefix of the draws
            assert len({int(tokens[b, i]) for i in members}) == len(members)  # without replacement
            assert torch.allclose(dists[b, parent + 1].sum(), torch.tensor(1.0), atol=1e-4)
            assert all(dists[b, parent + 1][int(tokens[b, i])] > 0 for i in members)
    with pytest.raises(BeagleGenerationError, match="temperature"):
        draft_sampled_tree(beagle, cache, ids[:, 6], torch.tensor([6, 6]), shape, temperature=0.0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_to_the_loop():
    target, beagle = trained_pair()
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(BeagleGenerationError, match="output_scores"):
        spec(target, beagle, ids, "chain", output_scores=True, return_dict_in_generate=True, max_new_tokens=4)
    with pytest.raises(BeagleGenerationError, match="tree_shape"):
        spec(target, beagle, ids, "bushy", max_new_tokens=4)
    with pytest.raises(BeagleGenerationError, match="use_cache"):
        spec(target, beagle, ids, "chain", use_cache=False, max_new_tokens=4)
    cache = DynamicCache(config=target.config)
    first = target.generate(ids, do_sample=False, max_new_tokens=3, past_key_values=cache)
    with pytest.raises(BeagleGenerationError, match="DynamicCache holding 5 cached tokens.*whole conversation"):
        spec(target, beagle, torch.cat([first, ids], 1), "chain", past_key_values=cache, max_new_tokens=4)
    with pytest.raises(BeagleGenerationError, match="total_tokens"):
        TreeShape(depth=2, top_k=2, total_tokens=50)
    with pytest.raises(BeagleGenerationError, match="beagle"):
        target.generate(ids, custom_generate=beagle_generate, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        spec(target, beagle, ids, "chain", do_sample=True, num_return_sequences=2, max_new_tokens=4)
    with pytest.raises(BeagleGenerationError, match="sampled_drafts.*do_sample=False"):
        spec(target, beagle, ids, "chain", do_sample=False, sampled_drafts=True, max_new_tokens=4)
    with pytest.raises(BeagleGenerationError, match="sampled_drafts"):
        spec(target, beagle, ids, "chain", do_sample=True, sampled_drafts="yes", max_new_tokens=4)
    other = BeagleModel.from_target(make_target("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="hidden_size"):
        spec(target, other, ids, "chain", max_new_tokens=4)


@pytest.mark.parametrize("variant", [{"recency_bias": True}, {"query_newest_state": True},
                                     {"context_next_token": True}],
                         ids=["recency", "newest-state", "next-token"])
def test_greedy_identity_with_draft_variants(variant):
    """Drafts with `recency_bias` (a float score bias in every attention call), `query_newest_state` (queries
    that add their newest readable state) or `context_next_token` (states read with the token that followed them)
    stay lossless on both paths."""
    target, beagle = trained_pair(**variant)
    g = torch.Generator().manual_seed(4)
    accepted = 0
    for i in range(16):
        ids = torch.randint(3, 96, (1, int(torch.randint(1, 16, (1,), generator=g))), generator=g)
        ref = target.generate(ids, do_sample=False, max_new_tokens=24)
        assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=beagle), ref)
        accepted += sum(beagle.generation_stats.accepted)
        assert torch.equal(spec(target, beagle, ids, SHAPES[1 + i % 3], do_sample=False, max_new_tokens=24), ref)
    assert accepted > 16


def _path_logits(beagle, states, next_ids, path, root_position):
    """Draft logits after the last token of `path` (root first), drafted one step at a time as method.md §2 says:
    true states read with the tokens that followed them, then each ancestor's draft state with its child's token."""
    cache = BeagleCache()
    beagle.append_context(cache, states, torch.arange(root_position)[None], next_ids=next_ids)
    parent = None
    for depth, token in enumerate(path):
        kwargs = {} if parent is None else dict(draft_states=parent, draft_next_ids=torch.tensor([[token]]),
                                                draft_position_ids=torch.tensor([[root_position + depth - 1]]))
        with torch.no_grad():
            out = beagle(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[root_position + depth]]),
                         past_key_values=cache, **kwargs)
        parent = out.last_hidden_state
    return out.logits[0, 0]


@pytest.mark.parametrize("variant", [{}, {"context_next_token": True}], ids=["plain", "next-token"])
def test_drafts_are_what_the_model_computes_along_each_path(variant):
    """Every node of a draft tree is among the top-k of its parent's logits computed along the parent's own path
    (its siblings' draft states and tokens unseen), and the assisted chain's candidates are the greedy chain of the
    same computation: the generation paths hand each draft step exactly the context training simulated."""
    from modeling_beagle.generation_beagle import BeagleCandidateGenerator, draft_topk

    target = make_target("llama", initializer_range=0.2)
    torch.manual_seed(7)
    beagle = BeagleModel.from_target(target, draft_confidence_threshold=0.0, **variant).eval()
    with torch.no_grad():  # random, not zero-initialised, so the token projection matters
        for param in beagle.parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else param.add_(torch.randn_like(param) * 0.1)
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    states, n = out.hidden_states[-1][:, :7], 7  # the root (bonus) token ids[:, 7] has no state yet
    cache = BeagleCache()
    beagle.append_context(cache, states, torch.arange(n)[None], next_ids=ids[:, 1:])
    shape = TreeShape(depth=4, top_k=3, total_tokens=14)
    tokens, parents, depths = draft_tree(beagle, cache, ids[:, n], torch.tensor([n]), shape)
    root = int(ids[0, n])
    for i in range(tokens.shape[1]):
        path, node = [], int(parents[0, i])
        while node >= 0:
            path.insert(0, int(tokens[0, node]))
            node = int(parents[0, node])
        logits = _path_logits(beagle, states, ids[:, 1:], [root] + path, n)
        _, top = draft_topk(beagle, logits, shape.top_k)
        assert int(tokens[0, i]) in top.tolist(), f"node {i} at depth {int(depths[0, i])}"
    assert int(depths.max()) == 4

    config = GenerationConfig(do_sample=False, max_length=40, num_assistant_tokens=4)
    generator = BeagleCandidateGenerator(beagle, config, LogitsProcessorList())
    candidates, _ = generator.get_candidates(ids, model_outputs=out)
    drafted = candidates[0, n + 1 :].tolist()
    assert len(drafted) == 4
    for d in range(4):
        logits = _path_logits(beagle, states, ids[:, 1:], [root] + drafted[:d], n)
        assert draft_topk(beagle, logits, 1)[1].item() == drafted[d], f"chain step {d + 1}"
