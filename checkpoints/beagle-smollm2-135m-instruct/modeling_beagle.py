"""Beagle: a speculative-decoding draft model whose single block attends to the target's hidden states only.

    y_p = x_p + o_proj(Attn(q = q_proj(norm_q(x_p)), k, v = k_proj / v_proj(norm_kv(c_j)) for allowed j))
    z_p = y_p + MLP(norm_mlp(y_p))
    logits_p = lm_head(z_p)          # the target's head, shared and frozen

`x_p` is the target's token embedding of t_p; the context states `c_j` are true target states `h_j` or Beagle's own
draft states from earlier steps of the same round. See `method.md` §1.
"""

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .cache_beagle import BeagleCache
from .configuration_beagle import BeagleConfig, BeagleConfigError, BeagleTargetWarning, target_name_differs
from .decoding_beagle import (
    CHAIN_LOOKUP_MATCH,
    CHAIN_LOOKUP_MATCH_SAMPLING,
    LOOKUP_RULES,
    beagle_generate,
    generate_with_own_loop,
    resolve_prompt_lookup,
)
from .generation_beagle import (
    BeagleCandidateGenerator,
    BeagleGenerationError,
    BeagleHookUnavailableError,
    ChainLookup,
    attach_to_target,
    chain_settings,
    check_assisted_generation_config,
    check_generation_config,
    detach_from_target,
    install_generate_hook,
    unavailable_message,
)
from .masking_beagle import alibi_slopes, context_causal_mask, key_distances, to_attention_mask
from .prepack_beagle import PrepackedLinear, prepack_linear_weights, prepacking_available, uses_packed_path


# Written into every saved checkpoint as `custom_generate/generate.py`, so that
# `target.generate(ids, custom_generate=<beagle folder>, assistant_model=beagle, trust_remote_code=True)` runs Beagle's
# own decoding loop (trees, batches). The loop itself ships with the model's remote code.
CUSTOM_GENERATE_SOURCE = '''"""Beagle's speculative decoding loop (draft trees, batches), for transformers' `custom_generate`."""


def generate(model, *args, assistant_model=None, **kwargs):
    run = getattr(assistant_model, "beagle_generate_with_own_loop", None)
    if run is None:
        raise ValueError(
            "custom_generate from a Beagle checkpoint expected `assistant_model=<the Beagle model>`, found "
            f"{type(assistant_model).__name__}."
        )
    return run(model, *args, **kwargs)
'''


class BeagleCheckpointError(ValueError):
    """A checkpoint's tensors do not match the model its config describes."""


