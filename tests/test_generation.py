"""Lossless speculative generation through `target.generate(ids, assistant_model=beagle)`."""

import functools
import io
import random
import string
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout

import pytest
import torch
from conftest import briefly_train, make_target, markov_target, trained_pair
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModel,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    pipeline,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from modeling_beagle import BeagleGenerationError, BeagleModel, TreeShape, generate_with_own_loop
from modeling_beagle.decoding_beagle import CHAIN_LOOKUP_MATCH, CHAIN_LOOKUP_MATCH_SAMPLING, LOOKUP_RULES
from modeling_beagle.generation_beagle import BeagleCandidateGenerator, ChainLookup, cache_kwargs


def fixed_chain(beagle, k=4):
    beagle.config.draft_schedule = "fixed"
    beagle.config.num_draft_tokens = k
    beagle.config.draft_confidence_threshold = 0.0
    return beagle


def tiny_tokenizer(vocab_size=96):
    """A character-level tokenizer over 96 symbols (one character per token id)."""
    chars = (string.ascii_letters + string.digits + string.punctuation + "éü")[:vocab_size]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=chars[0], unk_token=chars[0])


def test_greedy_identity_over_many_prompts():
    target, beagle = trained_pair()
    g = torch.Generator().manual_seed(11)
    total_accepted = 0
    for i in range(60):
        fixed_chain(beagle, k=int(torch.randint(1, 7, (1,), generator=g)))
        length = int(torch.randint(1, 24, (1,), generator=g))
        new = int(torch.randint(1, 40, (1,), generator=g))  # lands mid-draft for most draft lengths
        ids = torch.randint(1, 96, (1, length), generator=g)
        ref = target.generate(ids, do_sample=False, max_new_tokens=new)
        out = target.generate(ids, do_sample=False, max_new_tokens=new, assistant_model=beagle)
        assert torch.equal(out, ref), f"prompt {i}: speculative output differs from plain greedy"
        total_accepted += sum(beagle.generation_stats.accepted)
    assert total_accepted > 100, "the draft never got accepted: the test would not exercise multi-token rounds"


def test_greedy_identity_with_the_drafts_own_head_layout():
    """A draft with more key/value heads than its GQA target (and its own MLP width) is just as lossless."""
    target, beagle = trained_pair("llama", num_key_value_heads=4, intermediate_size=96)
    assert (beagle.config.num_key_value_heads, target.config.num_key_value_heads) == (4, 2)
    g = torch.Generator().manual_seed(17)
    accepted = 0
    for _ in range(12):
        fixed_chain(beagle, k=int(torch.randint(2, 6, (1,), generator=g)))
        ids = torch.randint(1, 96, (1, int(torch.randint(2, 16, (1,), generator=g))), generator=g)
        ref = target.generate(ids, do_sample=False, max_new_tokens=24)
        out = target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=beagle)
        assert torch.equal(out, ref)
        accepted += sum(beagle.generation_stats.accepted)
    assert accepted > 20


def test_greedy_identity_with_eos_inside_drafts():
    target, beagle = trained_pair()
    fixed_chain(beagle, k=5)
    g = torch.Generator().manual_seed(5)
    stopped_early = 0
    for _ in range(20):
        ids = torch.randint(1, 96, (1, int(torch.randint(2, 12, (1,), generator=g))), generator=g)
        free = target.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=None)
        eos = int(free[0, ids.shape[1] + int(torch.randint(3, 30, (1,), generator=g))])
        ref = target.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=eos)
        out = target.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=eos, assistant_model=beagle)
        assert torch.equal(out, ref)
        stopped_early += ref.shape[1] < ids.shape[1] + 40
    assert stopped_early >= 15


def test_greedy_identity_with_logits_processors():
    target, beagle = trained_pair()
    fixed_chain(beagle, k=4)
    g = torch.Generator().manual_seed(2)
    for settings in (
        dict(repetition_penalty=1.3),
        dict(min_new_tokens=25, eos_token_id=int(target.generate(torch.tensor([[3]]), max_new_tokens=3)[0, -1])),
        dict(no_repeat_ngram_size=2),
        dict(max_length=30),
    ):
        for _ in range(4):
            ids = torch.randint(1, 96, (1, 6), generator=g)
            kwargs = {"max_new_tokens": 32, **settings}
            if "max_length" in kwargs:
                kwargs.pop("max_new_tokens")
            ref = target.generate(ids, do_sample=False, **kwargs)
            out = target.generate(ids, do_sample=False, assistant_model=beagle, **kwargs)
            assert torch.equal(out, ref), settings


def stop_string_at(tokenizer, free, prompt_length: int, end: int) -> str:
    """The text of the two generated tokens of `free` (one row) ending at new token `end` + 1: a stop string that
    fires mid-generation."""
    return tokenizer.decode(free[0, prompt_length + end - 1 : prompt_length + end + 1])


def _stopped_mid_round(beagle, new_tokens: int) -> bool:
    """Whether a stop fell inside the last round's accepted block; the statistics count only the `new_tokens` the
    output kept (the prefill's token, then accepted drafts + the bonus token per round)."""
    stats = beagle.generation_stats
    assert new_tokens == 1 + sum(stats.accepted) + stats.rounds, (new_tokens, stats.to_dict())
    return stats.cut_by_stop > 0


