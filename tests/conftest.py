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


def markov_target():
    """A tiny target whose attention output is zeroed: its next token depends on the current token only, so its greedy
    text soon loops, and a copy round's continuation is exactly what it goes on to say."""
    target = make_target("llama", initializer_range=0.2, eos_token_id=None)
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name.endswith("o_proj.weight"):
                param.zero_()
    target.generation_config.pad_token_id = 0
    return target


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


def briefly_train(beagle, target, steps: int = 500, batch: int = 16, length: int = 40, seed: int = 0):
    """A few hundred offset-1 steps on the target's own sampled text: enough for the draft to agree with the
    target often, so speculative rounds accept multi-token drafts (a random draft almost never does)."""
    from trainer.objectives import next_token_ids

    g = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    with torch.no_grad():
        prompts = torch.randint(1, vocab, (64, 4), generator=g)
        torch.manual_seed(seed)
        texts = target.generate(prompts, do_sample=True, max_new_tokens=length - 4, min_new_tokens=length - 4,
                                pad_token_id=0, eos_token_id=None)
        out = target(texts, output_hidden_states=True)
        states, soft = out.hidden_states[-1], out.logits.softmax(-1)
        next_ids = next_token_ids(texts)  # the token after each state (context_next_token)
    optimizer = torch.optim.AdamW([p for p in beagle.parameters() if p.requires_grad], lr=3e-3)
    beagle.train()
    for _ in range(steps):
        rows = torch.randint(0, texts.shape[0], (batch,), generator=g)
        pred = beagle(input_ids=texts[rows], context_states=states[rows], context_next_ids=next_ids[rows]).logits
        loss = -(soft[rows] * pred.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return beagle.eval()


_TRAINED = {}


def trained_pair(family: str = "llama", **beagle_overrides):
    """(target, briefly trained Beagle) for a peaky tiny target; cached per process."""
    key = (family, tuple(sorted(beagle_overrides.items())))
    if key not in _TRAINED:
        from modeling_beagle import BeagleModel

        target = make_target(family, initializer_range=0.2)
        with torch.no_grad():  # damp the layers: the next token then depends mostly, not only, on the current one
            for name, param in target.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.mul_(0.05)
        target.generation_config.pad_token_id = 0
        torch.manual_seed(1)
        beagle = BeagleModel.from_target(target, attn_implementation="eager", noise_type="none", **beagle_overrides)
        _TRAINED[key] = (target, briefly_train(beagle, target))
    return _TRAINED[key]