@dataclass
class BeagleOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, num_queries, hidden_size)`):
            ĥ_p, Beagle's estimate of the target's state at each query position (it predicts t_{p+1}).
        logits (`torch.FloatTensor` of shape `(batch, num_queries, vocab)`, *optional*):
            Draft logits over the draft vocabulary (the target's, or the reduced one; see `draft_to_target`).
        cache (`BeagleCache`, *optional*): the cache, updated with the context passed in (also `past_key_values`).
    """

    last_hidden_state: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: BeagleCache | None = None  # transformers 5.24 renames any `past_key_values=` output field to `cache`

    @property
    def past_key_values(self) -> BeagleCache | None:
        return self.cache


_dataclass_init = BeagleOutput.__init__


def _init_accepting_past_key_values(self, *args, past_key_values=None, **kwargs):
    """`BeagleOutput(past_key_values=...)` as before transformers 5.24 (which renames the keyword to `cache` itself)."""
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    _dataclass_init(self, *args, **kwargs)


BeagleOutput.__init__ = _init_accepting_past_key_values


@dataclass
class _TargetRefs:
    """The target's modules Beagle uses by reference (never registered as submodules, never saved)."""

    embed_tokens: nn.Module
    lm_head: nn.Module
    # The reduced-vocabulary head rows, packed for oneDNN when the target's lm_head is prepacked (`prepack_beagle`).
    packed_draft_head: nn.Module | None = None


class BeagleRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class BeagleRotaryEmbedding(nn.Module):
    """The target family's rotary embedding, evaluated at arbitrary (query or key) positions."""

    def __init__(self, config: BeagleConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: BeagleConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `(batch, heads, n, head_dim)` by `cos`/`sin` `(batch, n, rotary_dim)`.

    Queries and keys sit at different positions in cross-attention, so each is rotated on its own.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def newest_state_features(features: torch.Tensor, allowed: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Per query, the features `(batch, keys, hidden)` of the readable key at the highest position (the last true
    state, or in a draft round the parent's draft state); zero for a query that may read nothing."""
    newest = torch.where(allowed, key_positions[:, None, :], -1).argmax(dim=-1)  # (batch, queries)
    picked = features.gather(1, newest[..., None].expand(-1, -1, features.shape[-1]))
    return picked * allowed.any(dim=-1, keepdim=True).to(picked.dtype)


class BeagleMLP(nn.Module):
    def __init__(self, config: BeagleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BeagleCrossAttention(nn.Module):
    """Cross-attention from token queries to projected context states, with an optional learned null slot."""

    def __init__(self, config: BeagleConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False  # cross-attention: the mask is always explicit

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias)
        if config.null_kv_slot:
            self.null_key = nn.Parameter(torch.zeros(self.num_key_value_heads, self.head_dim))
            self.null_value = nn.Parameter(torch.zeros(self.num_key_value_heads, self.head_dim))
        else:
            self.null_key = self.null_value = None
        # slope_h of the recency bias -slope_h * (p - 1 - j) on head h's scores (config.recency_bias)
        self.recency_slopes = nn.Parameter(alibi_slopes(self.num_heads)) if config.recency_bias else None

    def project_context(
        self, states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(batch, kv_heads, n, head_dim)` of already-normalised context states."""
        shape = (*states.shape[:-1], -1, self.head_dim)
        keys = self.k_proj(states).view(shape).transpose(1, 2)
        values = self.v_proj(states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        return apply_rotary(keys, cos, sin), values

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor,
        key_distance: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, num_queries = hidden_states.shape[:2]
        query = self.q_proj(hidden_states).view(batch, num_queries, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query = apply_rotary(query, cos, sin)
        keys, values = keys.to(query.dtype), values.to(query.dtype)

        row_reads_nothing = None
        if self.null_key is not None:
            null_k = self.null_key.to(query.dtype)[None, :, None, :].expand(batch, -1, 1, -1)
            null_v = self.null_value.to(query.dtype)[None, :, None, :].expand(batch, -1, 1, -1)
            keys = torch.cat([null_k, keys], dim=2)
            values = torch.cat([null_v, values], dim=2)
            allowed = torch.cat([allowed.new_ones(batch, num_queries, 1), allowed], dim=-1)
        else:
            # A row that may read no key has no defined softmax. Let it read everything (no NaN in any backend)
            # and zero its output afterwards, so nothing it was not allowed to see reaches it.
            row_reads_nothing = ~allowed.any(dim=-1)
            allowed = allowed | row_reads_nothing[..., None]
        if keys.shape[2] == 0:  # no context at all and no null slot: attention contributes nothing
            return self.o_proj(query.new_zeros(batch, num_queries, self.num_heads * self.head_dim))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        bias = None
        if self.recency_slopes is not None:
            if key_distance is None:
                raise ValueError("BeagleCrossAttention: `key_distance` (batch, queries, keys) is required with "
                                 "recency_bias=True.")
            bias = key_distance[:, None].to(query.dtype) * -self.recency_slopes.to(query.dtype)[None, :, None, None]
            if self.null_key is not None:
                bias = nn.functional.pad(bias, (1, 0))  # the null slot is at no distance
        attention_mask = to_attention_mask(allowed, self.config._attn_implementation, query.dtype, bias=bias)
        attn_output, _ = attention_interface(
            self,
            query,
            keys,
            values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, num_queries, -1)
        if row_reads_nothing is not None:
            attn_output = attn_output.masked_fill(row_reads_nothing[..., None], 0.0)
        return self.o_proj(attn_output)


class BeagleStateProjection(nn.Linear):
    """A square projection added to a residual input, zero at init (the block then starts as the paper's):
    `query_newest_state` projects the newest (normalised) context state into a query's embedding;
    `context_next_token` projects the embedding of the token that followed a context state into that state."""

    prepack_as_linear = True  # nn.Linear's computation: `prepack_linear_weights` may pack it

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, hidden_size, bias=False)


class BeagleBlock(GradientCheckpointingLayer):
    """The single Beagle block: cross-attention then a gated MLP, each with a pre-norm and a residual."""

    def __init__(self, config: BeagleConfig):
        super().__init__()
        self.norm_q = BeagleRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_kv = BeagleRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.norm_kv else None
        self.cross_attn = BeagleCrossAttention(config)
        self.norm_mlp = BeagleRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = BeagleMLP(config)
        # config.query_newest_state: the newest readable state, projected and added to the query's token embedding
        self.state_proj = BeagleStateProjection(config.hidden_size) if config.query_newest_state else None
        # config.context_next_token: the embedding of the token that followed each state, projected and added to it
        self.next_token_proj = BeagleStateProjection(config.hidden_size) if config.context_next_token else None

    def project_context(
        self,
        states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        next_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and (with `query_newest_state`) the features a query adds when the state is its newest.

        `next_embeds`: the token embedding of the token that followed each state (`context_next_token` only).
        """
        if self.norm_kv is not None:
            states = self.norm_kv(states)
        features = self.state_proj(states) if self.state_proj is not None else None
        if self.next_token_proj is not None:
            states = states + self.next_token_proj(next_embeds)
        keys, values = self.cross_attn.project_context(states, position_embeddings)
        return keys, values, features

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor,
        key_distance: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.cross_attn(self.norm_q(hidden_states), position_embeddings, keys, values, allowed,
                                        key_distance=key_distance, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.norm_mlp(hidden_states))
        return residual + hidden_states


class BeaglePreTrainedModel(PreTrainedModel):
    config_class = BeagleConfig
    config: BeagleConfig
    base_model_prefix = "beagle"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BeagleBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BeagleCrossAttention) and module.null_key is not None:
            init.normal_(module.null_key, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.null_value)
        if isinstance(module, BeagleCrossAttention) and module.recency_slopes is not None:
            init.copy_(module.recency_slopes, alibi_slopes(module.num_heads))
        if isinstance(module, BeagleStateProjection):
            init.zeros_(module.weight)  # starts as the paper's block: queries from token embeddings alone


