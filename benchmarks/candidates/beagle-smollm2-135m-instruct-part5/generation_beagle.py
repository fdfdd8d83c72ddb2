"""Lossless speculative generation with Beagle through `target.generate(ids, assistant_model=beagle)`.

transformers' assisted-decoding loop verifies the drafts, accepts (greedy match or speculative sampling) and crops
the target's cache. Beagle plugs in as a candidate generator that uses transformers' hidden-state protocol
(`requires_model_outputs`, `model_kwargs_overrides`): the target's verification forward also returns the true
states Beagle reads next round, so the target never runs a second forward.

One round (method.md §2): drop last round's draft states, append the true states the target produced for the
accepted tokens, then draft a chain from the bonus token, appending each draft state lazily for the next step.
With `prompt_lookup_num_tokens`, a round whose text is copying an earlier passage proposes that passage's
continuation instead of a draft (`ChainLookup`).
"""

import contextvars
import functools
import inspect
import os
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from packaging import version
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .cache_beagle import BeagleCache

# transformers versions whose private assisted-decoding protocol this module was written and tested against.
SUPPORTED_TRANSFORMERS = ("5.20", "6.0")
HOOK_MARKER = "__beagle_candidate_hook__"
DISABLE_HOOK_ENV = "BEAGLE_DISABLE_GENERATE_HOOK"


class BeagleGenerationError(ValueError):
    """Generation settings Beagle cannot honour, with what to change."""


class BeagleHookUnavailableError(BeagleGenerationError, AttributeError):
    """A Beagle reached transformers' stock assisted decoding (the hook is not installed). Also an AttributeError,
    so `getattr(beagle, "generation_config", None)` still answers None."""


# ---------------------------------------------------------------------------------------------------- statistics
@dataclass
class BeagleGenerationStats:
    """Per-round statistics of the last generation (a benchmark reads these)."""

    drafted: list[int] = field(default_factory=list)  # draft tokens proposed per round
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per round (bonus excluded)
    # of those, per round, the tokens only prompt lookup proposed (with `prompt_lookup_num_tokens`; empty otherwise)
    accepted_from_lookup: list[int] = field(default_factory=list)
    copy_rounds: int = 0  # rounds in copy mode (only the lookup proposal verified, no draft)
    # tokens of the last round's accepted block past a stop inside it (stop strings, the caller's criteria), cut from
    # the output and not counted in `accepted`
    cut_by_stop: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        """Tokens per target forward (verification), the bonus token included."""
        return (sum(self.accepted) + self.rounds) / max(self.rounds, 1)

    def acceptance_per_position(self) -> list[float]:
        """Share of rounds that drafted position i whose draft was accepted at position i (i = 1, 2, ...)."""
        rates = []
        for i in range(max(self.drafted, default=0)):
            drafted = sum(1 for d in self.drafted if d > i)
            accepted = sum(1 for a, d in zip(self.accepted, self.drafted) if d > i and a > i)
            rates.append(accepted / drafted)
        return rates

    def cut_last_round(self, tokens: int) -> None:
        """A stop inside the last round's accepted block cut `tokens` of them from the output: not emitted."""
        if tokens > self.accepted[-1]:
            raise ValueError(f"a stop cut {tokens} tokens from a round that accepted {self.accepted[-1]} drafts")
        self.cut_by_stop = tokens
        self.accepted[-1] -= tokens
        if self.accepted_from_lookup:
            self.accepted_from_lookup[-1] = min(self.accepted_from_lookup[-1], self.accepted[-1])

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "tau": self.tau,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_per_position": self.acceptance_per_position(),
            "accepted_from_lookup": self.accepted_from_lookup,
            "copy_rounds": self.copy_rounds,
            "cut_by_stop": self.cut_by_stop,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
        }


