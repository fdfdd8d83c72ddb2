"""CUDA-only checks: the GPU path is the same code with bf16 weights and sdpa/flash/flex kernels.

Skipped cleanly on machines without a CUDA GPU (every CI machine here).
"""

import importlib.util

import pytest
import torch
from conftest import make_target, target_states

from modeling_beagle import BeagleCache, BeagleModel

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