def test_greedy_identity_with_stop_strings_and_streamer():
    # transformers' assisted decoding checks stop strings only after each round; Beagle checks every prefix, so the
    # output, the streamed text and the per-token scores end where plain decoding's do, wherever the stop falls.
    target, beagle = trained_pair()
    fixed_chain(beagle, k=4)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([[5, 17, 33]])
    free = target.generate(ids, do_sample=False, max_new_tokens=30)
    inside_a_round = 0
    for end in range(1, 29):
        stop = stop_string_at(tokenizer, free, ids.shape[1], end)
        results = []
        for assistant in (None, beagle):
            buffer = io.StringIO()
            with redirect_stdout(buffer):
                out = target.generate(ids, do_sample=False, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer,
                                      streamer=TextStreamer(tokenizer), assistant_model=assistant,
                                      return_dict_in_generate=True, output_scores=True)
            results.append((out, buffer.getvalue()))
        (ref, ref_text), (spec, spec_text) = results
        assert ref.sequences.shape[1] < free.shape[1], stop
        assert torch.equal(spec.sequences, ref.sequences), stop
        assert spec_text == ref_text and stop in spec_text, stop
        assert len(spec.scores) == len(ref.scores) == ref.sequences.shape[1] - ids.shape[1]
        assert torch.allclose(torch.stack(spec.scores), torch.stack(ref.scores), atol=1e-4)
        cache_name = next(iter(cache_kwargs(type(ref), None)))  # `cache` from transformers 5.24, else past_key_values
        assert (getattr(spec, cache_name).get_seq_length() == getattr(ref, cache_name).get_seq_length()
                == ref.sequences.shape[1] - 1)
        inside_a_round += _stopped_mid_round(beagle, ref.sequences.shape[1] - ids.shape[1])
    assert inside_a_round >= 5, "too few stops fell inside an accepted block to test the per-token check"


def test_greedy_identity_under_random_combined_settings():
    """Both paths against plain greedy with random combinations of draft schedule, logits processors, EOS, stop strings,
    the caller's own criteria and prompt lookup: the settings interact (a stop or EOS inside a copy round, a penalty
    inside a tree), so each is also tested together with the others."""
    target, beagle = trained_pair()
    tokenizer = tiny_tokenizer()
    rng = random.Random(1)
    schedule = {name: getattr(beagle.config, name)  # the pair is shared with other tests
                for name in ("draft_schedule", "num_draft_tokens", "draft_confidence_threshold")}
    try:
        _check_random_combined_settings(target, beagle, tokenizer, rng)
    finally:
        for name, value in schedule.items():
            setattr(beagle.config, name, value)


def _check_random_combined_settings(target, beagle, tokenizer, rng):
    for case in range(40):
        beagle.config.draft_schedule = rng.choice(["fixed", "adaptive"])
        beagle.config.num_draft_tokens = rng.randint(1, 6)
        beagle.config.draft_confidence_threshold = rng.choice([0.0, 0.1, 0.3])
        ids = torch.randint(1, 96, (1, rng.randint(1, 12)), generator=torch.Generator().manual_seed(case))
        kwargs = dict(do_sample=False, max_new_tokens=rng.randint(1, 40))
        free = target.generate(ids, do_sample=False, max_new_tokens=40)[0, ids.shape[1] :].tolist()
        at = rng.randrange(len(free))  # stops taken from the text, so that they fire
        if rng.random() < 0.3:
            kwargs["repetition_penalty"] = rng.choice([1.1, 1.5])
        if rng.random() < 0.3:
            kwargs["no_repeat_ngram_size"] = rng.randint(2, 4)
        if rng.random() < 0.3:
            kwargs["eos_token_id"] = rng.randint(1, 95)
        if rng.random() < 0.3:
            kwargs["min_new_tokens"] = rng.randint(1, 10)
        if rng.random() < 0.4:
            kwargs.update(stop_strings=[tokenizer.decode(free[at : at + rng.randint(1, 3)])], tokenizer=tokenizer)
        if rng.random() < 0.3:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopAfterToken(free[at])])
        lookup = {"prompt_lookup_num_tokens": rng.choice([0, 3, 10])} if rng.random() < 0.5 else {}
        ref = target.generate(ids, **kwargs)
        assert torch.equal(target.generate(ids, assistant_model=beagle, **kwargs, **lookup), ref), (case, kwargs)
        shape = rng.choice(["chain", TreeShape(depth=4, top_k=2, total_tokens=8)])
        assert torch.equal(generate_with_own_loop(target, beagle, ids, tree_shape=shape, **kwargs, **lookup), ref), \
            (case, kwargs, shape)


