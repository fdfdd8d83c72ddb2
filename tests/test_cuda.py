"""CUDA-only checks: the GPU path is the same code with bf16 weights and sdpa/flash/flex kernels.

Skipped cleanly on machines without a CUDA GPU (every CI machine here).
"""

import copy
import importlib.util
import math

import pytest
import torch
from conftest import make_target, target_states, trained_pair
from test_decoding import SHAPES
from test_training import tiny_dataset

from modeling_beagle import BeagleCache, BeagleModel, beagle_generate
from trainer import BeagleTrainer, BeagleTrainingArguments

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _pair(attn):
    target = make_target("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2).cuda()
    beagle = BeagleModel.from_target(target, attn_implementation=attn).cuda().eval()
    return target, beagle


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_bf16_backends_match_eager_fp32(attn):
    target, beagle = _pair("eager")
    ids = torch.randint(0, 96, (2, 16), device="cuda")
    h = target_states(target, ids)
    ref = beagle(input_ids=ids, context_states=h).last_hidden_state
    beagle = beagle.to(torch.bfloat16)
    beagle.set_attn_implementation(attn)
    out = beagle(input_ids=ids, context_states=h.bfloat16()).last_hidden_state
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_chain_step_matches_sdpa():
    target, beagle = _pair("sdpa")
    beagle = beagle.to(torch.bfloat16)
    ids = torch.randint(0, 96, (1, 12), device="cuda")
    h = target_states(target, ids).bfloat16()
    outs = []
    for attn in ("sdpa", "flash_attention_2"):
        beagle.set_attn_implementation(attn)
        cache = BeagleCache()
        beagle.append_context(cache, h[:, :11], torch.arange(11, device="cuda")[None])
        outs.append(beagle(input_ids=ids[:, 11:], position_ids=torch.tensor([[11]], device="cuda"),
                           past_key_values=cache).last_hidden_state)
    assert (outs[0].float() - outs[1].float()).norm() / outs[0].float().norm() < 0.02


def _pair_on_cuda(dtype):
    """The briefly trained tiny pair, copied to the GPU in `dtype` (the cached CPU pair stays as it is)."""
    target, beagle = (copy.deepcopy(m).to("cuda", dtype) for m in trained_pair())
    beagle.set_attn_implementation("sdpa")
    return target, beagle.bind_target(target)


def _speculative_outputs(target, beagle, prompts: int, new_tokens: int):
    """(plain greedy, assisted chain, Beagle tree loop) outputs for random prompts, and the accepted draft tokens."""
    g = torch.Generator().manual_seed(5)
    accepted = 0
    for i in range(prompts):
        ids = torch.randint(3, 96, (1, 1 + i % 12), generator=g).cuda()
        ref = target.generate(ids, do_sample=False, max_new_tokens=new_tokens)
        chain = target.generate(ids, do_sample=False, max_new_tokens=new_tokens, assistant_model=beagle)
        accepted += sum(beagle.generation_stats.accepted)
        tree = target.generate(ids, custom_generate=beagle_generate, beagle=beagle, tree_shape=SHAPES[1 + i % 3],
                               do_sample=False, max_new_tokens=new_tokens)
        yield ref, chain, tree, accepted


def test_greedy_identity_on_cuda_fp32_chain_and_tree():
    """The GPU path is the CPU path: fp32 greedy speculative output equals plain greedy token for token."""
    accepted = 0
    for ref, chain, tree, accepted in _speculative_outputs(*_pair_on_cuda(torch.float32), prompts=24, new_tokens=32):
        assert torch.equal(chain, ref) and torch.equal(tree, ref)
    assert accepted > 24  # drafts were accepted, so the comparison exercised multi-token verification


def test_bf16_speculative_generation_on_cuda_agrees_with_bf16_greedy():
    """bf16 verification of several tokens rounds differently from one-token decoding and may flip a near-tie, so
    this asserts agreement on most prompts (a wrong acceptance rule would differ on nearly all of them)."""
    same = total = 0
    for ref, chain, tree, _ in _speculative_outputs(*_pair_on_cuda(torch.bfloat16), prompts=16, new_tokens=32):
        same += int(torch.equal(chain, ref)) + int(torch.equal(tree, ref))
        total += 2
    assert same >= 0.75 * total


def test_trainer_trains_on_cuda_with_bf16_by_default(tmp_path):
    """With no precision flag the trainer picks bf16 mixed precision on a bf16 GPU, moves the frozen target there,
    keeps float32 master weights, and both stages give finite, changing losses."""
    target = make_target("llama", initializer_range=0.2)
    data = tiny_dataset(target)
    torch.manual_seed(0)
    beagle = BeagleModel.from_target(target, noise_type="none")
    before = {k: v.detach().clone() for k, v in beagle.named_parameters() if v.requires_grad}
    args = BeagleTrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                   learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                                   stage1_window=3, stage2_steps=2)
    assert args.bf16 is True
    trainer = BeagleTrainer(model=beagle, args=args, target_model=target, train_dataset=data)
    trainer.train()
    assert next(trainer.target_model.parameters()).is_cuda
    params = {k: v for k, v in beagle.named_parameters() if v.requires_grad}
    assert all(v.is_cuda and v.dtype == torch.float32 for v in params.values())
    assert any(not torch.equal(before[k], v.detach().cpu()) for k, v in params.items())
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
