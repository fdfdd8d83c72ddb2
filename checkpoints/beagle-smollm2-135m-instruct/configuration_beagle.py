"""Configuration of the Beagle draft model (Budget EAGLE, arXiv 2505.24544).

The first group of fields is copied from the target model's config: the draft block shares the target's
width, attention layout, rotary embedding and vocabulary. The second group records which target the draft
belongs to. The third group holds the choices the paper leaves open (`method.md` §4), with our defaults.
"""

import inspect
from typing import Any, Literal

from transformers import PreTrainedConfig


class BeagleConfigError(ValueError):
    """A config field is out of range, or a target does not match the draft's config."""


def _mismatch(field: str, expected: Any, found: Any, where: str) -> BeagleConfigError:
    return BeagleConfigError(f"{where}: `{field}` expected {expected!r}, found {found!r}.")


# Fields the draft must share with its target: it reads the target's states, embeddings and head, and places its
# queries and keys on the target's rotary positions.
TARGET_SHARED_FIELDS = (
    "hidden_size",
    "rope_parameters",
    "vocab_size",
)
# Fields a fresh draft copies from its target by default (method.md §1: "GQA layout copied from the target"), which
# are the draft's own: it may choose another head layout or MLP width (`from_target_config(..., num_key_value_heads=9)`)
# and still binds to the same target.
TARGET_DEFAULT_FIELDS = (
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "rms_norm_eps",
    "max_position_embeddings",
)


def _target_field(target_config: PreTrainedConfig, field: str) -> Any:
    """Read a shared field off a target config, resolving the usual spellings and derived defaults."""
    text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    if field == "head_dim":
        head_dim = getattr(text_config, "head_dim", None)
        return head_dim or text_config.hidden_size // text_config.num_attention_heads
    if field == "num_key_value_heads":
        return getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    if field == "rms_norm_eps":
        for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
            if getattr(text_config, name, None) is not None:
                return getattr(text_config, name)
        return 1e-6
    if field == "rope_parameters":
        rope = getattr(text_config, "rope_parameters", None)
        if rope is None:
            raise BeagleConfigError(
                f"target config ({type(target_config).__name__}): `rope_parameters` expected a rotary embedding "
                "description, found None. Beagle needs a target with rotary position embeddings."
            )
        if "full_attention" in rope and isinstance(rope["full_attention"], dict):  # per-layer-type rope (Gemma3)
            rope = rope["full_attention"]
        return dict(rope)
    value = getattr(text_config, field, None)
    if value is None:
        raise BeagleConfigError(
            f"target config ({type(target_config).__name__}): `{field}` expected a value, found None."
        )
    return value


def rope_mismatch(draft_rope: dict, target_rope: dict) -> str | None:
    """Name the first rotary-embedding setting on which draft and target disagree, or None."""
    keys = sorted(set(draft_rope) | set(target_rope))
    for key in keys:
        if draft_rope.get(key) != target_rope.get(key):
            return key
    return None


class BeagleTargetWarning(UserWarning):
    """The target bound to a draft is named differently from the one it was trained for."""


def target_name_differs(trained_for: str | None, found: str | None) -> bool:
    """Whether `found` (a target's `name_or_path`: a Hub id, or a local folder, possibly a cache folder named after
    one) does not contain the model name of `trained_for` (its part after the organisation, case-insensitive).
    Unknown names never differ; a name that contains it (a cache folder, a snapshot, a fine-tune's name) does not."""
    if not trained_for or not found:
        return False
    model_name = trained_for.rstrip("/").replace("\\", "/").split("/")[-1].lower()
    return model_name not in found.replace("\\", "/").lower()