def test_attach_beside_the_global_hook_keeps_the_per_token_check():
    target, beagle = trained_pair()
    fixed_chain(beagle, k=4)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([[5, 17, 33]])
    free = target.generate(ids, do_sample=False, max_new_tokens=30)
    beagle.attach(target)  # also hooks the instance's stopping criteria, which must defer to the class-level check
    try:
        for end in (3, 11, 19):
            stop = stop_string_at(tokenizer, free, ids.shape[1], end)
            ref = target.generate(ids, do_sample=False, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
            out = target.generate(ids, do_sample=False, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer,
                                  assistant_model=beagle)
            assert torch.equal(out, ref) and ref.shape[1] < free.shape[1], stop
    finally:
        beagle.detach(target)


def test_greedy_outputs_per_token_match_plain_decoding():
    # return_dict_in_generate with every per-token output: one entry per new token, as plain decoding gives, and the
    # hidden states of every layer although Beagle asks the target for fewer (transformers' split needs them all).
    target, beagle = trained_pair()
    fixed_chain(beagle, k=4)
    flags = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_attentions=True,
                 output_hidden_states=True)
    implementation = target.config._attn_implementation  # the pair is shared with other tests
    for ids in (torch.tensor([[5, 17, 33]]), torch.tensor([[60, 2, 9, 71, 4]])):
        target.set_attn_implementation("eager")  # sdpa returns no attention weights
        try:
            ref = target.generate(ids, do_sample=False, max_new_tokens=20, **flags)
            out = target.generate(ids, do_sample=False, max_new_tokens=20, assistant_model=beagle, **flags)
        finally:
            target.set_attn_implementation(implementation)
        assert torch.equal(out.sequences, ref.sequences) and sum(beagle.generation_stats.accepted) > 0
        for name in ("scores", "logits", "attentions", "hidden_states"):
            expected, found = getattr(ref, name), getattr(out, name)
            assert len(found) == len(expected) == 20, name
            for step_expected, step_found in zip(expected, found):
                pairs = (zip(step_expected, step_found) if isinstance(step_expected, tuple)
                         else [(step_expected, step_found)])
                for a, b in pairs:
                    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), name


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_greedy_identity_with_own_stopping_criteria():
    target, beagle = trained_pair()
    fixed_chain(beagle, k=5)
    ids = torch.tensor([[8, 2, 61, 40]])
    free = target.generate(ids, do_sample=False, max_new_tokens=40)
    inside_a_round = 0
    for token in sorted(set(free[0, ids.shape[1] :].tolist())):
        criteria = StoppingCriteriaList([StopAfterToken(token)])
        ref = target.generate(ids, do_sample=False, max_new_tokens=40, stopping_criteria=criteria)
        out = target.generate(ids, do_sample=False, max_new_tokens=40, stopping_criteria=criteria,
                              assistant_model=beagle)
        assert torch.equal(out, ref) and int(ref[0, -1]) == token, token
        inside_a_round += _stopped_mid_round(beagle, ref.shape[1] - ids.shape[1])
    assert inside_a_round >= 2


def test_own_loop_honours_stop_strings(tmp_path):
    # transformers drops the tokenizer on its way to a custom_generate callable: Beagle builds the criterion itself.
    target, beagle = trained_pair()
    beagle.save_pretrained(tmp_path)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([[5, 17, 33]])
    free = target.generate(ids, do_sample=False, max_new_tokens=30)
    for end in (2, 9, 17, 26):
        stop = stop_string_at(tokenizer, free, ids.shape[1], end)
        ref = target.generate(ids, do_sample=False, max_new_tokens=30, stop_strings=stop, tokenizer=tokenizer)
        folder = target.generate(ids, custom_generate=str(tmp_path), assistant_model=beagle, trust_remote_code=True,
                                 do_sample=False, max_new_tokens=30, stop_strings=stop, tokenizer=tokenizer)
        direct = generate_with_own_loop(target, beagle, ids, do_sample=False, max_new_tokens=30,
                                        generation_config=GenerationConfig(stop_strings=[stop]), tokenizer=tokenizer)
        assert ref.shape[1] < free.shape[1]
        assert torch.equal(folder, ref) and torch.equal(direct, ref), stop
    with pytest.raises(BeagleGenerationError, match="tokenizer"):
        generate_with_own_loop(target, beagle, ids, max_new_tokens=5, stop_strings=["a"])
    # stop strings saved in the target's own generation config count too (as in plain generate), and the call's
    # stop_strings (None included) override them
    stop = stop_string_at(tokenizer, free, ids.shape[1], 9)
    ref = target.generate(ids, do_sample=False, max_new_tokens=30, stop_strings=stop, tokenizer=tokenizer)
    target.generation_config.stop_strings = stop
    try:
        saved_ref = target.generate(ids, do_sample=False, max_new_tokens=30, tokenizer=tokenizer)
        assert torch.equal(saved_ref, ref)
        for out in (generate_with_own_loop(target, beagle, ids, do_sample=False, max_new_tokens=30, tokenizer=tokenizer),
                    generate_with_own_loop(target, beagle, ids, max_new_tokens=30, tokenizer=tokenizer,
                                           generation_config=GenerationConfig(do_sample=False)),
                    target.generate(ids, custom_generate=str(tmp_path), assistant_model=beagle, trust_remote_code=True,
                                    do_sample=False, max_new_tokens=30, tokenizer=tokenizer)):
            assert torch.equal(out, ref)
        unstopped = generate_with_own_loop(target, beagle, ids, do_sample=False, max_new_tokens=30, stop_strings=None)
        assert torch.equal(unstopped, free)
        with pytest.raises(BeagleGenerationError, match="tokenizer"):
            generate_with_own_loop(target, beagle, ids, max_new_tokens=5)
    finally:
        target.generation_config.stop_strings = None


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_greedy_identity_other_families(family):
    target, beagle = trained_pair(family)
    fixed_chain(beagle, k=3)
    g = torch.Generator().manual_seed(9)
    for _ in range(6):
        ids = torch.randint(1, 96, (1, int(torch.randint(1, 10, (1,), generator=g))), generator=g)
        ref = target.generate(ids, do_sample=False, max_new_tokens=24)
        assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=beagle), ref)


