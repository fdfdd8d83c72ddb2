"""An EAGLE-2-style baseline draft, trained with Beagle's own trainer, data and target (benchmarks only, not part of
the package).

Architecture (EAGLE-1/2, `cnets.py`): the row at position p reads the target's top post-norm feature f_p and the
embedding of the NEXT token t_{p+1} (features are shifted against tokens), fuses them with one linear layer and runs
one Llama decoder layer of causal self-attention:

    x_p   = FC([embed(t_{p+1}) ; f_p])                      # 2d -> d, bias (EAGLE's default)
    ĥ_p+1 = LlamaDecoderLayer(x)_p                          # predicted feature f_{p+1}
    logits = lm_head(ĥ_p+1)                                 # the target's head, shared and frozen: t_{p+2}

The target's embedding and head are used by reference and never saved; a reduced draft vocabulary works exactly as in
Beagle (`draft_to_target`, `compute_logits` restricted to those head rows), so both drafts pay the same head cost.
As in EAGLE-1/2's code the decoder layer has no input RMSNorm (`input_norm=False`) and there is no final norm.

Training (`Eagle2Trainer`, a `BeagleTrainer`): EAGLE-1/2's objective with teacher forcing, one forward per batch: soft
CE against the target's distribution P_{p+1} (the same `SoftLabels`, so the same offline cache or online target states
work) + λ·SmoothL1(ĥ_{p+1}, f_{p+1}), with the same noise on the input features. There is no second stage.
`evaluate()` reports α per draft step 1..S (step 1: teacher forcing; steps ≥ 2: the draft unrolled on its own
features with the true tokens, exactly what chain drafting computes).

Inference: `target.generate(ids, assistant_model=draft)` (Beagle's generate hook dispatches any assistant offering
`beagle_candidate_generator`; `import modeling_beagle` installs it). `Eagle2CandidateGenerator` keeps the draft's own
`DynamicCache` over the accepted prefix and drafts a chain on its own predicted features. EAGLE-2's dynamic trees:
Beagle's own loop, `target.generate(ids, custom_generate=beagle_generate, beagle=draft, tree_shape=...)`, drives this
draft through the same drafting interface as a Beagle (`new_draft_cache` gives an `Eagle2TreeCache`,
`append_context` runs the accepted rows, each tree level appends its nodes' rows under the tree mask), so both drafts
are verified, pruned and accepted by the same code.

    python benchmarks/eagle2_draft.py train --target_model ... --dataset ... --output_dir runs/eagle2 ...  # = beagle train
    beagle bench ... --plugin benchmarks/eagle2_draft.py:<checkpoint folder>[@chain,tree,tree-lookup]
        # `bench_methods` plugin: "eagle2-chain" (default), "eagle2-tree", "eagle2-tree-lookup"
"""

import functools
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.candidate_generator import CandidateGenerator  # noqa: F401 (the protocol implemented)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import (  # noqa: E402  (also installs the generate hook)
    BeagleConfig,
    BeagleModel,
    is_prepacked,
    prepack_linear_weights,
)
from modeling_beagle.configuration_beagle import BeagleConfigError  # noqa: E402
from modeling_beagle.decoding_beagle import resolve_prompt_lookup  # noqa: E402
from modeling_beagle.generation_beagle import (  # noqa: E402
    BeagleCandidateGenerator,
    BeagleGenerationError,
    BeagleGenerationStats,
    check_generation_config,
    draft_logits_to_target_vocab,
    sample_categorical,
    target_states,
)
from modeling_beagle.masking_beagle import to_attention_mask  # noqa: E402
from modeling_beagle.modeling_beagle import BeagleCheckpointError  # noqa: E402
from trainer.beagle_trainer import BeagleTrainer  # noqa: E402
from trainer.objectives import STAT_NAMES, SoftLabels, _per_offset, position_losses  # noqa: E402

METHOD_NAME = "eagle2-chain"
# transformers 5.24 renamed the decoder layer's cache argument (`past_key_values` -> `cache`).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


# ------------------------------------------------------------------------------------------------------- config
class Eagle2DraftConfig(BeagleConfig):
    r"""Config of an [`Eagle2Draft`]: Beagle's config (the fields shared with the target, the draft vocabulary, the
    noise, the chain-drafting schedule, `from_target_config` and `check_target_config`) plus EAGLE's two choices.
    Beagle-only fields (`norm_kv`, `null_kv_slot`, `stage1_window`, ...) are ignored.

    Args:
        fc_bias (`bool`, defaults to `True`): bias of the FC over [embedding; feature] (EAGLE-1/2's default).
        input_norm (`bool`, defaults to `False`): keep the decoder layer's input RMSNorm (EAGLE-1/2 drop it).
    """

    model_type = "eagle2_draft"
    _auto_class = None  # BeagleConfig registers itself for remote code; this benchmark class does not

    fc_bias: bool = True
    input_norm: bool = False

    def check_ranges(self) -> None:
        super().check_ranges()
        where = "Eagle2DraftConfig"
        if list(self.target_layer_ids) != [-1]:
            raise BeagleConfigError(f"{where}: `target_layer_ids` expected [-1] (EAGLE-2 reads the top feature), "
                                    f"found {self.target_layer_ids!r}.")
        for name in ("carry_target_embeddings", "final_norm"):
            if getattr(self, name):
                raise BeagleConfigError(f"{where}: `{name}` expected False (not supported), found True.")