class BeagleModel(BeaglePreTrainedModel):
    """The Beagle draft model. It generates nothing alone: see `target.generate(ids, assistant_model=beagle)`.

    Build one for a target with [`BeagleModel.from_target`], or load a checkpoint with `from_pretrained` and attach
    the target with [`BeagleModel.bind_target`]. The target's token embedding and lm_head are used by reference
    (frozen, never copied) unless the config says the checkpoint carries its own copies.
    """

    def __init__(self, config: BeagleConfig):
        super().__init__(config)
        num_fused = config.num_target_layers_fused
        self.fc = nn.Linear(num_fused * config.hidden_size, config.hidden_size, bias=False) if num_fused > 1 else None
        self.block = BeagleBlock(config)
        self.norm = BeagleRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.final_norm else None
        self.rotary_emb = BeagleRotaryEmbedding(config)
        head_size = config.draft_vocab_size or config.vocab_size
        if config.draft_vocab_size is not None:
            self.draft_to_target = nn.Buffer(torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_to_target = None
        if config.carry_target_embeddings:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.lm_head = nn.Linear(config.hidden_size, head_size, bias=False)
            self.embed_tokens.requires_grad_(False)
            self.lm_head.requires_grad_(False)
        else:
            self.embed_tokens = None
            self.lm_head = None
        # Reduced-vocabulary head rows gathered from a bound target's lm_head (not saved: derived from the target).
        self.draft_head_weight = None
        self._target_refs: _TargetRefs | None = None
        self.gradient_checkpointing = False
        self.post_init()

    # ---------------------------------------------------------------------------------------------- the target
    @classmethod
    def from_target(cls, target_model: PreTrainedModel, **overrides) -> "BeagleModel":
        """A freshly initialised Beagle sized from `target_model` and bound to it.

        `overrides` set `BeagleConfig` fields (method options, `target_model_name_or_path`, `attn_implementation`,
        ...). Attention biases follow the target's own q/k/v projections unless overridden.
        """
        attn_implementation = overrides.pop("attn_implementation", None)
        dtype = overrides.pop("dtype", None)
        if "attention_bias" not in overrides:
            q_proj = next((m.q_proj for m in target_model.modules() if isinstance(getattr(m, "q_proj", None), nn.Linear)), None)
            if q_proj is not None:
                overrides["attention_bias"] = q_proj.bias is not None
        config = BeagleConfig.from_target_config(target_model.config, **overrides)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = cls(config)
        if dtype is not None:
            model = model.to(dtype)
        model.bind_target(target_model)
        if config.carry_target_embeddings:
            model.copy_target_embeddings()
        return model

    def bind_target(self, target_model: PreTrainedModel) -> "BeagleModel":
        """Attach the target whose states Beagle reads: its embedding and lm_head are used by reference.

        Raises `BeagleConfigError` naming the field if the target's hidden size, head layout, vocabulary or rotary
        settings differ from this draft's config. Binding freezes the target's input embedding and lm_head.
        """
        self.config.check_target_config(target_model.config)
        embed = target_model.get_input_embeddings()
        head = target_model.get_output_embeddings()
        where = f"target {type(target_model).__name__} does not match the Beagle config"
        if embed is None or head is None:
            raise BeagleConfigError(f"{where}: expected an input embedding and an lm_head, found embedding="
                                    f"{type(embed).__name__}, lm_head={type(head).__name__}.")
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(embed.weight.shape) != expected:
            raise BeagleConfigError(f"{where}: input embedding shape expected {expected}, found {tuple(embed.weight.shape)}.")
        if tuple(head.weight.shape) != expected:
            raise BeagleConfigError(f"{where}: lm_head weight shape expected {expected}, found {tuple(head.weight.shape)}.")
        embed.requires_grad_(False)
        head.requires_grad_(False)
        self._target_refs = _TargetRefs(embed_tokens=embed, lm_head=head)
        if self.draft_to_target is not None and self.lm_head is None:
            self._gather_draft_head()
        found = getattr(target_model, "name_or_path", "") or ""
        if self.config.target_model_name_or_path is None and found:
            self.config.target_model_name_or_path = found
        elif target_name_differs(self.config.target_model_name_or_path, found):
            warnings.warn(
                f"this Beagle was trained for {self.config.target_model_name_or_path}, and is bound to {found}: if that "
                "is another model (a base model, another fine-tune), its drafts are accepted less often and generation "
                "is slower (the output stays exact). Train a Beagle for it with `beagle train`.",
                BeagleTargetWarning, stacklevel=3,
            )
        return self

    def _gather_draft_head(self) -> None:
        """The draft vocabulary's rows of the bound target's lm_head (packed too if the target's head is prepacked)."""
        head = self._target_refs.lm_head
        self.draft_head_weight = head.weight.detach()[self.draft_to_target.to(head.weight.device)]
        packed = uses_packed_path(head)
        self._target_refs.packed_draft_head = PrepackedLinear.from_weight(self.draft_head_weight) if packed else None

    def prepack_for_cpu(self, target_model: PreTrainedModel) -> "BeagleModel":
        """CPU inference: pack the target's and this draft's linear weights for oneDNN ([`prepack_linear_weights`]:
        cheaper multi-token verification, same parameters) and bind the target again so that the draft's reduced head
        is packed too. Compare outputs against the packed target's own plain decoding."""
        prepack_linear_weights(target_model)
        prepack_linear_weights(self)
        return self.bind_target(target_model)

    def can_prepack_for_cpu(self) -> bool:
        """Whether [`prepack_for_cpu`] can run here: this draft is on the CPU, and this torch build and CPU can pack
        linear weights of its dtype (bfloat16 needs AVX512-BF16-class or AVX-NE-CONVERT support)."""
        return self.device.type == "cpu" and prepacking_available(self.dtype)

    @property
    def is_bound(self) -> bool:
        return self._target_refs is not None or self.embed_tokens is not None

    @torch.no_grad()
    def copy_target_embeddings(self) -> None:
        """Fill the carried embedding/head copies from the bound target (checkpoints usable without the target)."""
        if self.embed_tokens is None:
            raise BeagleConfigError("BeagleModel.copy_target_embeddings: `carry_target_embeddings` expected True, found False.")
        if self._target_refs is None:
            raise RuntimeError("BeagleModel.copy_target_embeddings: bind a target first (`bind_target`).")
        self.embed_tokens.weight.copy_(self._target_refs.embed_tokens.weight)
        head = self._target_refs.lm_head.weight
        if self.draft_to_target is not None:
            head = head[self.draft_to_target.to(head.device)]
        self.lm_head.weight.copy_(head)

    def set_draft_vocabulary(self, draft_to_target: torch.Tensor) -> None:
        """Install the reduced draft vocabulary: `draft_to_target[i]` is the target id of draft token i."""
        if self.draft_to_target is None:
            raise BeagleConfigError("BeagleModel.set_draft_vocabulary: `draft_vocab_size` expected an integer, found None.")
        if draft_to_target.shape != self.draft_to_target.shape:
            raise BeagleConfigError(f"draft_to_target: shape expected {tuple(self.draft_to_target.shape)}, "
                                    f"found {tuple(draft_to_target.shape)}.")
        if draft_to_target.min() < 0 or draft_to_target.max() >= self.config.vocab_size:
            raise BeagleConfigError(f"draft_to_target: ids expected in [0, {self.config.vocab_size}), found "
                                    f"[{int(draft_to_target.min())}, {int(draft_to_target.max())}].")
        self.draft_to_target.copy_(draft_to_target)
        if self._target_refs is not None and self.lm_head is None:
            self._gather_draft_head()
        elif self._target_refs is not None:
            self.copy_target_embeddings()

    def get_input_embeddings(self) -> nn.Module | None:
        if self.embed_tokens is not None:
            return self.embed_tokens
        return self._target_refs.embed_tokens if self._target_refs is not None else None

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise RuntimeError(
                "BeagleModel has no token embedding or lm_head: bind the target first with `beagle.bind_target(target)` "
                "(or build with `BeagleModel.from_target(target)`, or use a checkpoint with carry_target_embeddings=True)."
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """x_p: the target's token embedding of `input_ids`, in Beagle's dtype (no gradient reaches the target)."""
        self._require_bound()
        with torch.no_grad():
            embeds = self.get_input_embeddings()(input_ids)
        return embeds.to(self.block.norm_q.weight.dtype)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft logits of ĥ through the (shared, frozen) head, over the draft vocabulary."""
        self._require_bound()
        if self.lm_head is not None:
            logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))
        elif self.draft_head_weight is not None:
            hidden_states = hidden_states.to(self.draft_head_weight.dtype)
            packed = self._target_refs.packed_draft_head
            logits = packed(hidden_states) if packed is not None else F.linear(hidden_states, self.draft_head_weight)
        else:
            head = self._target_refs.lm_head
            logits = head(hidden_states.to(head.weight.dtype))
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------------------------------------ context
    def _add_state_noise(self, states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.config.noise_type == "none" or self.config.noise_scale == 0:
            return states
        if self.config.noise_type == "uniform":
            noise = (torch.rand_like(states) * 2 - 1) * self.config.noise_scale
        else:
            noise = torch.randn_like(states) * self.config.noise_scale
        return states + noise

    def project_context(
        self, states: torch.Tensor, position_ids: torch.Tensor, draft: bool = False,
        next_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and newest-state features (`query_newest_state`; else None) of context states at `position_ids`.

        True states (`draft=False`) have the target's layout: `hidden_size` features, or the concatenation of
        `len(target_layer_ids)` layers, fused by `fc`. In training mode they receive the configured noise.
        Draft states are Beagle's own outputs (`hidden_size`). `next_ids` `(batch, n)`: the token that followed each
        state, read with it under `context_next_token` (required then, unused otherwise).
        """
        dtype = self.block.norm_q.weight.dtype
        expected = self.config.hidden_size * (1 if draft else self.config.num_target_layers_fused)
        kind = "draft_states" if draft else "context_states"
        if states.dim() != 3 or states.shape[-1] != expected:
            raise ValueError(f"BeagleModel: `{kind}` shape expected (batch, n, {expected}), found {tuple(states.shape)}.")
        if position_ids.shape != states.shape[:2]:
            raise ValueError(f"BeagleModel: positions of `{kind}` shape expected {tuple(states.shape[:2])}, "
                             f"found {tuple(position_ids.shape)}.")
        next_embeds = None
        if self.config.context_next_token:
            ids_name = "draft_next_ids" if draft else "context_next_ids"
            if next_ids is None or next_ids.shape != states.shape[:2]:
                found = "None" if next_ids is None else tuple(next_ids.shape)
                raise ValueError(f"BeagleModel: `{ids_name}` (the token that followed each of `{kind}`, read with it: "
                                 f"context_next_token=True) shape expected {tuple(states.shape[:2])}, found {found}.")
            next_embeds = self.embed(next_ids)
        states = states.to(dtype)
        if not draft:
            states = self._add_state_noise(states)
            if self.fc is not None:
                states = self.fc(states)
        position_embeddings = self.rotary_emb(states, position_ids)
        return self.block.project_context(states, position_embeddings, next_embeds)

    def new_draft_cache(self) -> BeagleCache:
        """An empty cache of the kind this draft reads (Beagle's own decoding loop asks the draft for it, so another
        draft with the same drafting interface can bring its own)."""
        return BeagleCache()

    def append_context(
        self,
        cache: BeagleCache,
        states: torch.Tensor,
        position_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        draft: bool = False,
        next_ids: torch.Tensor | None = None,
    ) -> BeagleCache:
        """Project context states into `cache` without running any query (the nearly free prefill). `next_ids`: the
        token that followed each state (`context_next_token`)."""
        keys, values, features = self.project_context(states, position_ids, draft=draft, next_ids=next_ids)
        cache.append(keys, values, position_ids, valid, draft=draft, features=features)
        return cache

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        context_states: torch.Tensor | None = None,
        context_position_ids: torch.LongTensor | None = None,
        context_valid: torch.BoolTensor | None = None,
        context_next_ids: torch.LongTensor | None = None,
        draft_states: torch.Tensor | None = None,
        draft_position_ids: torch.LongTensor | None = None,
        draft_next_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: BeagleCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> BeagleOutput:
        r"""
        Args:
            input_ids (`(batch, q)`): the query tokens t_p (or pass `inputs_embeds`).
            position_ids (`(batch, q)`): their positions p. Defaults to `0..q-1` without a cache.
            context_states (`(batch, n, hidden * len(target_layer_ids))`): true target states h_j to read (appended to
                the cache when one is given).
            context_position_ids (`(batch, n)`): their positions j. Defaults to `0..n-1`.
            context_valid (`(batch, n)` bool): `False` marks padding states.
            context_next_ids (`(batch, n)`): the token that followed each true state (t_{j+1} for h_j), read with it
                when `config.context_next_token` (required then, unused otherwise).
            draft_states (`(batch, m, hidden)`): Beagle's own earlier outputs ĥ_j to read (appended to the cache as
                draft states, dropped at the round's end by `cache.discard_drafts()`).
            draft_position_ids (`(batch, m)`): their positions j.
            draft_next_ids (`(batch, m)`): the token that followed each draft state on its path
                (`config.context_next_token`).
            attention_mask (`(batch, q, keys)` or `(batch, 1, q, keys)` bool): which keys each query reads, over
                `[true states; draft states]` (or over every cache slot). Default: keys at positions j < p. Padding
                keys are always excluded.
            past_key_values (`BeagleCache`): projected context from earlier calls.
            return_logits (`bool`): compute draft logits (skip to save the head's cost when only ĥ is needed).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BeagleModel: pass exactly one of `input_ids` and `inputs_embeds`.")
        hidden_states = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(self.block.norm_q.weight.dtype)
        batch, num_queries = hidden_states.shape[:2]
        device = hidden_states.device
        if position_ids is None:
            if past_key_values is not None:
                raise ValueError("BeagleModel: `position_ids` are required with a cache (query positions are not "
                                 "implied by the number of cached states).")
            position_ids = torch.arange(num_queries, device=device).expand(batch, -1)

        sources = []  # (keys, values, positions, valid, draft, features)
        if context_states is not None:
            if context_position_ids is None:
                context_position_ids = torch.arange(context_states.shape[1], device=device).expand(batch, -1)
            keys, values, features = self.project_context(context_states, context_position_ids, draft=False,
                                                          next_ids=context_next_ids)
            sources.append((keys, values, context_position_ids, context_valid, False, features))
        if draft_states is not None:
            if draft_position_ids is None:
                raise ValueError("BeagleModel: `draft_position_ids` are required with `draft_states`.")
            keys, values, features = self.project_context(draft_states, draft_position_ids, draft=True,
                                                          next_ids=draft_next_ids)
            sources.append((keys, values, draft_position_ids, None, True, features))

        features = None
        if past_key_values is not None:
            for keys, values, positions, valid, draft, source_features in sources:
                past_key_values.append(keys, values, positions, valid, draft=draft, features=source_features)
            keys, values = past_key_values.keys, past_key_values.values
            key_positions, key_valid = past_key_values.positions, past_key_values.valid
            features = past_key_values.features
        elif sources:
            keys = torch.cat([s[0] for s in sources], dim=2)
            values = torch.cat([s[1] for s in sources], dim=2)
            key_positions = torch.cat([s[2] for s in sources], dim=1)
            key_valid = torch.cat(
                [s[3] if s[3] is not None else torch.ones_like(s[2], dtype=torch.bool) for s in sources], dim=1
            )
            if self.block.state_proj is not None:
                features = torch.cat([s[5] for s in sources], dim=1)
        else:
            kv_shape = (batch, self.config.num_key_value_heads, 0, self.config.head_dim)
            keys = values = hidden_states.new_zeros(kv_shape)
            key_positions = torch.zeros(batch, 0, dtype=torch.long, device=device)
            key_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)

        num_keys = keys.shape[2]
        if attention_mask is None:
            allowed = context_causal_mask(position_ids, key_positions)
        else:
            allowed = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
            if allowed.shape != (batch, num_queries, num_keys):
                raise ValueError(f"BeagleModel: `attention_mask` shape expected {(batch, num_queries, num_keys)} "
                                 f"(batch, queries, keys), found {tuple(attention_mask.shape)}.")
            if allowed.dtype != torch.bool:
                raise ValueError(f"BeagleModel: `attention_mask` dtype expected torch.bool, found {allowed.dtype}.")
        allowed = allowed & key_valid[:, None, :]
        if self.block.state_proj is not None and num_keys:
            hidden_states = hidden_states + newest_state_features(features, allowed, key_positions)

        key_distance = key_distances(position_ids, key_positions) if self.config.recency_bias else None
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.block(hidden_states, position_embeddings, keys, values, allowed, key_distance=key_distance,
                                   **kwargs)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        logits = self.compute_logits(hidden_states) if return_logits else None
        return BeagleOutput(last_hidden_state=hidden_states, logits=logits, cache=past_key_values)

    # ------------------------------------------------------------------------------------------- generation
    def beagle_check_generation(self, target_model, generation_mode, generation_config) -> None:
        """Called by the generation hook before `target.generate` starts: refuse what Beagle cannot honour."""
        check_generation_config(generation_config)
        check_assisted_generation_config(generation_config)
        chain_settings(self.config, generation_config)  # refuses bad assistant settings before the prefill
        if generation_mode != "assisted_generation":
            raise BeagleGenerationError(
                f"generation mode expected greedy or sampling (assisted generation) with a Beagle assistant, found "
                f"{generation_mode!r}: drop the flags that select it (num_beams, penalty_alpha, constraints, dola_layers)."
            )
        self.ensure_bound_to(target_model)

    def beagle_candidate_generator(self, target_model, generation_config, logits_processor) -> BeagleCandidateGenerator:
        """Called by the generation hook when this Beagle is passed as `assistant_model` to `target.generate`.

        `prompt_lookup_num_tokens=N` (transformers' prompt-lookup setting) adds copy rounds: where the text's last
        `CHAIN_LOOKUP_MATCH` (2; when sampling `CHAIN_LOOKUP_MATCH_SAMPLING`, 4) or more tokens repeat an earlier
        passage (the longest repeated suffix, up to `max_matching_ngram_size` tokens, default 32), the round proposes
        the N tokens that followed it instead of a draft chain (`ChainLookup`)."""
        check_generation_config(generation_config)
        self.ensure_bound_to(target_model)
        lookup_tokens, max_ngram = resolve_prompt_lookup(generation_config,
                                                         default_tokens=self.config.default_prompt_lookup_num_tokens)
        lookup = None
        if lookup_tokens:
            rule = LOOKUP_RULES["suffix"]
            copy_match = CHAIN_LOOKUP_MATCH_SAMPLING if generation_config.do_sample else CHAIN_LOOKUP_MATCH
            lookup = ChainLookup(rule.match, rule.continuation, lookup_tokens, max_ngram, copy_match)
        return BeagleCandidateGenerator(self, generation_config, logits_processor, lookup=lookup)

    def ensure_bound_to(self, target_model: PreTrainedModel) -> None:
        """Bind `target_model` unless it is already the bound target (a target that does not match is refused)."""
        refs = self._target_refs
        if (refs is None or refs.embed_tokens is not target_model.get_input_embeddings()
                or refs.lm_head is not target_model.get_output_embeddings()):  # e.g. prepacked since binding
            self.bind_target(target_model)

    def attach(self, target_model: PreTrainedModel) -> "BeagleModel":
        """Bind `target_model` and make only that instance dispatch `generate(..., assistant_model=beagle)` to Beagle.

        Patches nothing global: the alternative to the import-time hook (disable it with
        BEAGLE_DISABLE_GENERATE_HOOK=1).
        """
        self.bind_target(target_model)
        attach_to_target(target_model)
        return self

    def detach(self, target_model: PreTrainedModel) -> None:
        detach_from_target(target_model)

    # Beagle's own loop (trees, batches), for `target.generate(..., custom_generate=...)`.
    beagle_decoding_loop = staticmethod(beagle_generate)

    def beagle_generate_with_own_loop(self, target_model: PreTrainedModel, *args, **kwargs):
        """`target_model.generate(*args, **kwargs)` through Beagle's own loop (`generate_with_own_loop`)."""
        return generate_with_own_loop(target_model, self, *args, **kwargs)

    def __getattr__(self, name: str):
        # A draft cannot generate alone: `beagle.generate(...)` and `beagle.generation_config` (which transformers'
        # stock assisted decoding reads first when the hook did not dispatch to Beagle) explain what to call instead.
        # Not a `generate` method: transformers would take the class for a generating one (AutoModel mixes
        # GenerationMixin into remote code that defines `generate`, binding the folder's custom_generate to the draft).
        if name in ("generate", "generation_config"):
            raise BeagleHookUnavailableError(unavailable_message())
        return super().__getattr__(name)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config (with `auto_map` for AutoConfig, AutoModel and AutoModelForCausalLM), safetensors weights
        and the remote-code modeling files. The target's embedding and head are saved only when carried."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("BeagleModel.save_pretrained: `safe_serialization` expected True, found False "
                             "(Beagle checkpoints are safetensors only).")
        module = type(self).__module__.split(".")[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForCausalLM", f"{module}.{type(self).__name__}")
        self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        custom_generate = os.path.join(save_directory, "custom_generate")
        os.makedirs(custom_generate, exist_ok=True)
        with open(os.path.join(custom_generate, "generate.py"), "w") as handle:
            handle.write(CUSTOM_GENERATE_SOURCE)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint with missing, unexpected or misshaped tensors is an
        error (`BeagleCheckpointError`), never a silently re-initialised model."""
        if kwargs.get("ignore_mismatched_sizes"):
            raise BeagleCheckpointError("BeagleModel.from_pretrained: `ignore_mismatched_sizes` expected False, found "
                                        "True (a draft with re-initialised tensors would be silently wrong).")
        want_info = kwargs.pop("output_loading_info", False)
        # Load permissively to collect every problem with its shapes, then refuse the model if there is any.
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs
            )
        except SafetensorError as error:  # a cut-off or corrupt weights file
            raise BeagleCheckpointError(f"checkpoint {pretrained_model_name_or_path}: its weights expected a complete "
                                        f"safetensors file, found an unreadable one ({error}).") from error
        problems = []
        for key, found, expected in sorted(info.get("mismatched_keys", [])):
            problems.append(f"tensor {key!r}: shape expected {tuple(expected)}, found {tuple(found)}")
        for key in sorted(info.get("missing_keys", [])):
            problems.append(f"tensor {key!r}: expected in the checkpoint, found missing")
        for key in sorted(info.get("unexpected_keys", [])):
            problems.append(f"tensor {key!r}: expected absent (not part of this config's model), found present")
        if problems:
            raise BeagleCheckpointError(f"checkpoint {pretrained_model_name_or_path} does not match its config: "
                                        + "; ".join(problems))
        return (model, info) if want_info else model


__all__ = ["BeagleModel", "BeaglePreTrainedModel", "BeagleOutput", "BeagleCheckpointError", "BeagleBlock"]


# Remote code: `save_pretrained` copies this file (and its single-dot imports) next to the weights and writes
# `auto_map`, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works anywhere.
BeagleConfig.register_for_auto_class()
BeagleModel.register_for_auto_class("AutoModel")

# `target.generate(ids, assistant_model=beagle)` dispatches to Beagle's candidate generator (idempotent, guarded).
install_generate_hook()