def test_adaptive_defaults_are_lossless_and_record_statistics():
    target, beagle = trained_pair()
    beagle.config.draft_schedule = "adaptive"
    beagle.config.num_draft_tokens = 4
    beagle.config.draft_confidence_threshold = 0.1
    ids = torch.tensor([[7, 8, 9]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=48)
    out = target.generate(ids, do_sample=False, max_new_tokens=48, assistant_model=beagle)
    assert torch.equal(out, ref)
    stats = beagle.generation_stats
    # The prefill round yields one token; each drafted round yields its accepted drafts plus one bonus token; a last
    # round with no room to draft yields one.
    produced = out.shape[1] - ids.shape[1]
    assert produced - 1 - sum(a + 1 for a in stats.accepted) in (0, 1)
    assert all(0 <= a <= d for a, d in zip(stats.accepted, stats.drafted))
    rates = stats.acceptance_per_position()
    assert len(rates) == max(stats.drafted) and all(0 <= r <= 1 for r in rates)
    assert stats.draft_time_s > 0 and stats.verify_time_s > 0 and stats.tau >= 1


def test_transformers_assistant_settings_size_the_chain():
    """`num_assistant_tokens`, `num_assistant_tokens_schedule` and `assistant_confidence_threshold` in the call act on
    Beagle's chain as on transformers' own assistants; every setting stays lossless."""
    target, beagle = trained_pair()
    beagle.config.draft_schedule, beagle.config.num_draft_tokens = "adaptive", 4
    beagle.config.max_draft_tokens, beagle.config.draft_confidence_threshold = 8, 0.0
    ids = torch.tensor([[7, 8, 9]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=60)

    def run(**settings):
        out = target.generate(ids, do_sample=False, max_new_tokens=60, assistant_model=beagle,
                              prompt_lookup_num_tokens=0, **settings)
        assert torch.equal(out, ref), settings
        stats = beagle.generation_stats
        return stats.drafted, stats.accepted

    # A constant count (transformers' default schedule): every round drafts it, except where the length limit cuts.
    drafted, _ = run(num_assistant_tokens=2)
    assert set(drafted[:-2]) == {2}
    drafted, _ = run(num_assistant_tokens=11)  # above max_draft_tokens: the cap rises to it
    assert drafted[0] == 11 and set(drafted[:-2]) == {11}
    # transformers' heuristic: +2 after a fully accepted round, -1 otherwise, from the call's count.
    for settings in (dict(num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic"),
                     dict(num_assistant_tokens_schedule="heuristic_transient")):
        drafted, accepted = run(**settings)
        assert drafted[0] == settings.get("num_assistant_tokens", 4)
        for d, a, following in zip(drafted, accepted, drafted[1:-2]):
            assert following == (min(d + 2, 8) if a == d else max(1, d - 1)), (drafted, accepted)
        assert len(set(drafted)) > 1
    # Beagle's own schedule: +1 / -1.
    drafted, accepted = run()
    for d, a, following in zip(drafted, accepted, drafted[1:-2]):
        assert following == (min(d + 1, 8) if a == d else max(1, d - 1)), (drafted, accepted)
    # The call's confidence threshold replaces the draft's (here 0: never stop early): near 1, every round stops
    # after its first draft token.
    drafted, _ = run(num_assistant_tokens=4, assistant_confidence_threshold=0.9999)
    assert set(drafted) == {1}

    for bad, match in ((dict(num_assistant_tokens=0), "num_assistant_tokens.*int >= 1.*found 0"),
                       (dict(num_assistant_tokens_schedule="fast"), "num_assistant_tokens_schedule.*'fast'"),
                       (dict(assistant_confidence_threshold=1.5), "assistant_confidence_threshold.*1.5")):
        with pytest.raises(BeagleGenerationError, match=match):
            target.generate(ids, max_new_tokens=5, assistant_model=beagle, **bad)
    # The own loop drafts trees: the chain's settings are refused there, not ignored.
    with pytest.raises(BeagleGenerationError, match="num_assistant_tokens=3.*tree_shape"):
        generate_with_own_loop(target, beagle, ids, max_new_tokens=5, num_assistant_tokens=3)


def test_remote_code_beagle_in_generate(tmp_path):
    target, beagle = trained_pair()
    fixed_chain(beagle, k=4).save_pretrained(tmp_path)
    # The class as remote code defines it: a second copy of BeagleModel, imported from the checkpoint folder.
    remote_cls = get_class_from_dynamic_module("modeling_beagle.BeagleModel", tmp_path)
    assert remote_cls is not BeagleModel  # the hook dispatches by duck typing, not isinstance
    remote = remote_cls.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[4, 40, 12, 9]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=30)
    assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=30, assistant_model=remote), ref)
    assert remote.generation_stats.rounds > 0
    # Loaded with trust_remote_code, transformers binds the folder's custom_generate to the draft itself: a direct
    # `beagle.generate(ids)` still says what to call instead.
    auto = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    for call in (lambda: auto.generate(ids, max_new_tokens=4), lambda: auto.generate(input_ids=ids),
                 lambda: beagle.generate(ids)):
        with pytest.raises(BeagleGenerationError, match="cannot generate alone.*assistant_model=beagle"):
            call()