# ------------------------------------------------------------------------------------------------ draft primitives
def target_states(model_outputs, layer_ids: list[int]) -> torch.Tensor:
    """The context states Beagle reads from a target forward output: one layer, or several concatenated."""
    hidden_states = getattr(model_outputs, "hidden_states", None)
    if hidden_states is None:
        raise BeagleGenerationError(
            "the target's forward returned no `hidden_states`; Beagle needs `output_hidden_states` honoured by the "
            "target model (a stock transformers causal LM does)."
        )
    if len(layer_ids) == 1:
        return hidden_states[layer_ids[0]]
    return torch.cat([hidden_states[i] for i in layer_ids], dim=-1)


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` under the name `model` (a model, or an output class) takes a KV cache by: `cache` from
    transformers 5.24 on (`past_key_values` is deprecated there), `past_key_values` before. Use as
    `target(ids, **cache_kwargs(target, cache), use_cache=True)`."""
    return {_cache_name(model if isinstance(model, type) else type(model)): cache}


@functools.cache
def _cache_name(model_class: type) -> str:
    # The one place Beagle tells transformers versions apart by their cache name: the signature says, else the version.
    parameters = inspect.signature(getattr(model_class, "forward", model_class)).parameters
    if "cache" in parameters or "past_key_values" in parameters:
        return "cache" if "cache" in parameters else "past_key_values"
    return "cache" if version.parse(transformers.__version__).release >= (5, 24) else "past_key_values"


def draft_logits_to_target_vocab(beagle, logits: torch.Tensor) -> torch.Tensor:
    """Scatter draft-vocabulary logits into the target's vocabulary (-inf elsewhere); identity for a full head."""
    if beagle.draft_to_target is None:
        return logits
    full = logits.new_full((*logits.shape[:-1], beagle.config.vocab_size), float("-inf"))
    full[..., beagle.draft_to_target] = logits
    return full


def draft_topk(beagle, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most probable draft tokens as (log-probabilities, target ids), computed in the draft vocabulary: the
    same values as over `draft_logits_to_target_vocab` (the -inf rows add nothing), without the target-sized tensor."""
    scores, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
    if beagle.draft_to_target is not None:
        ids = beagle.draft_to_target[ids]
    return scores, ids


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of `probs` `(..., vocab)` (non-negative weights, not necessarily normalised), as a `(...)`
    long tensor: the inverse of the float64 cumulative distribution at a uniform draw from torch's generator. Exactly
    the categorical distribution, like `torch.multinomial(probs, 1)`, which on CPU draws an exponential per vocabulary
    entry and costs ~1 ms over a 49k vocabulary against ~0.05 ms here. A token of zero weight is never drawn."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even when the product rounds up
    return torch.searchsorted(cdf, u, right=True)[..., 0]  # the first entry whose cumulative weight exceeds u


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of `like`'s shape in float64 (-log(-log U)): added to log-probabilities, its top-k is k
    draws without replacement (Gumbel top-k). Uniform draws cost a sixth of CPU `exponential_()`'s."""
    return -torch.rand(like.shape, dtype=torch.float64, device=like.device).log_().neg_().log_()


# Settings that make transformers build another candidate generator than the assistant's (some are newer than 5.20).
OTHER_CANDIDATE_GENERATOR_SETTINGS = ("assistant_early_exit", "use_mtp", "speculation_type")


def check_generation_config(generation_config) -> None:
    """Refuse settings the speculative loop cannot honour, saying what to change."""
    if getattr(generation_config, "num_return_sequences", 1) not in (None, 1):
        raise BeagleGenerationError(
            f"`num_return_sequences` expected 1 with a Beagle assistant, found {generation_config.num_return_sequences}: "
            "call generate once per sequence (or repeat the prompt in a batch with Beagle's own loop)."
        )
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise BeagleGenerationError(
            f"`num_beams` expected 1 with a Beagle assistant, found {generation_config.num_beams}: beam search is not "
            "speculative; use greedy (do_sample=False) or sampling."
        )
    others = {name: getattr(generation_config, name, None) for name in OTHER_CANDIDATE_GENERATOR_SETTINGS}
    others = {name: value for name, value in others.items() if value not in (None, False)}
    if others:
        names = ", ".join(f"{name}={value!r}" for name, value in others.items())
        raise BeagleGenerationError(
            f"{names} expected unset with a Beagle assistant: it selects another of transformers' candidate "
            "generators (early exit, multi-token prediction heads, DFlash), which Beagle would replace. Drop it, or "
            "drop the Beagle assistant."
        )
    weight = getattr(generation_config, "assistant_ensemble_weight", None)  # transformers >= 5.25
    if weight is not None:
        raise BeagleGenerationError(
            f"`assistant_ensemble_weight` expected None with a Beagle assistant, found {weight}: it verifies against a "
            "mixture of the target's and the draft's distributions, which changes the output; Beagle's verification "
            "is exact (greedy: the target's own tokens; sampling: the target's distribution). Drop it."
        )
    if getattr(generation_config, "cache_implementation", None) in ("static", "hybrid", "sliding_window", "offloaded_static"):
        raise BeagleGenerationError(
            f"`cache_implementation` expected a dynamic cache, found {generation_config.cache_implementation!r}: "
            "speculative decoding rolls the cache back after rejected drafts; drop `cache_implementation`."
        )


def check_assisted_generation_config(generation_config) -> None:
    """Refuse what transformers' assisted decoding cannot verify exactly: classifier-free guidance's logits processor
    runs the target on its own cache, one new token per call, while assisted decoding calls it once per verified
    position and Beagle once per draft step (the output then differs from plain decoding's)."""
    scale = getattr(generation_config, "guidance_scale", None)
    if scale is not None and scale != 1:
        raise BeagleGenerationError(
            f"`guidance_scale` expected None or 1 with `assistant_model=beagle`, found {scale}: classifier-free "
            "guidance keeps its own cache, one token per call, which verifying several tokens a round would corrupt. "
            "Beagle's own loop (`generate_with_own_loop`, `custom_generate`) applies it once per emitted token."
        )


def check_empty_target_cache(model_kwargs: dict, dynamic_only: bool = False) -> None:
    """Refuse a target cache that already holds tokens (a conversation's earlier turns): Beagle reads the target's
    states of every prompt token, and transformers 5.25's assisted decoding would also feed the whole prompt on top
    of the cached tokens (its own assistants then diverge from plain decoding too). `dynamic_only` (Beagle's own
    loop, which rolls the cache back itself) also refuses any cache but an empty `DynamicCache`."""
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    cached = cache.get_seq_length() if callable(getattr(cache, "get_seq_length", None)) else 0
    if cached or (dynamic_only and not isinstance(cache, DynamicCache)):
        found = type(cache).__name__ + (f" holding {cached} cached tokens" if cached else "")
        raise BeagleGenerationError(
            f"the target's cache (`cache` / `past_key_values`) expected empty{' (a DynamicCache)' if dynamic_only else ''}"
            f" with a Beagle draft, found {found}: do not pass a cache; for a later turn of a conversation, pass the "
            "whole conversation as input_ids. Beagle reads the target's states of every prompt token."
        )


# transformers' assisted-generation settings: generate() fills a call that sets none of them with these defaults (its
# own assistants then draft 20 tokens a round), so on Beagle's path a setting counts as the caller's only when it
# differs from them (a call's "constant" schedule without `num_assistant_tokens` is Beagle's own schedule).
TRANSFORMERS_ASSISTANT_DEFAULTS = {
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
}
ASSISTANT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")


def assistant_settings_set(generation_config) -> dict:
    """The transformers assistant settings a generate call sets, i.e. those that differ from transformers' defaults."""
    found = {name: getattr(generation_config, name, None) for name in TRANSFORMERS_ASSISTANT_DEFAULTS}
    return {name: value for name, value in found.items()
            if value is not None and value != TRANSFORMERS_ASSISTANT_DEFAULTS[name]}


@dataclass(frozen=True)
class ChainSettings:
    """How the assisted path drafts its chain during one generate call."""

    num_draft_tokens: int  # the first round's length
    max_draft_tokens: int  # the longest a round drafts
    grow: int  # tokens added after a round that accepts every draft token
    shrink: int  # tokens taken off after a round that rejects one (both 0: a fixed length)
    confidence_threshold: float  # a round stops once the draft's probability of its token falls below (0: never)


def chain_settings(config, generation_config) -> ChainSettings:
    """The draft's own settings (`num_draft_tokens`, `max_draft_tokens`, `draft_schedule`,
    `draft_confidence_threshold`), overridden by the transformers assistant settings the call sets, with the meaning
    they have for transformers' own assistants: `num_assistant_tokens=N` drafts N tokens a round (transformers' default
    "constant" schedule; the cap rises to N if needed), `num_assistant_tokens_schedule="heuristic"` or
    `"heuristic_transient"` adds 2 after a round that accepts every draft token and takes 1 off after one that does
    not (from N, or from `num_draft_tokens`, at every call: the length is not carried over between calls), and
    `assistant_confidence_threshold` replaces `draft_confidence_threshold`."""
    found = assistant_settings_set(generation_config)
    count = found.get("num_assistant_tokens")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise BeagleGenerationError(f"`num_assistant_tokens` expected an int >= 1, found {count!r}.")
    schedule = found.get("num_assistant_tokens_schedule", "constant" if count is not None else None)
    if schedule is not None and schedule not in ASSISTANT_SCHEDULES:
        raise BeagleGenerationError(f"`num_assistant_tokens_schedule` expected one of {ASSISTANT_SCHEDULES}, found "
                                    f"{schedule!r}.")
    threshold = found.get("assistant_confidence_threshold", config.draft_confidence_threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise BeagleGenerationError(f"`assistant_confidence_threshold` expected a float in [0, 1), found {threshold!r}.")
    start = count if count is not None else config.num_draft_tokens
    if schedule is None:  # the draft's own schedule
        grow, shrink = (1, 1) if config.draft_schedule == "adaptive" else (0, 0)
    else:
        grow, shrink = (0, 0) if schedule == "constant" else (2, 1)
    return ChainSettings(num_draft_tokens=start, max_draft_tokens=max(config.max_draft_tokens, start), grow=grow,
                         shrink=shrink, confidence_threshold=float(threshold))


def check_no_assistant_settings(generation_config) -> None:
    """Beagle's own loop drafts trees: refuse the chain's settings rather than ignore them."""
    found = assistant_settings_set(generation_config)
    if found:
        names = ", ".join(f"{name}={value!r}" for name, value in found.items())
        raise BeagleGenerationError(
            f"transformers' assistant settings ({names}) expected unset with Beagle's own loop: they size the chain "
            "of `target.generate(..., assistant_model=beagle)`; the own loop drafts a tree, sized by `tree_shape=` "
            "(depth, top_k, total_tokens, min_prob)."
        )


# ------------------------------------------------------------------------------------------- candidate generator
@dataclass(frozen=True)
class ChainLookup:
    """Copy rounds for the chain path (`prompt_lookup_num_tokens` with `assistant_model=beagle`): in a round where the
    text's last `copy_match` or more tokens repeat an earlier passage of the prompt and output (`match(sequence,
    max_ngram)` -> (end position, match length)), the round proposes up to `num_tokens` tokens that followed it
    (`continuation(sequence, end, num_tokens)`) instead of drafting: Beagle's own loop's copy mode, for a chain.
    `tokens_per_match` > 0 proposes at most that many tokens per matched token, as the own loop's
    `lookup_tokens_per_match` does for its branch; 0 (the package's setting: it ran level, `CHAIN_LOOKUP_MATCH`'s
    comment) proposes `num_tokens` whatever the match's length. `extend_match` > 0 lets a match of at least that many
    tokens propose up to `extend_tokens` instead, as the own loop's copy mode does (`lookup_copy_match`,
    `lookup_copy_tokens`); 0 (the package's setting) keeps every round at `num_tokens`."""

    match: Callable[[torch.Tensor, int], tuple[int, int]]
    continuation: Callable[[torch.Tensor, int, int], list[int]]
    num_tokens: int
    max_ngram: int
    copy_match: int
    tokens_per_match: int = 0
    extend_match: int = 0
    extend_tokens: int = 0

    @property
    def max_tokens(self) -> int:
        """The most tokens one copy round proposes."""
        return max(self.num_tokens, self.extend_tokens if self.extend_match else 0)

    def proposal(self, sequence: torch.Tensor, budget: int) -> list[int] | None:
        """The copy round's proposal for `sequence` (one row), at most `budget` tokens; None when not copying."""
        end, matched = self.match(sequence, self.max_ngram)
        if end < 0 or matched < self.copy_match or budget < 1:
            return None
        num_tokens = self.max_tokens if self.extend_match and matched >= self.extend_match else self.num_tokens
        per_match = (self.tokens_per_match or num_tokens) * matched
        return self.continuation(sequence, end, min(num_tokens, budget, per_match))


class BeagleCandidateGenerator(CandidateGenerator):
    """Chain drafts from Beagle for transformers' assisted-decoding loop (batch size 1); with `lookup`, copy rounds
    (`ChainLookup`) in place of a draft where the text repeats an earlier passage."""

    requires_model_outputs = True

    def __init__(self, beagle, generation_config, logits_processor, lookup: ChainLookup | None = None):
        config = beagle.config
        self.beagle = beagle
        self.settings = settings = chain_settings(config, generation_config)
        # The target returns only the layers Beagle reads, or every layer when the caller asked for hidden states in
        # the output (transformers splits those per token and fails on the layers left out).
        layers = True if generation_config.output_hidden_states else list(config.target_layer_ids)
        self.model_kwargs_overrides = {"output_hidden_states": layers}
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.max_length = generation_config.max_length
        self.num_draft_tokens = settings.num_draft_tokens  # this round's length, moved by the schedule
        self.lookup = lookup
        self.cache = BeagleCache()
        self.stats = BeagleGenerationStats()
        beagle.generation_stats = self.stats
        self._handed_off_at: float | None = None
        self._last_drafted = 0
        self._last_copied = False

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one round proposes (transformers >= 5.25 sizes the target cache's rollback record by it)."""
        return max(self.settings.max_draft_tokens, self.lookup.max_tokens if self.lookup is not None else 0)

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs=None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor | None]:
        started = time.perf_counter()
        if self._handed_off_at is not None:
            self.stats.verify_time_s += started - self._handed_off_at
        if is_first_iteration:
            # Round 0: the target prefills the prompt first; its states arrive with the next call.
            check_empty_target_cache(model_kwargs or {})
            if input_ids.shape[1] == 0:
                raise BeagleGenerationError("`input_ids` expected with a Beagle assistant, found `inputs_embeds` only: "
                                            "Beagle drafts from the token ids; pass the prompt's ids.")
            self.cache.reset()
            self._handed_off_at = time.perf_counter()
            return input_ids, None
        candidates, candidate_logits = self._draft(input_ids, model_kwargs or {}, model_outputs)
        now = time.perf_counter()
        self.stats.draft_time_s += now - started
        self._handed_off_at = now
        return candidates, candidate_logits

    @torch.no_grad()
    def _draft(self, input_ids, model_kwargs, model_outputs):
        beagle, cache = self.beagle, self.cache
        cur_len = input_ids.shape[1]
        # Positions follow the attention mask (left padding), as the target's own positions do.
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.shape[-1] == cur_len:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            valid = attention_mask.bool()
        else:
            positions = torch.arange(cur_len, device=input_ids.device)[None]
            valid = None

        # 1. End the last round: drop its draft states, append the true states of every newly read token.
        cache.discard_drafts()
        num_new = cur_len - 1 - cache.num_true
        states = target_states(model_outputs, beagle.config.target_layer_ids)
        if states.shape[1] < num_new:
            raise BeagleGenerationError(
                f"the target returned states for {states.shape[1]} tokens, expected {num_new}: Beagle needs the "
                "target's states for every prompt token (do not pass a pre-filled `past_key_values`)."
            )
        new = slice(cache.num_true, cur_len - 1)
        beagle.append_context(cache, states[:, :num_new], positions[:, new], None if valid is None else valid[:, new],
                              next_ids=input_ids[:, new.start + 1 :])

        budget = self.max_length - cur_len - 1  # the verification forward adds one bonus token itself
        self._last_drafted, self._last_copied = 0, False
        # 2a. A copy round: the text repeats an earlier passage; propose what followed it, no draft.
        if self.lookup is not None:
            first = int(valid[0].long().argmax()) if valid is not None else 0  # batch size 1; left padding skipped
            proposal = self.lookup.proposal(input_ids[0, first:], budget)
            if proposal:
                self._last_drafted, self._last_copied = len(proposal), True
                return torch.cat([input_ids, input_ids.new_tensor([proposal])], dim=1), None

        # 2b. Draft a chain from the bonus token.
        num_steps = min(self.num_draft_tokens, budget)
        if num_steps <= 0:
            return input_ids, None
        threshold = self.settings.confidence_threshold
        sequence = input_ids
        token = input_ids[:, -1:]
        position = positions[:, -1:]
        parent_state = None
        processed_logits = []
        for step in range(num_steps):
            draft_kwargs = {}
            if parent_state is not None:
                draft_kwargs = dict(draft_states=parent_state, draft_position_ids=position + step - 1,
                                    draft_next_ids=token)
            out = beagle(input_ids=token, position_ids=position + step, past_key_values=cache, **draft_kwargs)
            logits = draft_logits_to_target_vocab(beagle, out.logits[:, -1].float())
            if len(self.logits_processor) > 0:
                logits = self.logits_processor(sequence, logits)
            if self.do_sample:
                probs = logits.softmax(-1)
                token = sample_categorical(probs)[:, None]
                confidence = probs.gather(-1, token)
                processed_logits.append(logits)
            else:
                token = logits.argmax(-1, keepdim=True)
                confidence = logits.softmax(-1).gather(-1, token) if threshold else None
            sequence = torch.cat([sequence, token], dim=-1)
            parent_state = out.last_hidden_state if beagle.config.concat_draft_states else None
            if threshold and step + 1 < num_steps and float(confidence) < threshold:
                break
        self._last_drafted = sequence.shape[1] - cur_len
        candidate_logits = torch.stack(processed_logits, dim=1) if self.do_sample else None
        return sequence, candidate_logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        num_matches = int(num_matches)
        if self._last_drafted:
            accepted = min(num_matches, self._last_drafted)
            self.stats.drafted.append(self._last_drafted)
            self.stats.accepted.append(accepted)
            if self.lookup is not None:
                self.stats.accepted_from_lookup.append(accepted if self._last_copied else 0)
                self.stats.copy_rounds += self._last_copied
        if self._last_drafted and not self._last_copied:
            if num_matches >= self._last_drafted:
                self.num_draft_tokens = min(self.num_draft_tokens + self.settings.grow, self.settings.max_draft_tokens)
            else:
                self.num_draft_tokens = max(1, self.num_draft_tokens - self.settings.shrink)


# ------------------------------------------------------------------------------------------ stopping mid-round
# The stopping criteria transformers' assisted decoding applies exactly when a round accepts several tokens: it crops
# the accepted tokens at the length limit and at the first EOS, and a time limit has no particular token to stop at.
# Any other criterion (stop strings, the caller's own) it checks only on the whole sequence after each round, so a stop
# inside an accepted block would be passed by: Beagle checks those after every token, as plain decoding does.
ROUND_EXACT_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, MaxTimeCriteria)


def per_token_criteria(criteria) -> list:
    """The criteria transformers' assisted decoding checks only after each round."""
    return [c for c in criteria or [] if not isinstance(c, ROUND_EXACT_CRITERIA)]


# Whether the running `generate` call has a Beagle assistant: set by the `_validate_generation_mode` hook, read by the
# instance-level `_get_stopping_criteria` hook of `beagle.attach` (which runs later in the same call).
BEAGLE_ASSISTANT_IN_CALL = contextvars.ContextVar("beagle_assistant_in_call", default=False)


class PrefixStopping(StoppingCriteria):
    """`criteria` evaluated on every prefix a round added, shortest first, as plain decoding evaluates them after each
    token; `stop_length` is the first length at which one fired (None while none has)."""

    def __init__(self, criteria: list, start: int):
        self.criteria = StoppingCriteriaList(criteria)
        self.checked = start  # the prefixes up to this length are checked (the prompt is never a stop)
        self.stop_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for length in range(self.checked + 1, input_ids.shape[1] + 1):
            if self.stop_length is not None:
                break
            if bool(self.criteria(input_ids[:, :length], scores, **kwargs).any()):
                self.stop_length = length
        self.checked = max(self.checked, input_ids.shape[1])
        return torch.full((input_ids.shape[0],), self.stop_length is not None, dtype=torch.bool, device=input_ids.device)


class HeldBackStreamer:
    """Passes each round's tokens to `streamer` one round late, once the stopping criteria have seen them, and the
    last round's only up to `stopping.stop_length`: the streamed text ends where plain decoding's does."""

    def __init__(self, streamer, stopping: PrefixStopping, length: int):
        self.streamer, self.stopping = streamer, stopping
        self.length = length  # tokens so far, the held round included
        self.held = None

    def put(self, value):
        if self.held is not None:
            self.streamer.put(self.held)
        self.held = value
        self.length += value.shape[-1]

    def end(self):
        if self.held is not None:
            stop = self.stopping.stop_length
            keep = self.held.shape[-1] if stop is None else stop - (self.length - self.held.shape[-1])
            if keep > 0:
                self.streamer.put(self.held[..., :keep])
            self.held = None
        self.streamer.end()


def truncate_generation(output, length: int, prompt_length: int):
    """`generate`'s output (ids, or a GenerateDecoderOnlyOutput) ended after `length` tokens in all: the sequences,
    the per-token scores / logits / attentions / hidden states and the returned cache."""
    if isinstance(output, torch.Tensor):
        return output[:, :length]
    output.sequences = output.sequences[:, :length]
    for name in ("scores", "logits", "attentions", "hidden_states"):
        if getattr(output, name, None) is not None:
            setattr(output, name, getattr(output, name)[: length - prompt_length])
    cache = getattr(output, next(iter(cache_kwargs(type(output), None))), None)
    if cache is not None and callable(getattr(cache, "crop", None)):
        extra = cache.get_seq_length() - (length - 1)  # the last token is never fed to the target
        if extra > 0:
            cache.crop(-extra)
    return output


# --------------------------------------------------------------------------------------------------- dispatch
def _wrap_candidate_generator_factory(original):
    """A `_get_candidate_generator` that lets an assistant offering `beagle_candidate_generator` build its own
    generator (duck typing: remote code may load Beagle's class twice) and defers to `original` otherwise."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _get_candidate_generator(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        factory = getattr(arguments.get("assistant_model"), "beagle_candidate_generator", None)
        if not callable(factory):
            return original(self, *args, **kwargs)
        return factory(self, generation_config=arguments["generation_config"],
                       logits_processor=arguments["logits_processor"])

    return _get_candidate_generator


def _wrap_validate_generation_mode(original):
    """A `_validate_generation_mode` that first lets a Beagle assistant refuse settings it cannot honour (beam search,
    several return sequences, a static cache, a mismatched target) instead of transformers silently dropping the
    assistant or asking for tokenizers."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _validate_generation_mode(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        assistant = (arguments.get("generation_mode_kwargs") or {}).get("assistant_model")
        check = getattr(assistant, "beagle_check_generation", None)
        BEAGLE_ASSISTANT_IN_CALL.set(callable(check))
        if callable(check):
            check(self, arguments["generation_mode"], arguments["generation_config"])
        return original(self, *args, **kwargs)

    return _validate_generation_mode


def _wrap_assisted_decoding(original):
    """An `_assisted_decoding` that, with a Beagle assistant, points a batch to Beagle's own loop, and with stopping
    criteria transformers checks only after each round (stop strings, the caller's own) checks them after every token
    (`PrefixStopping`) and ends the output and the streamed text at the first that fires, so that they equal plain
    decoding's; `original` unchanged otherwise."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _assisted_decoding(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        if not callable(getattr(arguments.get("assistant_model"), "beagle_candidate_generator", None)):
            return original(self, *args, **kwargs)
        if arguments["input_ids"].shape[0] > 1:
            raise BeagleGenerationError(
                f"batch size 1 expected by transformers' assisted decoding, found {arguments['input_ids'].shape[0]}: "
                "Beagle's own loop takes batches of (left-)padded prompts: `target.generate(ids, attention_mask=mask, "
                "custom_generate=beagle_generate, beagle=beagle)`, or `custom_generate=<the Beagle checkpoint folder>, "
                "assistant_model=beagle, trust_remote_code=True`."
            )
        criteria = arguments.get("stopping_criteria") or []
        per_token = per_token_criteria(criteria)
        if not per_token:
            return original(self, *args, **kwargs)
        prompt_length = arguments["input_ids"].shape[1]
        stopping = PrefixStopping(per_token, start=prompt_length)
        arguments["stopping_criteria"] = StoppingCriteriaList(
            [c for c in criteria if isinstance(c, ROUND_EXACT_CRITERIA)] + [stopping])
        if arguments.get("streamer") is not None:
            arguments["streamer"] = HeldBackStreamer(arguments["streamer"], stopping, prompt_length)
        output = original(*bound.args, **bound.kwargs)
        if stopping.stop_length is None:
            return output
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        cut = sequences.shape[1] - stopping.stop_length
        if cut > 0:  # only a round with accepted drafts emits more than one token
            arguments["assistant_model"].generation_stats.cut_last_round(cut)
        return truncate_generation(output, stopping.stop_length, prompt_length)

    return _assisted_decoding


