"""Prepacked CPU linear layers (`modeling_beagle.prepack_linear_weights`): same numbers, same parameters, lossless."""

import copy

import pytest
import torch
from conftest import make_target, trained_pair
from torch import nn
from torch.nn import functional as F

import modeling_beagle  # noqa: F401  (installs the generate hook)
from modeling_beagle import (
    PrepackedLinear,
    TreeShape,
    beagle_generate,
    is_prepacked,
    packed_path,
    prepack_linear_weights,
    prepacking_available,
    unpack_linear_weights,
)

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="this torch build has no oneDNN packed linear")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 7, 48), (3, 1, 48)])
def test_packed_linear_matches_f_linear(bias, shape):
    linear = nn.Linear(48, 80, bias=bias)
    packed = PrepackedLinear.from_linear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias  # shared, not copied
    x = torch.randn(*shape)
    with torch.no_grad():
        assert packed._usable_packed(x) is not None  # this forward takes the packed path, not the F.linear fallback
        ref, out = F.linear(x, linear.weight, linear.bias), packed(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a non-contiguous input (a transposed view) gives the same numbers
        xt = torch.randn(48, 6).t()
        torch.testing.assert_close(packed(xt), F.linear(xt, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_bf16_packs_where_the_cpu_can_and_is_refused_where_it_cannot():
    linear = nn.Linear(64, 96).to(torch.bfloat16)
    if not prepacking_available(torch.bfloat16):
        with pytest.raises(RuntimeError, match="bfloat16"):
            prepack_linear_weights(nn.Sequential(linear))
        return
    packed = PrepackedLinear.from_linear(linear)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x).float(), F.linear(x, linear.weight, linear.bias).float(),
                                   rtol=2e-2, atol=2e-2)


def test_in_place_weight_updates_are_repacked():
    linear = nn.Linear(32, 40)
    packed = PrepackedLinear.from_linear(linear)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = packed(x)
        linear.weight.mul_(2.0)  # the shared parameter changes in place: the packed copy is now stale
        after = packed(x)
    torch.testing.assert_close(after, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        linear.weight.data = torch.randn(40, 32)  # a new storage (what `.to()` does)
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        packed.half()  # a dtype the CPU cannot pack: F.linear, every call
        xh = x.half()
        assert packed._usable_packed(xh) is None and packed._usable_packed(xh) is None
        assert torch.equal(packed(xh), F.linear(xh, packed.weight, packed.bias))
        packed.float()  # packable again: packed again on the next forward
        assert packed._usable_packed(x) is not None
        torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias), rtol=1e-5, atol=1e-5)


def test_autograd_falls_back_to_f_linear_with_the_same_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    packed = PrepackedLinear.from_linear(copy.deepcopy(linear))
    x = torch.randn(4, 16)
    linear(x).square().sum().backward()
    packed(x).square().sum().backward()
    assert packed.weight.grad is not None
    torch.testing.assert_close(packed.weight.grad, linear.weight.grad)
    torch.testing.assert_close(packed.bias.grad, linear.bias.grad)


def test_prepacked_target_keeps_its_parameters_and_logits():
    target = make_target("llama", tie_word_embeddings=True)
    ids = torch.randint(1, 96, (2, 11))
    with torch.no_grad():
        ref = target(ids).logits
    state = {k: v.data_ptr() for k, v in target.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in target.modules())

    assert prepack_linear_weights(target) == linears > 0
    assert is_prepacked(target) and isinstance(target.lm_head, PrepackedLinear)
    assert prepack_linear_weights(target) == 0  # idempotent
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == state  # nothing copied, nothing renamed
    assert target.lm_head.weight is target.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        packed = target(ids).logits
        with packed_path(target, enabled=False):
            unpacked = target(ids).logits
    assert is_prepacked(target)  # the context restored the packed path
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(unpacked, ref)  # the fallback is F.linear itself

    assert unpack_linear_weights(target) == linears
    assert not is_prepacked(target) and type(target.lm_head) is nn.Linear
    with torch.no_grad():
        assert torch.equal(target(ids).logits, ref)