# ------------------------------------------------------------------------------------------------- sampling
def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    expected = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def _exact_joint_of_tokens_2_and_3(target, prompt, processors):
    """P(t2, t3) of the target's own sampling, marginalising t1 (exact enumeration over a tiny vocabulary)."""
    vocab = target.config.vocab_size

    def next_probs(ids):
        with torch.no_grad():
            logits = target(ids).logits[:, -1].float()
        return processors(ids, logits).softmax(-1)

    joint = torch.zeros(vocab, vocab, dtype=torch.double)
    p1 = next_probs(prompt)[0]
    for t1 in range(vocab):
        s1 = torch.cat([prompt, torch.tensor([[t1]])], dim=1)
        p2 = next_probs(s1)[0]
        s2 = torch.cat([s1.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        p3 = next_probs(s2)
        joint += p1[t1].double() * p2.double()[:, None] * p3.double()
    return joint.flatten()


def _sample_tokens_2_and_3(target, beagle, prompt, n, seed=2024, **generate_kwargs):
    """Counts of (t2, t3) over n speculative generations (both are proposed in the first speculative round), and each
    generation's `beagle.generation_stats`."""
    counts = torch.zeros(target.config.vocab_size**2)
    stats = []
    torch.manual_seed(seed)
    for _ in range(n):
        out = target.generate(prompt, do_sample=True, temperature=0.8, top_k=6, max_new_tokens=4,
                              assistant_model=beagle, **generate_kwargs)
        t2, t3 = out[0, prompt.shape[1] + 1 : prompt.shape[1] + 3].tolist()
        counts[t2 * target.config.vocab_size + t3] += 1
        stats.append(beagle.generation_stats)
    return counts, stats


def test_speculative_sampling_matches_target_distribution(monkeypatch):
    target = make_target("llama", vocab_size=8, initializer_range=0.2, eos_token_id=None, bos_token_id=None,
                         pad_token_id=0)
    torch.manual_seed(0)
    beagle = BeagleModel.from_target(target, attn_implementation="eager", noise_type="none")
    beagle = fixed_chain(briefly_train(beagle, target, steps=60), k=3)  # close to the target, but not equal
    prompt = torch.tensor([[1, 5, 2, 7]])
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(6)])
    exact = _exact_joint_of_tokens_2_and_3(target, prompt, processors)
    n = 1500
    counts, stats = _sample_tokens_2_and_3(target, beagle, prompt, n)
    accepted = torch.bincount(torch.tensor([min(s.accepted[0], 2) for s in stats]), minlength=3)
    assert accepted.min() > n / 20, f"rounds accepting 0/1/2 drafts: {accepted.tolist()} (all paths must be exercised)"
    p_value = _chi_square_p_value(counts, exact)
    assert p_value > 1e-3, f"speculative sampling deviates from the target's distribution (p={p_value:.2e})"

    # The same test rejects a biased rule: verifying against a distribution other than the one the drafts were
    # sampled from (here: the processed draft logits sharpened once more, as if temperature were applied twice).
    # (Treating a sampled draft as one-hot is *not* such a rule: it is lossless, with lower acceptance.)
    original = BeagleCandidateGenerator._draft

    def misreported_draft(self, *args, **kwargs):
        sequence, logits = original(self, *args, **kwargs)
        return sequence, None if logits is None else logits * 2.0

    monkeypatch.setattr(BeagleCandidateGenerator, "_draft", misreported_draft)
    biased, _ = _sample_tokens_2_and_3(target, beagle, prompt, n)
    assert _chi_square_p_value(biased, exact) < 1e-6


# ------------------------------------------------------------------------------------ prompt lookup: copy rounds
def suffix_chain_lookup(num_tokens, copy_match=CHAIN_LOOKUP_MATCH):
    rule = LOOKUP_RULES["suffix"]
    return ChainLookup(rule.match, rule.continuation, num_tokens, max_ngram=32, copy_match=copy_match)


def test_chain_lookup_copies_only_from_a_long_enough_match():
    sequence = torch.tensor([5, 6, 7, 8, 9, 5, 6])  # ends with a repeat of its first 2 tokens
    assert suffix_chain_lookup(3).proposal(sequence, budget=10) == [7, 8, 9]
    assert suffix_chain_lookup(3).proposal(sequence, budget=2) == [7, 8]  # the round's room for tokens
    assert suffix_chain_lookup(3).proposal(sequence, budget=0) is None
    assert suffix_chain_lookup(3, copy_match=3).proposal(sequence, budget=10) is None  # a 2-token match is too short
    assert suffix_chain_lookup(3).proposal(torch.tensor([5, 6, 7, 8, 9, 6]), budget=10) is None  # a 1-token match
    assert suffix_chain_lookup(3).proposal(torch.tensor([1, 2, 3]), budget=10) is None  # no repeat at all
    # the continuation runs into the sequence's end: it repeats with the match's period
    assert suffix_chain_lookup(5).proposal(torch.tensor([4, 1, 2, 1, 2]), budget=10) == [1, 2, 1, 2, 1]