def _wrap_get_stopping_criteria(original):
    """For `beagle.attach` (instance level), which cannot wrap `_assisted_decoding` (transformers looks it up on the
    class): a `_get_stopping_criteria` that refuses, in a call with a Beagle assistant, the criteria transformers would
    check only after each round (stop strings, the caller's own), which a stop inside accepted tokens would pass by."""

    @functools.wraps(original)
    def _get_stopping_criteria(self, *args, **kwargs):
        criteria = original(self, *args, **kwargs)
        per_round = [type(c).__name__ for c in per_token_criteria(criteria)]
        if per_round and BEAGLE_ASSISTANT_IN_CALL.get() and not _hooked(getattr(type(self), "_assisted_decoding")):
            raise BeagleGenerationError(
                f"stopping criteria {per_round} (stop strings, your own) expected Beagle's import-time generation hook, "
                "which checks them after every token; with `beagle.attach(target)` transformers checks them only after "
                f"each round and would pass a stop inside the accepted tokens. Unset {DISABLE_HOOK_ENV}, or run "
                "Beagle's own loop (`generate_with_own_loop`, `custom_generate`), which checks them after every token."
            )
        return criteria

    return _get_stopping_criteria


# The private GenerationMixin methods Beagle wraps, with the parameters each must have.
HOOKED_METHODS = {
    "_get_candidate_generator": (
        _wrap_candidate_generator_factory, ("assistant_model", "generation_config", "logits_processor")
    ),
    "_validate_generation_mode": (
        _wrap_validate_generation_mode, ("generation_mode", "generation_config", "generation_mode_kwargs")
    ),
    # Looked up on the class by `generate`, so `attach_to_target` (instance level) cannot reach it ...
    "_assisted_decoding": (
        _wrap_assisted_decoding, ("input_ids", "stopping_criteria", "streamer", "assistant_model")
    ),
    # ... and refuses instead what it would have checked per token.
    "_get_stopping_criteria": (_wrap_get_stopping_criteria, ("generation_config", "stopping_criteria")),
}
GLOBAL_HOOKED_METHODS = ("_get_candidate_generator", "_validate_generation_mode", "_assisted_decoding")
INSTANCE_HOOKED_METHODS = ("_get_candidate_generator", "_validate_generation_mode", "_get_stopping_criteria")


