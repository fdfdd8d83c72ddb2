"""Tiny target models built from configs in code (no downloads) and helpers shared by the tests."""

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"head_dim": 16, "sliding_window": None}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
}


def make_target(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval()


def target_states(target: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The target's top-layer, post-final-norm states (what its lm_head reads)."""
    with torch.no_grad():
        return target(input_ids, output_hidden_states=True).hidden_states[-1]


@pytest.fixture
def llama_target():
    return make_target("llama")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