def test_copy_rounds_start_at_the_match_length_of_the_decoding_mode():
    from transformers import GenerationConfig

    target, beagle = trained_pair()
    for do_sample, copy_match in ((False, CHAIN_LOOKUP_MATCH), (True, CHAIN_LOOKUP_MATCH_SAMPLING)):
        config = GenerationConfig(do_sample=do_sample, prompt_lookup_num_tokens=3, max_length=20)
        generator = beagle.beagle_candidate_generator(target, config, LogitsProcessorList())
        assert (generator.lookup.copy_match, generator.lookup.num_tokens) == (copy_match, 3)
        assert generator.num_drafting_tokens == beagle.config.max_draft_tokens  # N = 3 fits the drafts' record
    # a call that does not set it gets the draft's default (config.default_prompt_lookup_num_tokens); 0 turns it off
    default = beagle.beagle_candidate_generator(target, GenerationConfig(max_length=20), LogitsProcessorList())
    assert default.lookup.num_tokens == beagle.config.default_prompt_lookup_num_tokens == 10
    off = GenerationConfig(max_length=20, prompt_lookup_num_tokens=0)
    assert beagle.beagle_candidate_generator(target, off, LogitsProcessorList()).lookup is None


def test_prompt_lookup_is_on_by_default_and_off_with_zero():
    """Without `prompt_lookup_num_tokens`, both paths use the draft's `default_prompt_lookup_num_tokens` (copy rounds
    on the assisted path, the lookup branch in the own loop); 0, from the call or the config, turns it off; the
    output is plain greedy's either way."""
    from modeling_beagle import beagle_generate

    target = markov_target()
    beagle = fixed_chain(BeagleModel.from_target(target, attn_implementation="eager"), k=2)
    ids = target.generate(torch.tensor([[5, 6]]), do_sample=False, max_new_tokens=100)  # looping: every round copies
    ref = target.generate(ids, do_sample=False, max_new_tokens=30)

    def run(path, **kwargs):
        extra = dict(assistant_model=beagle) if path == "chain" else dict(custom_generate=beagle_generate,
                                                                          beagle=beagle, tree_shape="chain")
        out = target.generate(ids, do_sample=False, max_new_tokens=30, **extra, **kwargs)
        assert torch.equal(out, ref), (path, kwargs)
        return beagle.generation_stats

    for path in ("chain", "own"):
        assert sum(run(path).accepted_from_lookup) > 0, path  # on by default
        assert max(run(path).drafted) > beagle.config.max_draft_tokens  # 10 lookup tokens: more than any draft
        assert sum(run(path, prompt_lookup_num_tokens=0).accepted_from_lookup) == 0, path
        beagle.config.default_prompt_lookup_num_tokens = 0
        try:
            assert sum(run(path).accepted_from_lookup) == 0, path
            assert sum(run(path, prompt_lookup_num_tokens=4).accepted_from_lookup) > 0, path
        finally:
            beagle.config.default_prompt_lookup_num_tokens = 10


def test_greedy_identity_with_prompt_lookup_copy_rounds():
    """`prompt_lookup_num_tokens` on the chain path: rounds that copy an earlier passage verify its continuation
    instead of a draft, up to N tokens (more than the draft's longest chain), and the output stays plain greedy; with
    a target that only partly repeats itself (the trained pair) and with one that loops (every copy taken)."""
    looping = markov_target()
    torch.manual_seed(3)
    pairs = [trained_pair(), (looping, BeagleModel.from_target(looping, attn_implementation="eager"))]
    g = torch.Generator().manual_seed(12)
    for p, (target, beagle) in enumerate(pairs):
        copy_rounds = from_lookup = 0
        for i in range(30):
            fixed_chain(beagle, k=int(torch.randint(1, 5, (1,), generator=g)))
            # the prompt: the target's own greedy text, which repeats pieces of itself
            opening = torch.randint(1, 96, (1, int(torch.randint(2, 6, (1,), generator=g))), generator=g)
            ids = target.generate(opening, do_sample=False, max_new_tokens=int(torch.randint(4, 40, (1,), generator=g)))
            new = int(torch.randint(1, 40, (1,), generator=g))
            n = int(torch.randint(1, 13, (1,), generator=g))
            ref = target.generate(ids, do_sample=False, max_new_tokens=new)
            out = target.generate(ids, do_sample=False, max_new_tokens=new, assistant_model=beagle,
                                  prompt_lookup_num_tokens=n)
            assert torch.equal(out, ref), f"pair {p}, prompt {i}: output with copy rounds differs from plain greedy"
            stats = beagle.generation_stats
            assert len(stats.accepted_from_lookup) == stats.rounds
            assert all(f in (0, a) for f, a in zip(stats.accepted_from_lookup, stats.accepted))
            assert max(stats.drafted, default=0) <= max(n, beagle.config.max_draft_tokens)
            assert out.shape[1] - ids.shape[1] - 1 - sum(a + 1 for a in stats.accepted) in (0, 1)
            copy_rounds += stats.copy_rounds
            from_lookup += sum(stats.accepted_from_lookup)
        assert copy_rounds > 20 and from_lookup > copy_rounds * (0.5 if p == 0 else 3), (p, copy_rounds, from_lookup)