def test_linear_subclasses_are_packed_only_when_they_opt_in():
    """Beagle's state projections (nn.Linear subclasses that keep its computation and say so) are packed with the rest
    of the draft and come back as themselves; a subclass that did not opt in is left alone."""
    from modeling_beagle import BeagleModel
    from modeling_beagle.modeling_beagle import BeagleStateProjection

    class Custom(nn.Linear):  # e.g. a quantised or otherwise customised linear: its forward is not F.linear's
        def forward(self, x):
            return super().forward(x) * 2

    target = make_target("llama")
    beagle = BeagleModel.from_target(target, query_newest_state=True, context_next_token=True).eval()
    with torch.no_grad():
        for proj in (beagle.block.state_proj, beagle.block.next_token_proj):
            proj.weight.normal_(0, 0.05)  # zero at init: give them weights whose product shows
    beagle.custom = Custom(8, 8)
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        states = target(ids, output_hidden_states=True).hidden_states[-1]
        kwargs = dict(input_ids=ids, context_states=states, context_next_ids=torch.roll(ids, -1, 1))
        ref = beagle(**kwargs).logits
    projections = sum(isinstance(m, BeagleStateProjection) for m in beagle.modules())
    plain_linears = sum(type(m) is nn.Linear for m in beagle.modules())
    assert projections == 2 and plain_linears > 0
    assert prepack_linear_weights(beagle) == plain_linears + projections
    assert isinstance(beagle.block.state_proj, PrepackedLinear) and isinstance(beagle.block.next_token_proj,
                                                                               PrepackedLinear)
    assert type(beagle.custom) is Custom  # not opted in: never swapped
    with torch.no_grad():
        assert beagle.block.state_proj._usable_packed(states) is not None
        torch.testing.assert_close(beagle(**kwargs).logits, ref, rtol=1e-4, atol=1e-4)
    unpack_linear_weights(beagle)
    assert type(beagle.block.state_proj) is BeagleStateProjection and type(beagle.block.next_token_proj) is \
        BeagleStateProjection
    with torch.no_grad():
        assert torch.equal(beagle(**kwargs).logits, ref)


def test_speculative_greedy_identity_with_a_prepacked_target_and_draft():
    """Lossless is a property of the target's own computation: a packed target verified by Beagle equals the packed
    target's plain greedy, in the chain through `generate(assistant_model=...)` and in Beagle's tree loop."""
    target, beagle = (copy.deepcopy(m) for m in trained_pair())  # the cached pair stays unpacked for other tests
    beagle.bind_target(target)
    prepack_linear_weights(target)
    prepack_linear_weights(beagle)
    beagle.config.draft_schedule = "fixed"
    beagle.config.num_draft_tokens = 4
    beagle.config.draft_confidence_threshold = 0.0
    g = torch.Generator().manual_seed(5)
    accepted = 0
    for i in range(20):
        ids = torch.randint(1, 96, (1, int(torch.randint(2, 20, (1,), generator=g))), generator=g)
        new = int(torch.randint(4, 30, (1,), generator=g))
        ref = target.generate(ids, do_sample=False, max_new_tokens=new)
        chain = target.generate(ids, do_sample=False, max_new_tokens=new, assistant_model=beagle)
        assert torch.equal(chain, ref), f"prompt {i}: chain output differs from plain greedy (packed target)"
        accepted += sum(beagle.generation_stats.accepted)
        tree = target.generate(ids, do_sample=False, max_new_tokens=new, custom_generate=beagle_generate, beagle=beagle,
                               tree_shape=TreeShape(depth=4, top_k=2, total_tokens=6))
        assert torch.equal(tree, ref), f"prompt {i}: tree output differs from plain greedy (packed target)"
    assert accepted > 20, "no multi-token rounds: the test would not exercise packed multi-row verification"


def test_reduced_draft_head_is_packed_with_the_target():
    """A draft vocabulary gathers rows of the target's head; a prepacked target gets them packed too, also when the
    target was prepacked after the draft was bound (generate's `ensure_bound_to` rebinds)."""
    from modeling_beagle import BeagleModel

    target = make_target("llama")
    beagle = BeagleModel.from_target(target, attn_implementation="eager", draft_vocab_size=48).eval()
    assert beagle._target_refs.packed_draft_head is None
    hidden = torch.randn(1, 3, target.config.hidden_size)
    with torch.no_grad():
        ref = beagle.compute_logits(hidden)
    prepack_linear_weights(target)
    beagle.ensure_bound_to(target)  # the target's lm_head module changed: bound again
    head = beagle._target_refs.packed_draft_head
    assert isinstance(head, PrepackedLinear) and head.weight.shape == (48, target.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(beagle.compute_logits(hidden), ref, rtol=1e-5, atol=1e-5)
    assert "packed_draft_head" not in str(list(beagle.state_dict()))  # derived from the target, never saved

    fresh = BeagleModel.from_target(make_target("llama"), attn_implementation="eager", draft_vocab_size=48).eval()
    other = make_target("llama")
    fresh.prepack_for_cpu(other)  # the one call a remote-code user makes: target, draft block and reduced head
    assert is_prepacked(other) and is_prepacked(fresh) and fresh._target_refs.packed_draft_head is not None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="rows_hint"):
        prepack_linear_weights(nn.Sequential(nn.Linear(4, 4)), rows_hint=0)
    with pytest.raises(TypeError, match="from_linear"):
        prepack_linear_weights(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prepack_linear_weights(torch.zeros(3))
    with pytest.raises(ValueError, match="CPU inference"):
        prepack_linear_weights(nn.Sequential(nn.Linear(4, 4, device="meta")))