@dataclass
class Eagle2Output(ModelOutput):
    """`last_hidden_state`: ĥ_{p+1} per row p (the predicted next feature); `logits`: its draft-vocabulary logits.
    A `past_key_values` cache passed to the forward is updated in place."""

    last_hidden_state: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


# -------------------------------------------------------------------------------------------------------- model
class Eagle2Draft(PreTrainedModel):
    """EAGLE-2-style draft: FC([embed(t_{p+1}); f_p]) -> one causal self-attention Llama decoder layer -> ĥ_{p+1}."""

    config_class = Eagle2DraftConfig
    config: Eagle2DraftConfig
    base_model_prefix = "eagle2"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: Eagle2DraftConfig):
        super().__init__(config)
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=config.fc_bias)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        if not config.input_norm:
            self.layer.input_layernorm = nn.Identity()
        self.rotary_emb = LlamaRotaryEmbedding(config)
        if config.draft_vocab_size is not None:
            self.draft_to_target = nn.Buffer(torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_to_target = None
        # Beagle's binding machinery (below) reads these: no carried copies, the target's modules by reference.
        self.embed_tokens = None
        self.lm_head = None
        self.draft_head_weight = None
        self._target_refs = None
        self.post_init()

    # The target's embedding / head by reference, the reduced vocabulary and the head: exactly Beagle's code, so both
    # drafts share the same head cost, checks and offline-cache identity.
    bind_target = BeagleModel.bind_target
    ensure_bound_to = BeagleModel.ensure_bound_to
    is_bound = BeagleModel.is_bound
    set_draft_vocabulary = BeagleModel.set_draft_vocabulary
    _gather_draft_head = BeagleModel._gather_draft_head
    get_input_embeddings = BeagleModel.get_input_embeddings
    compute_logits = BeagleModel.compute_logits
    _require_bound = BeagleModel._require_bound
    _add_state_noise = BeagleModel._add_state_noise  # EAGLE's uniform noise on input features (config noise_*)

    @classmethod
    def from_target(cls, target_model: PreTrainedModel, **overrides) -> "Eagle2Draft":
        """A fresh draft sized from `target_model` (`Eagle2DraftConfig.from_target_config`) and bound to it."""
        attn_implementation = overrides.pop("attn_implementation", None)
        dtype = overrides.pop("dtype", None)
        if "attention_bias" not in overrides:
            q_proj = next((m.q_proj for m in target_model.modules() if isinstance(getattr(m, "q_proj", None), nn.Linear)),
                          None)
            if q_proj is not None:
                overrides["attention_bias"] = q_proj.bias is not None
        config = Eagle2DraftConfig.from_target_config(target_model.config, **overrides)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = cls(config)
        if dtype is not None:
            model = model.to(dtype)
        return model.bind_target(target_model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._require_bound()
        with torch.no_grad():
            embeds = self.get_input_embeddings()(input_ids)
        return embeds.to(self.fc.weight.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor,
        features: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: "DynamicCache | Eagle2TreeCache | None" = None,
        return_logits: bool = True,
        draft_states: torch.Tensor | None = None,
        draft_next_ids: torch.LongTensor | None = None,
        draft_position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> Eagle2Output:
        r"""
        Args:
            input_ids (`(batch, q)`): row p's token, t_{p+1} (the token AFTER the feature's position).
            features (`(batch, q, hidden)`): row p's feature: the target's f_p, or the draft's own ĥ_p.
            position_ids (`(batch, q)`): row p's position p. Default: the cache length + 0..q-1.
            attention_mask: `(batch, past + q)` key validity (1 = real token) on top of causal attention by cache
                index, or a `(batch, q, past + q)` bool mask of exactly which keys each row reads.
            past_key_values (`DynamicCache`): the draft's keys / values of earlier rows; updated in place. An
                `Eagle2TreeCache` instead makes this call one level of Beagle's draft tree (`tree_level`), with
                Beagle's arguments (`draft_states`, `draft_next_ids`, `draft_position_ids`, a 3-d `attention_mask`).
        """
        if isinstance(past_key_values, Eagle2TreeCache):
            return self.tree_level(input_ids, past_key_values, attention_mask, draft_states, draft_next_ids,
                                   draft_position_ids)
        if features is None or draft_states is not None:
            raise ValueError("Eagle2Draft: expected `features` (and no `draft_states`, which only a tree level "
                             "with an `Eagle2TreeCache` reads).")
        dtype = self.fc.weight.dtype
        if features.shape[:2] != input_ids.shape or features.shape[-1] != self.config.hidden_size:
            raise ValueError(f"Eagle2Draft: `features` shape expected {(*input_ids.shape, self.config.hidden_size)}, "
                             f"found {tuple(features.shape)}.")
        features = self._add_state_noise(features.to(dtype))
        hidden = self.fc(torch.cat([self.embed(input_ids), features], dim=-1))
        batch, num_rows = input_ids.shape
        device = hidden.device
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(num_rows, device=device)).expand(batch, -1)
        implementation = self.config._attn_implementation
        if attention_mask is not None and attention_mask.dim() == 3:
            mask = to_attention_mask(attention_mask.bool(), implementation, dtype)
        elif (attention_mask is None or bool(attention_mask.all())) and (
                num_rows == 1 or (past == 0 and implementation == "sdpa")):
            mask = None  # one row reads every key; sdpa's own causal kernel for a full sequence (right padding only)
        else:
            keys = torch.arange(past + num_rows, device=device)
            rows = past + torch.arange(num_rows, device=device)
            allowed = (keys[None, :] <= rows[:, None]).expand(batch, -1, -1)
            if attention_mask is not None:  # padding keys are never read (a row always reads itself: never empty)
                allowed = allowed & (attention_mask.bool()[:, None, :] | (keys[None, :] == rows[:, None])[None])
            mask = to_attention_mask(allowed, implementation, dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        hidden = self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                            position_embeddings=position_embeddings, use_cache=past_key_values is not None,
                            **{_CACHE_KWARG: past_key_values}, **kwargs)
        logits = self.compute_logits(hidden) if return_logits else None
        return Eagle2Output(last_hidden_state=hidden, logits=logits)  # the cache, if any, was updated in place

    # ------------------------------------------------------------------------------ Beagle's tree loop (beagle_generate)
    # `beagle_generate` / `draft_tree` drive a draft through `new_draft_cache`, `append_context` and one call per tree
    # level; this draft answers them with its own rows. A Beagle level appends each frontier node's parent state (read
    # with the node's token) as a key and queries with the node's token; here both are the same row, FC([embed(node
    # token); parent's ĥ]) at the parent's position, which is appended as a key and also read as the query.
    def new_draft_cache(self) -> "Eagle2TreeCache":
        return Eagle2TreeCache()

    @torch.no_grad()
    def append_context(self, cache: "Eagle2TreeCache", states: torch.Tensor, position_ids: torch.Tensor,
                       valid: torch.Tensor | None = None, draft: bool = False,
                       next_ids: torch.Tensor | None = None) -> "Eagle2TreeCache":
        """Run the rows (next_ids_j, f_j) of newly read target states as true rows of `cache` (causal, padding
        slots never read) and keep each batch row's newest valid row's output: the root's prediction."""
        if draft or next_ids is None:
            raise ValueError("Eagle2Draft.append_context: expected true states with `next_ids` (each state's next "
                             f"token: row j reads (t_(j+1), f_j)), found draft={draft}, next_ids={next_ids is not None}.")
        if cache.num_draft:
            raise RuntimeError("Eagle2Draft.append_context: the cache still holds draft rows; call "
                               "`cache.discard_drafts()` first.")
        batch, num_rows = next_ids.shape
        valid = next_ids.new_ones(batch, num_rows, dtype=torch.bool) if valid is None else valid.bool()
        keys_valid = valid if cache.valid is None else torch.cat([cache.valid, valid], dim=1)
        out = self(input_ids=next_ids, features=states, position_ids=position_ids, attention_mask=keys_valid,
                   past_key_values=cache.kv, return_logits=False)
        newest = num_rows - 1 - valid.flip(1).long().argmax(1)  # every row of a round holds at least one valid state
        hidden = out.last_hidden_state
        cache.newest = hidden.gather(1, newest[:, None, None].expand(-1, 1, hidden.shape[-1]))
        cache.add_true(position_ids, valid)
        return cache

    def tree_level(self, input_ids, cache: "Eagle2TreeCache", attention_mask, draft_states=None, draft_next_ids=None,
                   draft_position_ids=None) -> Eagle2Output:
        """One level of `draft_tree`. Level 0 (no `draft_states`): the query is the root, whose row (f of the last
        read token, root) is the cache's newest true row, so its output is returned as is. Deeper levels: the rows
        (node token, parent's ĥ) at the parent's position are appended as draft keys and read as the queries, each
        reading the true rows `attention_mask` allows (and no padding) and its own lineage's draft rows."""
        if draft_states is None:
            if input_ids.shape[1] != 1:
                raise ValueError(f"Eagle2Draft.tree_level: level 0 expected one query (the root), found "
                                 f"{input_ids.shape[1]}.")
            hidden = cache.newest
        else:
            if draft_next_ids.shape != input_ids.shape:
                raise ValueError("Eagle2Draft.tree_level: expected the frontier tokens as both queries and "
                                 f"`draft_next_ids`, found shapes {tuple(input_ids.shape)} and "
                                 f"{tuple(draft_next_ids.shape)}.")
            num_true = cache.num_true
            allowed = torch.cat([attention_mask[..., :num_true] & cache.valid[:, None, :], attention_mask[..., num_true:]],
                                dim=-1)
            hidden = self(input_ids=draft_next_ids, features=draft_states, position_ids=draft_position_ids,
                          attention_mask=allowed, past_key_values=cache.kv, return_logits=False).last_hidden_state
        return Eagle2Output(last_hidden_state=hidden, logits=self.compute_logits(hidden))

    # ------------------------------------------------------------------------------------------- generation
    def beagle_check_generation(self, target_model, generation_mode, generation_config) -> None:
        """Called by Beagle's generate hook before `target.generate` starts (duck-typed dispatch)."""
        check_generation_config(generation_config)
        if generation_mode != "assisted_generation":
            raise BeagleGenerationError(f"generation mode expected greedy or sampling (assisted generation) with an "
                                        f"Eagle2Draft assistant, found {generation_mode!r}.")
        self.ensure_bound_to(target_model)

    def beagle_candidate_generator(self, target_model, generation_config, logits_processor):
        """Called by Beagle's generate hook when this draft is `target.generate(..., assistant_model=draft)`: chain
        drafts only (no copy rounds; the own loop's lookup branch serves both drafts alike)."""
        check_generation_config(generation_config)
        if resolve_prompt_lookup(generation_config)[0]:
            raise BeagleGenerationError("`prompt_lookup_num_tokens` expected 0 or unset with an Eagle2Draft assistant "
                                        f"(its chain path makes no copy rounds), found "
                                        f"{generation_config.prompt_lookup_num_tokens}.")
        self.ensure_bound_to(target_model)
        return Eagle2CandidateGenerator(self, generation_config, logits_processor)

    def generate(self, *args, **kwargs):
        raise BeagleGenerationError("Eagle2Draft is a draft model: call `target.generate(ids, assistant_model=draft)` "
                                    "after `import modeling_beagle` (which installs the generate hook).")

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory, *args, **kwargs):
        if kwargs.get("safe_serialization") is False:
            raise ValueError("Eagle2Draft.save_pretrained: `safe_serialization` expected True, found False.")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Strict loading: missing, unexpected or misshaped tensors raise `BeagleCheckpointError`."""
        if kwargs.get("ignore_mismatched_sizes"):
            raise BeagleCheckpointError("Eagle2Draft.from_pretrained: `ignore_mismatched_sizes` expected False.")
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        problems = [f"tensor {k!r}: shape expected {tuple(e)}, found {tuple(f)}"
                    for k, f, e in sorted(info.get("mismatched_keys", []))]
        problems += [f"tensor {k!r}: expected in the checkpoint, found missing" for k in sorted(info.get("missing_keys", []))]
        problems += [f"tensor {k!r}: expected absent, found present" for k in sorted(info.get("unexpected_keys", []))]
        if problems:
            raise BeagleCheckpointError(f"checkpoint {pretrained_model_name_or_path} does not match its config: "
                                        + "; ".join(problems))
        return (model, info) if want_info else model


# ------------------------------------------------------------------------------------------------- objectives
def _label_rows(loss_mask: torch.Tensor) -> torch.Tensor:
    """(batch, T): index of each supervised position among the supervised positions in row-major order (the order
    of `SoftLabels`)."""
    return (loss_mask.long().flatten().cumsum(0) - 1).view_as(loss_mask)


def _shift(input_ids: torch.Tensor, by: int) -> torch.Tensor:
    """Row p holds t_{p+by} (0 past the end)."""
    return torch.cat([input_ids[:, by:], input_ids.new_zeros(input_ids.shape[0], min(by, input_ids.shape[1]))], dim=1)


def eagle2_forward_loss(draft, input_ids, features, target_states, labels: SoftLabels, loss_mask,
                        smooth_l1_weight: float, forward=None, tv_weight: float = 0.0):
    """EAGLE-1/2 teacher forcing, one forward: row p reads (t_{p+1}, f_p) and is supervised when position p + 1 is
    (CE against P_{p+1} + λ SmoothL1 against f_{p+1}, plus `tv_weight` × the total variation as Beagle's).
    Right padding only (causal rows never read later padding).

    Returns the mean loss over supervised rows and step-1 sums (CE, SmoothL1, top-1 agreement, count).
    """
    out = (forward or draft)(input_ids=_shift(input_ids, 1), features=features, return_logits=False)
    loss_mask = loss_mask.bool()
    rows = loss_mask[:, 1:]  # row p is supervised iff position p + 1 is
    terms = position_losses(draft, out.last_hidden_state[:, :-1][rows], target_states[:, 1:][rows],
                            labels.select(_label_rows(loss_mask)[:, 1:][rows]))
    loss = terms.loss(smooth_l1_weight, tv_weight).sum() / rows.sum().clamp(min=1)
    return loss, _per_offset(torch.ones_like(terms.ce, dtype=torch.long), 1, terms)


@torch.no_grad()
def eagle2_unroll(draft, input_ids, features, steps: int) -> list[torch.Tensor]:
    """Chain drafting with the true tokens for every start at once: the draft's states of steps 1..S.

    Step i's row p continues the chain that starts after the true features f_0..f_p: it reads token t_{p+i} and the
    draft's own step-(i-1) output of row p (step 1: f_p), sits at position p + i - 1 and reads the step-1 rows
    j <= p (true features), the step-j rows p (its chain ancestors, j < i) and itself: exactly the keys chain
    drafting has at inference. Its output predicts f_{p+i} (and the token t_{p+i+1}). One cached forward of T rows
    per step.
    """
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    causal = positions[None, :] <= positions[:, None]
    diagonal = torch.eye(length, dtype=torch.bool, device=input_ids.device)
    cache, inputs, states = DynamicCache(), features, []
    for i in range(1, steps + 1):
        allowed = torch.cat([causal] + [diagonal] * (i - 1), dim=-1).expand(batch, -1, -1)
        out = draft(input_ids=_shift(input_ids, i), features=inputs, position_ids=(positions + i - 1).expand(batch, -1),
                    attention_mask=allowed, past_key_values=cache, return_logits=False)
        inputs = out.last_hidden_state
        states.append(inputs)
    return states


@torch.no_grad()
def eagle2_unroll_stats(draft, input_ids, features, target_states, labels: SoftLabels, loss_mask, steps: int) -> dict:
    """Per draft step 1..S (`eagle2_unroll`): sums of CE, SmoothL1 and top-1 agreement with the target over the rows
    whose predicted position p + i is supervised, and their count."""
    length = input_ids.shape[1]
    loss_mask = loss_mask.bool()
    label_rows = _label_rows(loss_mask)
    sums = {name: torch.zeros(steps, device=input_ids.device) for name in (*STAT_NAMES, "count")}
    for i, states in enumerate(eagle2_unroll(draft, input_ids, features, steps), start=1):
        targets = loss_mask[:, i:]  # row p predicts position p + i
        if not targets.any():
            continue
        terms = position_losses(draft, states[:, : length - i][targets], target_states[:, i:][targets],
                                labels.select(label_rows[:, i:][targets]))
        stats = _per_offset(torch.full_like(terms.ce, i, dtype=torch.long), steps, terms)
        for name in sums:
            sums[name] += stats[name]
    return sums


class Eagle2Trainer(BeagleTrainer):
    """`BeagleTrainer` for an `Eagle2Draft`: the same arguments, data, collators, offline cache, target features,
    logging, DDP / bf16 / checkpointing; only the loss (EAGLE-1/2, one teacher-forced forward) and the evaluation
    differ. There is no stage 2: every step is the single-forward loss (logged as `stage1_*_1`)."""

    def current_stage(self, step: int | None = None) -> int:
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        features, top, labels, supervised = self.target_features(inputs)
        loss, stats = eagle2_forward_loss(self.beagle, inputs["input_ids"], features, top, labels, supervised,
                                          self.args.smooth_l1_weight, forward=model, tv_weight=self.args.tv_weight)
        if model.training:
            self._accumulate(1, stats)
        return (loss, stats) if return_outputs else loss

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Held-out α (top-1 agreement with the target), CE and SmoothL1 per draft step 1..`stage2_steps` (step 1:
        teacher forcing; later steps: the draft unrolled on its own features with the true tokens), with Beagle's
        metric names (`eval_alpha_step_i`)."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        self.model.eval()
        steps = self.args.stage2_steps
        sums: dict[str, torch.Tensor] = {}
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            features, top, labels, supervised = self.target_features(inputs)
            stats = eagle2_unroll_stats(self.beagle, inputs["input_ids"], features, top, labels, supervised, steps)
            for name, values in stats.items():
                sums[name] = sums.get(name, 0) + values
        metrics = {}
        counts = sums["count"].clamp(min=1)
        for metric in STAT_NAMES:
            for i, value in enumerate((sums[metric] / counts).tolist()):
                if sums["count"][i] > 0:
                    metrics[f"{metric_key_prefix}_{'alpha' if metric == 'agree' else metric}_step_{i + 1}"] = value
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# -------------------------------------------------------------------------------------------------- inference
@dataclass
class Eagle2GenerationStats(BeagleGenerationStats):
    target_forwards: int = 0  # target forwards of the last generation (prefill included)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "target_forwards": self.target_forwards}


def _crop(cache: DynamicCache, keep: int) -> None:
    """Keep the first `keep` rows of `cache` (a negative count removes rows in every supported transformers)."""
    excess = cache.get_seq_length() - keep
    if excess > 0:
        cache.crop(-excess)


class Eagle2TreeCache:
    """An `Eagle2Draft`'s cache in Beagle's tree loop: the decoder layer's keys / values of the true rows (the
    accepted prefix), then of the current round's tree rows (`discard_drafts` drops them); each true row's position
    and validity (`positions`, `valid`: the names `draft_tree` reads) and the output of each batch row's newest true
    row (`newest`, `(batch, 1, hidden)`)."""

    def __init__(self) -> None:
        self.kv = DynamicCache()
        self.num_true = 0
        self.positions: torch.Tensor | None = None  # (batch, num_true)
        self.valid: torch.Tensor | None = None
        self.newest: torch.Tensor | None = None

    @property
    def num_draft(self) -> int:
        return self.kv.get_seq_length() - self.num_true

    def add_true(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)
        self.num_true += positions.shape[1]

    def discard_drafts(self) -> None:
        _crop(self.kv, self.num_true)


class Eagle2CandidateGenerator(BeagleCandidateGenerator):
    """Chain drafts from an `Eagle2Draft` for transformers' assisted-decoding loop (batch size 1), through the same
    hidden-state protocol as Beagle's generator (`requires_model_outputs`, `model_kwargs_overrides`) and the same
    draft-length schedule (`num_draft_tokens`, adaptive up to `max_draft_tokens`, confidence threshold).

    The draft's `DynamicCache` holds the rows of the accepted prefix (true features from the target's verification
    forward); the rows of each round's drafted tokens are cropped at the start of the next round.
    """

    def __init__(self, draft, generation_config, logits_processor):
        super().__init__(draft, generation_config, logits_processor)
        self.cache = DynamicCache()
        self.num_true = 0  # rows of the cache computed from true features
        self.stats = Eagle2GenerationStats()
        draft.generation_stats = self.stats

    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False,
                       n_last_matches=0, **kwargs):
        started = time.perf_counter()
        self.stats.target_forwards += 1  # every call is followed by exactly one target forward
        if self._handed_off_at is not None:
            self.stats.verify_time_s += started - self._handed_off_at
        if is_first_iteration:  # the target prefills the prompt first; its features arrive with the next call
            self.cache, self.num_true = DynamicCache(), 0
            self._handed_off_at = time.perf_counter()
            return input_ids, None
        candidates, candidate_logits = self._draft(input_ids, model_kwargs or {}, model_outputs)
        now = time.perf_counter()
        self.stats.draft_time_s += now - started
        self._handed_off_at = now
        return candidates, candidate_logits

    @torch.no_grad()
    def _draft(self, input_ids, model_kwargs, model_outputs):
        draft, cache = self.beagle, self.cache
        cur_len = input_ids.shape[1]
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.shape[-1] == cur_len and not bool(attention_mask.all()):
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            valid = attention_mask.bool()
        else:
            positions = torch.arange(cur_len, device=input_ids.device)[None]
            valid = None

        # 1. Drop last round's drafted rows; add the rows of the newly verified tokens: row j reads (t_{j+1}, f_j).
        _crop(cache, self.num_true)
        num_new = cur_len - 1 - self.num_true
        states = target_states(model_outputs, [-1])
        if states.shape[1] < num_new:
            raise BeagleGenerationError(f"the target returned features for {states.shape[1]} tokens, expected "
                                        f"{num_new} (do not pass a pre-filled `past_key_values`).")
        new = slice(self.num_true, cur_len - 1)
        out = draft(input_ids=input_ids[:, self.num_true + 1:], features=states[:, :num_new],
                    position_ids=positions[:, new], past_key_values=cache,
                    attention_mask=None if valid is None else valid[:, : cur_len - 1])
        self.num_true = cur_len - 1

        # 2. Draft a chain: the last new row's output is step 1; step s >= 2 is the row (ĥ, previous draft token).
        budget = self.max_length - cur_len - 1
        num_steps = min(self.num_draft_tokens, budget)
        self._last_drafted = 0
        if num_steps <= 0:
            return input_ids, None
        threshold = self.settings.confidence_threshold
        sequence, processed_logits = input_ids, []
        hidden, logits = out.last_hidden_state[:, -1:], out.logits[:, -1]
        for step in range(num_steps):
            if step > 0:
                key_valid = None if valid is None else torch.cat([valid, valid.new_ones(1, step)], dim=-1)
                out = draft(input_ids=token, features=hidden, position_ids=positions[:, -1:] + step - 1,
                            past_key_values=cache, attention_mask=key_valid)
                hidden, logits = out.last_hidden_state, out.logits[:, -1]
            logits = draft_logits_to_target_vocab(draft, logits.float())
            if len(self.logits_processor) > 0:
                logits = self.logits_processor(sequence, logits)
            if self.do_sample:
                probs = logits.softmax(-1)
                token = sample_categorical(probs)[:, None]  # as Beagle's chain draws its draft tokens
                confidence = probs.gather(-1, token)
                processed_logits.append(logits)
            else:
                token = logits.argmax(-1, keepdim=True)
                confidence = logits.softmax(-1).gather(-1, token) if threshold else None
            sequence = torch.cat([sequence, token], dim=-1)
            if threshold and step + 1 < num_steps and float(confidence) < threshold:
                break
        self._last_drafted = sequence.shape[1] - cur_len
        return sequence, torch.stack(processed_logits, dim=1) if self.do_sample else None


# ---------------------------------------------------------------------------------------------- bench plugin
try:  # `beagle bench`'s own types, generate settings and run record (trainer/bench.py)
    from trainer.bench import Method, MethodRun, _beagle_run, generation_kwargs, tree_shape_label  # noqa: E402
except ImportError:  # the same contract, should trainer/bench.py be absent
    tree_shape_label = str

    @dataclass
    class MethodRun:
        output_ids: torch.Tensor
        target_forwards: int | None = None
        accepted_per_position: list | None = None
        draft_time_s: float | None = None
        drafted_per_position: list | None = None

    @dataclass
    class Method:
        name: str
        run: object
        description: str = ""

    def generation_kwargs(target, max_new_tokens, do_sample, temperature) -> dict:
        pad = target.generation_config.pad_token_id
        if pad is None:
            eos = target.generation_config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        return kwargs

    def _beagle_run(output_ids, draft) -> MethodRun:
        stats = draft.generation_stats
        drafted = [sum(1 for d in stats.drafted if d > i) for i in range(max(stats.drafted, default=0))]
        return MethodRun(output_ids, accepted_per_position=stats.acceptance_per_position(),
                         draft_time_s=stats.draft_time_s, drafted_per_position=drafted)


def load_draft(checkpoint, target) -> Eagle2Draft:
    """A trained Eagle2Draft from `checkpoint` in the target's dtype, on its device, in eval mode, bound to it
    (as `beagle bench` loads a Beagle checkpoint); its linear layers are prepacked when the target's are
    (`beagle bench --prepack` packs both drafts alike)."""
    dtype = next(target.parameters()).dtype
    draft = Eagle2Draft.from_pretrained(checkpoint, dtype=dtype).to(target.device).eval()
    if is_prepacked(target):
        prepack_linear_weights(draft)
    return draft.bind_target(target)


PLUGIN_METHODS = ("chain", "tree", "tree-lookup")


def bench_methods(target, tokenizer, arg, tree_shape="auto", prompt_lookup_num_tokens: int = 10) -> list:
    """`beagle bench --plugin benchmarks/eagle2_draft.py:<checkpoint folder>[@chain,tree,tree-lookup]`: the methods
    after `@` (default: `chain` alone), each run with the bench's generate settings exactly as its built-in namesake:
    "eagle2-chain" (`target.generate(..., assistant_model=draft)`, as "beagle-chain"), "eagle2-tree" and
    "eagle2-tree-lookup" (Beagle's own loop, `custom_generate=beagle_generate`, on the bench's `--tree-shape`, which
    the bench hands over as `tree_shape`, resolved as for "beagle-tree": "auto" reuses the verification-cost curve
    measured for this target, and this draft's confidence threshold prunes; the lookup branch proposes the bench's
    `prompt_lookup_num_tokens`). The bench counts target forwards itself."""
    checkpoint, _, names = (arg or "").partition("@")
    names = [n.strip() for n in names.split(",")] if names else ["chain"]
    if not checkpoint or not names or any(n not in PLUGIN_METHODS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{METHOD_NAME}: expected the checkpoint folder of a trained Eagle2Draft, optionally followed "
                         f"by @ and methods among {list(PLUGIN_METHODS)} (--plugin benchmarks/eagle2_draft.py:PATH"
                         f"[@chain,tree]), found {arg!r}.")
    draft = load_draft(checkpoint, target)

    def chain(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed):
        output = target.generate(input_ids, attention_mask=attention_mask, assistant_model=draft,
                                 prompt_lookup_num_tokens=0,
                                 **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(output, draft)

    methods = {"chain": Method(METHOD_NAME, chain, "target.generate(assistant_model=eagle2_draft): EAGLE-2-style "
                                                   "draft, adaptive chain")}
    if {"tree", "tree-lookup"} & set(names):
        from modeling_beagle import beagle_generate
        from modeling_beagle.decoding_beagle import resolve_tree_shape

        shape = resolve_tree_shape(target, draft, tree_shape)  # "auto" times this machine once per target

        def tree(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, lookup_tokens=0):
            output = target.generate(input_ids, attention_mask=attention_mask, custom_generate=beagle_generate,
                                     beagle=draft, tree_shape=shape, prompt_lookup_num_tokens=lookup_tokens,
                                     **generation_kwargs(target, max_new_tokens, do_sample, temperature))
            return _beagle_run(output, draft)

        described = (f"target.generate(custom_generate=beagle_generate, beagle=eagle2_draft): EAGLE-2-style draft, "
                     f"tree_shape={tree_shape_label(tree_shape)}: depth={shape.depth}, top_k={shape.top_k}, "
                     f"total_tokens={shape.total_tokens}, min_prob={shape.min_prob}")
        methods["tree"] = Method("eagle2-tree", tree, described)
        methods["tree-lookup"] = Method(
            "eagle2-tree-lookup", functools.partial(tree, lookup_tokens=prompt_lookup_num_tokens),
            described + f", plus the prompt-lookup branch (prompt_lookup_num_tokens={prompt_lookup_num_tokens})")
    return [methods[n] for n in names]


# ------------------------------------------------------------------------------------------------- training CLI
def make_eagle2(target, model_args, train_data) -> Eagle2Draft:
    """The draft `python benchmarks/eagle2_draft.py train` trains: the same options as `beagle train`'s
    `make_beagle` (`--init_from`, `--attn_implementation`, `--draft_vocab_size` with the same frequent tokens, the
    layer's layout `--num_attention_heads` / `--num_key_value_heads` / `--intermediate_size`). `--recency_bias` (a term
    of Beagle's cross-attention) has no counterpart here and is refused, so a shared recipe cannot drop it silently.
    `--query_newest_state` / `--context_next_token` give Beagle the inputs this draft always has (the newest state
    and the next token fused by its FC): accepted, with a note in the log, since they change nothing here."""
    from trainer.train import check_continuation, frequent_tokens, layout_options

    if model_args.target_layer_ids != [-1]:
        raise ValueError(f"--target_layer_ids expected [-1] for the EAGLE-2-style draft, found "
                         f"{model_args.target_layer_ids}.")
    if model_args.recency_bias:
        raise ValueError("--recency_bias true: a Beagle option (a learned distance penalty in its cross-attention) "
                         "that the EAGLE-2-style draft does not have; expected it left out or false "
                         "(`--recency_bias false` after a recipe file that sets it).")
    for name in ("query_newest_state", "context_next_token"):
        if getattr(model_args, name):
            logger.info("--%s true: the EAGLE-2-style draft always reads these inputs (its FC fuses the newest state "
                        "with the next token's embedding); nothing to change", name)
    layout = layout_options(model_args)
    if model_args.init_from:
        draft = Eagle2Draft.from_pretrained(model_args.init_from, attn_implementation=model_args.attn_implementation,
                                            dtype=torch.float32)
        check_continuation(draft.config, layout, model_args.init_from)
        return draft
    draft = Eagle2Draft.from_target(target, attn_implementation=model_args.attn_implementation,
                                    draft_vocab_size=model_args.draft_vocab_size,
                                    target_model_name_or_path=model_args.target_model, **layout)
    if model_args.draft_vocab_size:
        draft.set_draft_vocabulary(frequent_tokens(train_data, model_args.draft_vocab_size, draft.config.vocab_size))
    return draft


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "train":
        print("usage: python benchmarks/eagle2_draft.py train <the options of `beagle train`, or one YAML/JSON file>\n"
              "The checkpoint is saved to <output_dir>/eagle2.", file=sys.stderr)
        return 2
    from trainer.train import run_training

    run_training(argv[1:], make_draft=make_eagle2, trainer_class=Eagle2Trainer, name="eagle2",
                 label="EAGLE-2-style draft", program="python benchmarks/eagle2_draft.py train")
    return 0


__all__ = ["Eagle2CandidateGenerator", "Eagle2Draft", "Eagle2DraftConfig", "Eagle2TreeCache", "Eagle2Trainer", "bench_methods",
           "eagle2_forward_loss", "eagle2_unroll", "eagle2_unroll_stats", "load_draft", "make_eagle2"]

if __name__ == "__main__":
    sys.exit(main())