def test_copy_rounds_verify_n_tokens_without_drafting(monkeypatch):
    target = markov_target()
    beagle = fixed_chain(BeagleModel.from_target(target, attn_implementation="eager"), k=2)
    # 100 greedy tokens over 96 token ids: the text has entered its loop, so every round's last tokens repeat
    ids = target.generate(torch.tensor([[5, 6]]), do_sample=False, max_new_tokens=100)
    draft_steps = []
    forward = beagle.forward
    monkeypatch.setattr(beagle, "forward", lambda *args, **kwargs: draft_steps.append(1) or forward(*args, **kwargs))
    out = target.generate(ids, do_sample=False, max_new_tokens=25, assistant_model=beagle, prompt_lookup_num_tokens=7)
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=25))
    stats = beagle.generation_stats
    # the prefill gives 1 token; each round then proposes N = 7 (room: 23, 15, 7 tokens), all taken, plus a bonus
    assert stats.drafted == [7, 7, 7] and stats.accepted == [7, 7, 7] and stats.accepted_from_lookup == [7, 7, 7]
    assert stats.copy_rounds == 3 and not draft_steps, "a copy round ran the draft"
    out = target.generate(ids, do_sample=False, max_new_tokens=5, assistant_model=beagle, prompt_lookup_num_tokens=7)
    assert stats is not beagle.generation_stats and beagle.generation_stats.drafted == [3]  # the room left: 5 - 1 - 1


def test_sampling_with_copy_rounds_matches_target_distribution(monkeypatch):
    """Copy rounds propose fixed tokens with no draft distribution: transformers accepts each only where its own
    sample equals it, which keeps the target's distribution (and verifying them as if sampled from a distribution
    they were not drawn from does not)."""
    target = make_target("llama", vocab_size=8, initializer_range=0.2, eos_token_id=None, bos_token_id=None,
                         pad_token_id=0)
    torch.manual_seed(0)
    beagle = fixed_chain(BeagleModel.from_target(target, attn_implementation="eager", noise_type="none"), k=3)
    # every run (lead, x), x = 1..7, occurs earlier: unless the first sampled token is 0, the text's last
    # CHAIN_LOOKUP_MATCH_SAMPLING tokens repeat and the first speculative round copies what followed them
    lead = list(range(1, CHAIN_LOOKUP_MATCH_SAMPLING))
    body = [tok for x in range(1, 8) for tok in (*lead, x, x % 7 + 1)]
    prompt = torch.tensor([body + lead])
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(6)])
    exact = _exact_joint_of_tokens_2_and_3(target, prompt, processors)
    n = 1500
    counts, stats = _sample_tokens_2_and_3(target, beagle, prompt, n, seed=2025, prompt_lookup_num_tokens=3)
    copied = sum(s.copy_rounds > 0 for s in stats)
    assert copied > n / 2, f"only {copied} of {n} generations had a copy round"
    p_value = _chi_square_p_value(counts, exact)
    assert p_value > 1e-3, f"sampling with copy rounds deviates from the target's distribution (p={p_value:.2e})"

    # A biased rule: hand transformers a made-up draft distribution for the copied tokens (uniform), so that it
    # verifies them by speculative sampling as if they had been drawn from it.
    original = BeagleCandidateGenerator._draft

    def misreported(self, *args, **kwargs):
        sequence, logits = original(self, *args, **kwargs)
        if self._last_copied:
            logits = torch.zeros(1, self._last_drafted, target.config.vocab_size)
        return sequence, logits

    monkeypatch.setattr(BeagleCandidateGenerator, "_draft", misreported)
    biased, _ = _sample_tokens_2_and_3(target, beagle, prompt, n, seed=2025, prompt_lookup_num_tokens=3)
    assert _chi_square_p_value(biased, exact) < 1e-6


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_generation_settings_are_refused():
    target, beagle = trained_pair()
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="num_return_sequences"):
        target.generate(ids, do_sample=True, num_return_sequences=2, max_new_tokens=5, assistant_model=beagle)
    with pytest.raises(ValueError, match="num_beams|beam"):
        target.generate(ids, num_beams=2, max_new_tokens=5, assistant_model=beagle)
    with pytest.raises(ValueError, match="[Ss]tatic"):
        target.generate(ids, max_new_tokens=5, cache_implementation="static", assistant_model=beagle)
    for bad in (-2, True, 2.5):  # 0 is valid: off
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
            target.generate(ids, max_new_tokens=5, assistant_model=beagle, prompt_lookup_num_tokens=bad)
    with pytest.raises(ValueError, match="max_matching_ngram_size"):
        target.generate(ids, max_new_tokens=5, assistant_model=beagle, prompt_lookup_num_tokens=4,
                        max_matching_ngram_size=0)
    for name, value in (("assistant_early_exit", 1), ("use_mtp", True), ("speculation_type", "dflash")):
        if hasattr(GenerationConfig(), name):  # other candidate generators, some newer than transformers 5.20
            with pytest.raises(BeagleGenerationError, match=f"{name}={value!r}.*another"):
                target.generate(ids, max_new_tokens=5, assistant_model=beagle, **{name: value})
    if hasattr(GenerationConfig(), "assistant_ensemble_weight"):  # transformers >= 5.25: a lossy verification rule
        for generate in (functools.partial(target.generate, assistant_model=beagle),
                         functools.partial(generate_with_own_loop, target, beagle)):
            with pytest.raises(BeagleGenerationError, match="assistant_ensemble_weight.*0.5.*exact"):
                generate(ids, max_new_tokens=5, assistant_ensemble_weight=0.5)
    with pytest.raises(BeagleGenerationError, match="guidance_scale.*own loop"):
        target.generate(ids, max_new_tokens=5, guidance_scale=1.5, assistant_model=beagle)
    with pytest.raises(BeagleGenerationError, match="batch size 1.*found 2.*custom_generate=beagle_generate"):
        target.generate(ids.repeat(2, 1), max_new_tokens=5, assistant_model=beagle)
    with pytest.raises(BeagleGenerationError, match="input_ids.*inputs_embeds"):
        target.generate(inputs_embeds=target.get_input_embeddings()(ids), max_new_tokens=5, assistant_model=beagle)
    # A conversation's cache from an earlier turn: transformers' assisted decoding would read the prompt again on top
    # of it (its own prompt lookup then diverges from plain decoding), and Beagle has no states for the cached tokens.
    cache = DynamicCache(config=target.config)
    first = target.generate(ids, do_sample=False, max_new_tokens=4, past_key_values=cache)
    with pytest.raises(BeagleGenerationError, match="6 cached tokens"):
        target.generate(torch.cat([first, ids], 1), max_new_tokens=5, past_key_values=cache, assistant_model=beagle)