class BeagleConfig(PreTrainedConfig):
    r"""
    Configuration of a [`BeagleModel`]: one decoder block whose attention is cross-attention only, reading keys and
    values from the target's hidden states.

    Args:
        vocab_size, hidden_size, rope_parameters:
            Shared with the target (see [`BeagleConfig.from_target_config`]); a target that disagrees is refused.
        intermediate_size, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, max_position_embeddings:
            The draft's own block layout; [`BeagleConfig.from_target_config`] copies them from the target unless
            overridden (e.g. more key/value heads than a GQA target, so the values carry more of each state).
        hidden_act (`str`, defaults to `"silu"`): activation of the gated MLP.
        attention_bias (`bool`): bias on the q/k/v projections (Qwen2-style targets).
        attention_output_bias (`bool`): bias on the output projection.
        mlp_bias (`bool`): bias in the MLP projections.
        final_logit_softcapping (`float`, *optional*): the target's logit soft-capping, applied to draft logits.
        target_model_name_or_path (`str`, *optional*): the target this draft was built for.
        target_model_type (`str`, *optional*): the target config's `model_type`, recorded for model cards.
        target_layer_ids (`list[int]`, defaults to `[-1]`): indices into the target's `hidden_states` output whose
            states feed the keys. `[-1]` is the top layer after the final norm (what the lm_head reads). Several
            indices are concatenated and fused by a linear layer (EAGLE-3 style).
        norm_kv (`bool`, defaults to `True`): RMSNorm on the key/value side.
        final_norm (`bool`, defaults to `False`): a learnable RMSNorm before the lm_head.
        null_kv_slot (`bool`, defaults to `True`): a learned key/value slot every query can see. It gives the first
            row (which sees no context) a defined output; without it, rows that see nothing output zero attention.
        recency_bias (`bool`, defaults to `False`): add a learned per-head penalty, slope_h * (p - 1 - j), to the
            attention score of the state at position j read by the query at p (ALiBi-style; slopes start at ALiBi's
            geometric values), so heads can favour the most recent states from the first step. Needs an attention
            kernel that adds a float mask (eager, sdpa, flex_attention).
        query_newest_state (`bool`, defaults to `False`): add a learned projection of the newest context state each
            query may read (its key at the highest position: the last true state, or the parent's draft state) to
            the query's token embedding before the block, as EAGLE's FC fuses feature and token. A departure from
            the paper's pure cross-attention (method.md §1), for measuring what the newest state is worth.
        context_next_token (`bool`, defaults to `False`): read every context state (true or draft) together with
            the token that followed it: keys and values project `norm_kv(c_j) + W e(t_{j+1})`, with W a learned
            projection of the target's token embedding, zero at init (so it starts as the paper's block). EAGLE's FC
            fuses each feature with the token that followed it in the same way. A departure from the paper's keys
            (method.md §1), for measuring what the tokens are worth; the forward then needs `context_next_ids` (and
            `draft_next_ids` with draft states).
        carry_target_embeddings (`bool`, defaults to `False`): the checkpoint carries its own frozen copies of the
            target's token embedding and (draft-vocabulary) head, so it runs without the target's weights at hand.
        draft_vocab_size (`int`, *optional*): a reduced draft vocabulary (the most frequent target tokens); the
            buffer `draft_to_target` maps draft ids to target ids. `None` uses the target's full vocabulary.
        concat_draft_states (`bool`, defaults to `True`): at inference, draft steps >= 2 also see the draft states of
            their ancestors. `False` is the "no-concatenation" mode (true states only).
        stage1_window (`int`, defaults to 5): window size k of stage-1 training.
        stage1_offset_weights (`"uniform" | "decay"`, defaults to `"uniform"`): weights of the stage-1 queries by
            their window offset i. `"uniform"` is the paper's; `"decay"` uses stage 2's β_i = k - i + 1 (scaled to
            mean 1), so the offsets a chain's τ depends on most get more of the gradient.
        stage2_steps (`int`, defaults to 4): simulation steps S of stage-2 training (window k = S).
        offset_range (`int`, *optional*): random window offsets are drawn from `[0, offset_range)`; `None` means
            `[0, k)`.
        noise_type (`"uniform" | "gaussian" | "none"`, defaults to `"uniform"`): noise added to true states during
            training.
        noise_scale (`float`, defaults to 0.2): scale of that noise (half-width for uniform, sigma for gaussian).
        smooth_l1_weight (`float`, defaults to 10.0): lambda_v, the weight of the SmoothL1 state-regression loss.
        tv_weight (`float`, defaults to 0.0): weight of the total variation 1 - sum(min(P, Q)) between the target's and
            the draft's next-token distributions, added to the CE (0: CE and SmoothL1 only, the paper's loss).
        grad_through_draft_states (`bool`, defaults to `False`): stage 2 back-propagates through the draft-state
            buffer across simulation steps instead of detaching it.
        num_draft_tokens (`int`, defaults to 4): draft tokens in the first round (and every round when fixed).
        max_draft_tokens (`int`, defaults to 8): upper bound of the adaptive draft length.
        draft_schedule (`"adaptive" | "fixed"`): adaptive grows the draft by one after a fully accepted round and
            shrinks it by one otherwise.
        draft_confidence_threshold (`float`, defaults to 0.1): a round stops drafting early once the draft's
            probability of its own token falls below this. Beagle's own loop uses it as the trees' `min_prob` (for
            `tree_shape="auto"` and `"chain"`): paths the draft gives less probability are not verified.
        default_prompt_lookup_num_tokens (`int`, defaults to 10): the `prompt_lookup_num_tokens` a generate call
            that passes none gets: prompt-lookup tokens in every draft round, verified in the same target forward
            (copy rounds on `target.generate(..., assistant_model=beagle)`, a lookup branch in the own loop's trees).
            Lossless like every draft token. 0 turns it off by default; a call's `prompt_lookup_num_tokens` (0: off)
            overrides it.
    """

    model_type = "beagle"

    # --- shared with the target (vocab_size, hidden_size, rope_parameters) or copied from it by default ---
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False

    # --- the target ---
    target_model_name_or_path: str | None = None
    target_model_type: str | None = None
    target_layer_ids: list[int] | None = None

    # --- method options (method.md §4) ---
    norm_kv: bool = True
    final_norm: bool = False
    null_kv_slot: bool = True
    recency_bias: bool = False
    query_newest_state: bool = False
    context_next_token: bool = False
    carry_target_embeddings: bool = False
    draft_vocab_size: int | None = None
    concat_draft_states: bool = True
    stage1_window: int = 5
    stage1_offset_weights: Literal["uniform", "decay"] = "uniform"
    stage2_steps: int = 4
    offset_range: int | None = None
    noise_type: Literal["uniform", "gaussian", "none"] = "uniform"
    noise_scale: float = 0.2
    smooth_l1_weight: float = 10.0
    tv_weight: float = 0.0
    grad_through_draft_states: bool = False

    # --- drafting at inference (defaults a checkpoint can ship; overridable per call) ---
    num_draft_tokens: int = 4
    max_draft_tokens: int = 8
    draft_schedule: Literal["adaptive", "fixed"] = "adaptive"
    draft_confidence_threshold: float = 0.1
    default_prompt_lookup_num_tokens: int = 10

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.target_layer_ids is None:
            self.target_layer_ids = [-1]
        if kwargs.get("rope_parameters") is None and self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        self.check_ranges()

    def check_ranges(self) -> None:
        """Raise `BeagleConfigError` naming the first field that is out of range."""
        where = "BeagleConfig"
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "max_position_embeddings", "stage1_window", "stage2_steps", "num_draft_tokens",
                    "max_draft_tokens")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise _mismatch(field, "a positive integer", value, where)
        value = self.default_prompt_lookup_num_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _mismatch("default_prompt_lookup_num_tokens", "an integer >= 0 (0: off)", value, where)
        if self.max_draft_tokens < self.num_draft_tokens:
            raise _mismatch("max_draft_tokens", f">= num_draft_tokens={self.num_draft_tokens}", self.max_draft_tokens,
                            where)
        if self.draft_schedule not in ("adaptive", "fixed"):
            raise _mismatch("draft_schedule", "one of 'adaptive', 'fixed'", self.draft_schedule, where)
        if not 0.0 <= self.draft_confidence_threshold < 1.0:
            raise _mismatch("draft_confidence_threshold", "a float in [0, 1)", self.draft_confidence_threshold, where)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise _mismatch(
                "num_attention_heads", f"a multiple of num_key_value_heads={self.num_key_value_heads}",
                self.num_attention_heads, where,
            )
        if not self.rms_norm_eps > 0:
            raise _mismatch("rms_norm_eps", "a positive float", self.rms_norm_eps, where)
        if not 0.0 <= self.attention_dropout < 1.0:
            raise _mismatch("attention_dropout", "a float in [0, 1)", self.attention_dropout, where)
        if self.stage1_offset_weights not in ("uniform", "decay"):
            raise _mismatch("stage1_offset_weights", "one of 'uniform', 'decay'", self.stage1_offset_weights, where)
        if self.noise_type not in ("uniform", "gaussian", "none"):
            raise _mismatch("noise_type", "one of 'uniform', 'gaussian', 'none'", self.noise_type, where)
        if not self.noise_scale >= 0:
            raise _mismatch("noise_scale", "a float >= 0", self.noise_scale, where)
        if not self.smooth_l1_weight >= 0:
            raise _mismatch("smooth_l1_weight", "a float >= 0", self.smooth_l1_weight, where)
        if not self.tv_weight >= 0:
            raise _mismatch("tv_weight", "a float >= 0", self.tv_weight, where)
        if self.offset_range is not None and not (isinstance(self.offset_range, int) and self.offset_range > 0):
            raise _mismatch("offset_range", "None or a positive integer", self.offset_range, where)
        if self.draft_vocab_size is not None and not (
            isinstance(self.draft_vocab_size, int) and 0 < self.draft_vocab_size <= self.vocab_size
        ):
            raise _mismatch("draft_vocab_size", f"None or an integer in [1, vocab_size={self.vocab_size}]",
                            self.draft_vocab_size, where)
        if not self.target_layer_ids or not all(isinstance(i, int) for i in self.target_layer_ids):
            raise _mismatch("target_layer_ids", "a non-empty list of integers", self.target_layer_ids, where)
        if len(set(self.target_layer_ids)) != len(self.target_layer_ids):
            raise _mismatch("target_layer_ids", "distinct layer indices", self.target_layer_ids, where)
        if self.tie_word_embeddings:
            raise _mismatch("tie_word_embeddings", False, True, where + " (Beagle owns no tied embeddings)")
        if not isinstance(self.rope_parameters, dict) or "rope_type" not in self.rope_parameters:
            raise _mismatch("rope_parameters", "a dict with a 'rope_type'", self.rope_parameters, where)
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise _mismatch("final_logit_softcapping", "None or a positive float", self.final_logit_softcapping,
                            where)

    @property
    def num_target_layers_fused(self) -> int:
        return len(self.target_layer_ids)

    @property
    def effective_offset_range(self) -> int:
        return self.offset_range if self.offset_range is not None else self.stage1_window

    @classmethod
    def from_target_config(cls, target_config: PreTrainedConfig, **overrides) -> "BeagleConfig":
        """Build a config that shares the target's width, rotary embedding and vocabulary, and by default copies its
        attention layout and MLP width.

        `overrides` set any other field: method options, `target_model_name_or_path`, or the draft's own layout
        (`TARGET_DEFAULT_FIELDS`, e.g. `num_key_value_heads`). Overriding a shared field with a value that differs
        from the target's is refused: the draft reads the target's states and embeddings and must match them.
        """
        text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        shared = {field: _target_field(target_config, field) for field in TARGET_SHARED_FIELDS}
        for field, value in overrides.items():
            if field in shared and value != shared[field]:
                raise _mismatch(field, shared[field], value, "BeagleConfig.from_target_config (override vs target)")
        layout = {field: _target_field(target_config, field) for field in TARGET_DEFAULT_FIELDS}
        if "num_attention_heads" in overrides and "head_dim" not in overrides:
            # keep the draft's attention width equal to the target's when only the head count changes
            layout["head_dim"] = shared["hidden_size"] // overrides["num_attention_heads"]
        if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
            layout["num_key_value_heads"] = overrides["num_attention_heads"]
        hidden_act = getattr(text_config, "hidden_act", None) or getattr(text_config, "hidden_activation", None)
        kwargs = dict(
            shared,
            **layout,
            hidden_act=hidden_act or "silu",
            attention_bias=bool(getattr(text_config, "attention_bias", False) or False),
            mlp_bias=bool(getattr(text_config, "mlp_bias", False) or False),
            final_logit_softcapping=getattr(text_config, "final_logit_softcapping", None),
            target_model_name_or_path=getattr(target_config, "_name_or_path", None) or None,
            target_model_type=getattr(target_config, "model_type", None) or None,
            pad_token_id=getattr(text_config, "pad_token_id", None),
            bos_token_id=getattr(text_config, "bos_token_id", None),
            eos_token_id=getattr(text_config, "eos_token_id", None),
        )
        known = set(kwargs) | set(inspect.signature(PreTrainedConfig.__init__).parameters)
        known |= {field for klass in cls.__mro__ for field in getattr(klass, "__annotations__", {})}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise BeagleConfigError(f"BeagleConfig.from_target_config: unknown field(s) {', '.join(unknown)}; "
                                    f"expected fields of {cls.__name__} (e.g. recency_bias, num_draft_tokens).")
        kwargs.update(overrides)
        return cls(**kwargs)

    def check_target_config(self, target_config: PreTrainedConfig) -> None:
        """Raise `BeagleConfigError` naming the first shared field on which `target_config` disagrees."""
        where = f"target {type(target_config).__name__} does not match the Beagle config"
        for field in TARGET_SHARED_FIELDS:
            found = _target_field(target_config, field)
            expected = getattr(self, field)
            if field == "rope_parameters":
                key = rope_mismatch(expected, found)
                if key is not None:
                    raise _mismatch(f"rope_parameters[{key!r}]", expected.get(key), found.get(key), where)
            elif found != expected:
                raise _mismatch(field, expected, found, where)
        text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        layers = getattr(text_config, "num_hidden_layers", None)
        if isinstance(layers, int) and not all(-(layers + 1) <= i <= layers for i in self.target_layer_ids):
            raise _mismatch("target_layer_ids", f"indices into the target's {layers + 1} hidden states (0..{layers}, "
                            "or negative from the last)", self.target_layer_ids, where)


__all__ = ["BeagleConfig", "BeagleConfigError"]