def transformers_is_supported() -> tuple[bool, str]:
    found = version.parse(transformers.__version__).release
    low, high = (version.parse(v).release for v in SUPPORTED_TRANSFORMERS)
    if not low <= found < high:
        return False, (f"transformers {transformers.__version__} is not supported by Beagle's generation hook "
                       f"(expected >={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]})")
    for name, (_, needed) in HOOKED_METHODS.items():
        method = getattr(GenerationMixin, name, None)
        if method is None or not set(needed) <= set(inspect.signature(method).parameters):
            return False, (f"transformers {transformers.__version__} has no `GenerationMixin.{name}` taking "
                           f"{', '.join(needed)}, which Beagle's generation hook wraps")
    return True, ""


def _hooked(method) -> bool:
    return getattr(method, HOOK_MARKER, False)


def _wrap(name: str, original):
    wrapped = HOOKED_METHODS[name][0](original)
    setattr(wrapped, HOOK_MARKER, True)
    return wrapped


HOOK_UNAVAILABLE_REASON = ""


def global_hook_installed() -> bool:
    """Whether `install_generate_hook` has wrapped every method it wraps on `GenerationMixin`."""
    return all(_hooked(getattr(GenerationMixin, name)) for name in GLOBAL_HOOKED_METHODS)


def install_generate_hook() -> bool:
    """Install (once, idempotently) the dispatch that makes `target.generate(ids, assistant_model=beagle)` use Beagle.

    Skipped when the environment sets BEAGLE_DISABLE_GENERATE_HOOK=1 (use `beagle.attach(target)` instead) or when
    the installed transformers is not a supported version; Beagle then refuses to run with a clear error.
    """
    global HOOK_UNAVAILABLE_REASON
    if global_hook_installed():
        return True
    if os.environ.get(DISABLE_HOOK_ENV, "") not in ("", "0"):
        HOOK_UNAVAILABLE_REASON = f"{DISABLE_HOOK_ENV} is set"
        return False
    supported, reason = transformers_is_supported()
    if not supported:
        HOOK_UNAVAILABLE_REASON = reason
        return False
    for name in GLOBAL_HOOKED_METHODS:
        if not _hooked(getattr(GenerationMixin, name)):
            setattr(GenerationMixin, name, _wrap(name, getattr(GenerationMixin, name)))
    return True