def test_mismatched_beagle_is_refused_in_generate():
    target, _ = trained_pair()
    other = make_target("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    beagle = BeagleModel.from_target(other)
    with pytest.raises(ValueError, match="hidden_size"):
        target.generate(torch.tensor([[3, 4]]), max_new_tokens=5, assistant_model=beagle)


def test_text_generation_pipeline_with_a_beagle_assistant():
    target, beagle = trained_pair()
    fixed_chain(beagle, k=4)
    tokenizer = tiny_tokenizer()
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)
    assisted = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=beagle)
    for prompt in ("abc", "hello, world", "x9"):
        expected = plain(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
        beagle.generation_stats = None
        assert assisted(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"] == expected
        assert beagle.generation_stats.rounds > 0  # the pipeline's generate went through Beagle
        assert plain(prompt, max_new_tokens=20, do_sample=False, assistant_model=beagle)[0]["generated_text"] == expected


def test_other_assistants_fall_through_to_transformers():
    target, _ = trained_pair()
    ids = torch.tensor([[3, 4, 5, 3, 4]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=10)
    assistant = make_target("llama", initializer_range=0.2)
    assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=10, assistant_model=assistant), ref)
    assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=10, prompt_lookup_num_tokens=3), ref)


ATTACH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import make_target
    from transformers.generation import GenerationMixin
    from modeling_beagle import BeagleModel, BeagleGenerationError
    from modeling_beagle.generation_beagle import HOOK_MARKER
    assert not getattr(GenerationMixin._get_candidate_generator, HOOK_MARKER, False), "global hook installed"
    target, bystander = make_target("llama"), make_target("llama", seed=1)
    beagle = BeagleModel.from_target(target).eval()
    ids = torch.tensor([[3, 4, 5]])
    try:
        target.generate(ids, max_new_tokens=4, assistant_model=beagle)
        raise SystemExit("expected a clear error without the hook")
    except BeagleGenerationError as err:
        assert "attach" in str(err), err
    beagle.attach(target)
    ref = target.generate(ids, do_sample=False, max_new_tokens=12)
    out = target.generate(ids, do_sample=False, max_new_tokens=12, assistant_model=beagle)
    assert torch.equal(out, ref) and beagle.generation_stats.rounds > 0
    assert "_get_candidate_generator" not in vars(bystander)
    # Without the class-level hook nothing checks stop strings or the caller's criteria per token: refused.
    from transformers import StoppingCriteriaList
    from test_generation import StopAfterToken, tiny_tokenizer
    for kwargs in (dict(stop_strings=["ab"], tokenizer=tiny_tokenizer()),
                   dict(stopping_criteria=StoppingCriteriaList([StopAfterToken(7)]))):
        try:
            target.generate(ids, max_new_tokens=4, assistant_model=beagle, **kwargs)
            raise SystemExit(f"expected a clear error for {list(kwargs)} without the hook")
        except BeagleGenerationError as err:
            assert "per token" not in str(err) and "after every token" in str(err), err
            assert ("StopStringCriteria" if "stop_strings" in kwargs else "StopAfterToken") in str(err), err
        target.generate(ids, max_new_tokens=4, **kwargs)  # without a Beagle assistant: transformers as usual
    print("ok")
    """
)


def test_attach_without_global_hook():
    env = dict(os.environ, BEAGLE_DISABLE_GENERATE_HOOK="1")
    result = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