def attach_to_target(target) -> None:
    """Instance-level alternative to the global hook: only `target` dispatches to Beagle assistants."""
    supported, reason = transformers_is_supported()
    if not supported:
        raise BeagleGenerationError(reason)
    for name in INSTANCE_HOOKED_METHODS:
        if not _hooked(target.__dict__.get(name)):
            setattr(target, name, types.MethodType(_wrap(name, getattr(type(target), name)), target))


def detach_from_target(target) -> None:
    for name in INSTANCE_HOOKED_METHODS:
        target.__dict__.pop(name, None)


def unavailable_message() -> str:
    """What a Beagle says where a generating model would answer (`beagle.generation_config`, `beagle.generate`):
    to a caller, and to transformers' stock assisted decoding, which reads the assistant's generation config first
    when the generation hook did not dispatch to Beagle."""
    message = (
        "Beagle is a draft model: it has no generation config and cannot generate alone. Call "
        "`target.generate(input_ids, assistant_model=beagle)`; the draft chain is set by `beagle.config` "
        "(num_draft_tokens, max_draft_tokens, draft_schedule, draft_confidence_threshold) or by the call's "
        "num_assistant_tokens, num_assistant_tokens_schedule and assistant_confidence_threshold."
    )
    if not global_hook_installed():
        reason = HOOK_UNAVAILABLE_REASON or "the generation hook is not installed"
        message += (
            f" If such a call led here, it did not reach Beagle's candidate generator ({reason}): use "
            f"`beagle.attach(target)` first, or unset {DISABLE_HOOK_ENV}, with transformers "
            f">={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]}."
        )
    return message


__all__ = [
    "BeagleCandidateGenerator",
    "BeagleGenerationError",
    "BeagleGenerationStats",
    "attach_to_target",
    "detach_from_target",
    "install_generate_hook",
]
