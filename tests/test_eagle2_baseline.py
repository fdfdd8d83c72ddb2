"""The EAGLE-2-style baseline draft of the benchmarks (benchmarks/eagle2_draft.py, imported by path): checkpoints,
the exactness of cached chain drafting, training through `Eagle2Trainer`, lossless assisted generation, the
`beagle bench` plugin and the `train` command."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import make_target, target_states
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from modeling_beagle.generation_beagle import BeagleGenerationError
from modeling_beagle.modeling_beagle import BeagleCheckpointError
from trainer import BeagleTrainingArguments

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "eagle2_draft.py"


def _load_module(name: str = "eagle2_draft"):
    """A script of `benchmarks/` (not a package) loaded by path and registered under its name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


eagle2 = sys.modules.get("eagle2_draft") or _load_module()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaky_target():
    """A tiny target whose next token depends mostly on the current one: learnable in a second."""
    target = make_target("llama", initializer_range=0.2)
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.mul_(0.05)
    target.generation_config.pad_token_id = 0
    return target


def perturbed(draft, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return draft


def greedy_identical(target, draft, prompts, max_new_tokens=20):
    identical, accepted, rounds = 0, 0, 0
    for prompt in prompts:
        settings = dict(do_sample=False, max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(prompt))
        out = target.generate(prompt, assistant_model=draft, **settings)
        identical += int(torch.equal(out, target.generate(prompt, **settings)))
        accepted += sum(draft.generation_stats.accepted)
        rounds += draft.generation_stats.rounds
    return identical, (accepted + rounds) / max(rounds, 1)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_load_roundtrip_is_strict(tmp_path):
    target = make_target("llama")
    draft = perturbed(eagle2.Eagle2Draft.from_target(target, draft_vocab_size=40)).eval()
    draft.set_draft_vocabulary(torch.randperm(96)[:40].sort().values)
    draft.save_pretrained(tmp_path / "d")
    tensors = load_file(tmp_path / "d" / "model.safetensors")
    assert "draft_to_target" in tensors and "fc.weight" in tensors
    assert not any("embed" in k or "lm_head" in k for k in tensors)  # the target's embedding / head are not saved
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["model_type"] == "eagle2_draft" and "auto_map" not in config

    loaded = eagle2.Eagle2Draft.from_pretrained(tmp_path / "d").eval().bind_target(target)
    ids = torch.randint(3, 96, (2, 9))
    h = target_states(target, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, features=h).logits, draft(input_ids=ids, features=h).logits)
    assert torch.equal(loaded.draft_to_target, draft.draft_to_target)

    del tensors["layer.mlp.up_proj.weight"]
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / "d" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BeagleCheckpointError, match="up_proj.*missing|extra"):
        eagle2.Eagle2Draft.from_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="safe_serialization"):
        draft.save_pretrained(tmp_path / "e", safe_serialization=False)


# ------------------------------------------------------------------------------------------------- exactness
def test_cached_chain_drafting_equals_the_training_unroll():
    """Step i of `eagle2_unroll` (what evaluate() scores) equals chain drafting with a DynamicCache (what the
    candidate generator runs) when the drafted tokens are the true tokens; and a cached forward in pieces equals
    one teacher-forced forward."""
    target = make_target("llama", initializer_range=0.2)
    draft = perturbed(eagle2.Eagle2Draft.from_target(target, attn_implementation="eager")).eval()
    ids = torch.randint(3, 96, (2, 12))
    h = target_states(target, ids)
    steps = 4
    with torch.no_grad():
        unrolled = eagle2.eagle2_unroll(draft, ids, h, steps)
        full = draft(input_ids=eagle2._shift(ids, 1), features=h).last_hidden_state
        for b in range(2):
            for start in (0, 3, 7):
                cache = DynamicCache()
                # The prefix in two pieces (prefill, then one round's accepted rows), like the generator.
                cut = (start + 1) // 2
                rows = [slice(0, cut), slice(cut, start + 1)]
                for piece in rows:
                    if piece.stop > piece.start:
                        out = draft(input_ids=ids[b:b + 1, piece.start + 1:piece.stop + 1], features=h[b:b + 1, piece],
                                    past_key_values=cache)
                        torch.testing.assert_close(out.last_hidden_state[0], full[b, piece], rtol=1e-5, atol=1e-5)
                state = out.last_hidden_state[:, -1:]
                torch.testing.assert_close(state[0, 0], unrolled[0][b, start], rtol=1e-5, atol=1e-5)
                for i in range(2, steps + 1):
                    p = start + i - 1  # the row's position; it reads the true token t_{start + i}
                    if start + i >= 12:
                        break
                    state = draft(input_ids=ids[b:b + 1, start + i:start + i + 1], features=state,
                                  position_ids=torch.tensor([[p]]), past_key_values=cache).last_hidden_state
                    torch.testing.assert_close(state[0, 0], unrolled[i - 1][b, start], rtol=1e-5, atol=1e-5)


def test_tree_nodes_are_what_the_draft_computes_along_each_path():
    """In Beagle's tree loop (`draft_tree` through `Eagle2TreeCache`) every node is among the top-k of its parent's
    logits computed by plain cached chain drafting along the parent's own path (true rows, then one row per path
    token): the tree's masks hand each row exactly its lineage. Also with a left-padded batch."""
    from modeling_beagle import TreeShape, draft_tree
    from modeling_beagle.generation_beagle import draft_topk

    target = make_target("llama", initializer_range=0.2)
    torch.manual_seed(7)
    draft = perturbed(eagle2.Eagle2Draft.from_target(target, attn_implementation="eager",
                                                     draft_confidence_threshold=0.0), scale=0.1).eval()
    ids = torch.randint(3, 96, (2, 9))
    h = target_states(target, ids)
    n = 8  # states 0..7 are read; ids[:, 8] is the root (bonus) token
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded: its prompt starts at column 3
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = draft.new_draft_cache()
    draft.append_context(cache, h[:, :n], positions, valid, next_ids=ids[:, 1:n + 1])
    shape = TreeShape(depth=4, top_k=3, total_tokens=30)
    tokens, parents, depths = draft_tree(draft, cache, ids[:, n], positions[:, -1] + 1, shape)
    assert cache.num_draft > 0 and int(depths.max()) >= 3
    cache.discard_drafts()
    assert cache.num_draft == 0 and cache.kv.get_seq_length() == n

    def path_logits(b, path):
        first = 3 if b == 1 else 0  # the padded row's chain starts at its first real token, positions from 0
        chain = DynamicCache()
        with torch.no_grad():
            out = draft(input_ids=ids[b:b + 1, first + 1:n + 1], features=h[b:b + 1, first:n], past_key_values=chain)
            state = out.last_hidden_state[:, -1:]
            for step, token in enumerate(path):
                state = draft(input_ids=torch.tensor([[token]]), features=state, past_key_values=chain,
                              position_ids=torch.tensor([[n - first + step]])).last_hidden_state
            return draft.compute_logits(state)[0, 0]

    for b in range(2):
        for i in range(tokens.shape[1]):
            path, node = [], int(parents[b, i])
            while node >= 0:
                path.insert(0, int(tokens[b, node]))
                node = int(parents[b, node])
            _, top = draft_topk(draft, path_logits(b, path), shape.top_k)
            assert int(tokens[b, i]) in top.tolist(), f"row {b}, node {i} at depth {int(depths[b, i])}"


# ------------------------------------------------------------------------------- training and generation
def tiny_dataset(target, rows=64, prompt=4, answer=28):
    torch.manual_seed(0)
    ids = target.generate(torch.randint(3, 96, (rows, prompt)), do_sample=True, max_new_tokens=answer,
                          min_new_tokens=answer, pad_token_id=0, eos_token_id=None)
    return datasets.Dataset.from_list([{"input_ids": r.tolist(), "loss_mask": [0] * prompt + [1] * answer}
                                       for r in ids])


def test_training_lowers_the_loss_and_generation_stays_lossless(tmp_path):
    target = peaky_target()
    data = tiny_dataset(target)
    prompts = [torch.tensor(data[i]["input_ids"][:4])[None] for i in range(54, 64)]
    torch.manual_seed(0)
    draft = eagle2.Eagle2Draft.from_target(target, attn_implementation="sdpa")

    identical, tau_untrained = greedy_identical(target, draft.eval(), prompts)
    assert identical == len(prompts)

    args = BeagleTrainingArguments(output_dir=str(tmp_path), bf16=False, max_steps=120, per_device_train_batch_size=8,
                                   learning_rate=3e-3, logging_steps=20, report_to=[], stage2_steps=3,
                                   save_strategy="no", noise_type="none", seed=0, data_seed=0)
    trainer = eagle2.Eagle2Trainer(model=draft, args=args, target_model=target, train_dataset=data.select(range(54)),
                                   eval_dataset=data.select(range(54, 64)))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.8 * losses[0]
    assert all(log.get("stage", 1) == 1 for log in trainer.state.log_history)
    assert after["eval_ce_step_1"] < before["eval_ce_step_1"]
    assert after["eval_alpha_step_1"] > before["eval_alpha_step_1"] + 0.1
    assert {"eval_alpha_step_2", "eval_alpha_step_3"} <= set(after)

    identical, tau = greedy_identical(target, draft.eval(), prompts)
    assert identical == len(prompts)
    assert tau > max(tau_untrained, 1.15)

    # Beagle's own tree loop drives this draft too (`Eagle2TreeCache`): greedy output identical to plain greedy, one
    # prompt at a time and in left-padded batches whose rows accept different numbers of tokens per round.
    from modeling_beagle import TreeShape, beagle_generate

    tree_accepted = 0
    for shape in ("chain", TreeShape(depth=4, top_k=3, total_tokens=10), TreeShape(depth=5, top_k=2, total_tokens=8,
                                                                                   min_prob=0.05)):
        for prompt in prompts[:4]:
            settings = dict(do_sample=False, max_new_tokens=20, attention_mask=torch.ones_like(prompt))
            out = target.generate(prompt, custom_generate=beagle_generate, beagle=draft, tree_shape=shape, **settings)
            assert torch.equal(out, target.generate(prompt, **settings)), f"{shape}: differs from plain greedy"
            tree_accepted += sum(draft.generation_stats.accepted)
    lengths = [2, 4, 3]
    batch = torch.zeros(3, 4, dtype=torch.long)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for row, length in enumerate(lengths):
        batch[row, 4 - length:] = prompts[4 + row][0, :length]
        mask[row, 4 - length:] = 1
    settings = dict(attention_mask=mask, do_sample=False, max_new_tokens=20)
    out = target.generate(batch, custom_generate=beagle_generate, beagle=draft,
                          tree_shape=TreeShape(depth=4, top_k=3, total_tokens=10), **settings)
    assert torch.equal(out, target.generate(batch, **settings))
    assert tree_accepted > 40

    # Sampling: the draft hands its processed probabilities to transformers' speculative sampling.
    prompt = prompts[0]
    torch.manual_seed(3)
    out = target.generate(prompt, assistant_model=draft, do_sample=True, temperature=0.8, top_k=20,
                          max_new_tokens=16, attention_mask=torch.ones_like(prompt), eos_token_id=None)
    stats = draft.generation_stats
    assert out.shape[1] == prompt.shape[1] + 16 and stats.rounds > 0
    assert out.shape[1] - prompt.shape[1] == stats.target_forwards + sum(stats.accepted)  # one token per forward
    with pytest.raises(BeagleGenerationError, match="prompt_lookup_num_tokens.*no copy rounds"):  # not ignored
        target.generate(prompt, assistant_model=draft, prompt_lookup_num_tokens=4, max_new_tokens=4)

    # The bench plugin (loaded by path as `beagle bench --plugin FILE:ARG` does) loads the saved draft and runs.
    trainer.save_model(str(tmp_path / "eagle2"))
    try:
        from trainer.bench import load_plugin
    except ImportError:  # trainer/bench.py absent: call the entry point directly
        factory, arg = eagle2.bench_methods, str(tmp_path / "eagle2")
    else:
        factory, arg = load_plugin(f"{SCRIPT}:{tmp_path / 'eagle2'}")
    (method,) = factory(target, None, arg)
    assert method.name == "eagle2-chain"
    for spec in (f"{tmp_path / 'eagle2'}@tree,tree-lookup", f"{tmp_path / 'eagle2'}@chain,tree"):
        names = [m.name for m in factory(target, None, spec)]
        assert names == ["eagle2-" + n for n in spec.partition("@")[2].split(",")]
    (tree_method,) = factory(target, None, f"{tmp_path / 'eagle2'}@tree")
    try:  # the bench hands its --tree-shape to a plugin that takes it
        from trainer.bench import call_plugin
    except ImportError:
        pass
    else:
        from modeling_beagle import TreeShape

        given, lookup = call_plugin(factory, target, None, f"{tmp_path / 'eagle2'}@tree,tree-lookup",
                                    tree_shape=TreeShape(3, 2, 5, 0.05), prompt_lookup_num_tokens=4)
        assert "tree_shape=3,2,5,0.05: depth=3, top_k=2, total_tokens=5, min_prob=0.05" in given.description
        assert "prompt_lookup_num_tokens=4" in lookup.description
    for bad in (f"{tmp_path / 'eagle2'}@forest", f"{tmp_path / 'eagle2'}@tree,tree", f"@tree"):
        with pytest.raises(ValueError, match="checkpoint folder.*chain"):
            factory(target, None, bad)
    result = tree_method.run(prompt, torch.ones_like(prompt), 12, False, 0.0, 0)
    assert torch.equal(result.output_ids, target.generate(prompt, do_sample=False, max_new_tokens=12,
                                                          attention_mask=torch.ones_like(prompt)))
    assert result.accepted_per_position and result.draft_time_s > 0
    result = method.run(prompt, torch.ones_like(prompt), 12, False, 0.0, 0)
    assert torch.equal(result.output_ids, target.generate(prompt, do_sample=False, max_new_tokens=12,
                                                          attention_mask=torch.ones_like(prompt)))
    assert result.draft_time_s > 0 and draft.generation_stats is not None
    assert result.accepted_per_position and all(0 <= a <= 1 for a in result.accepted_per_position)
    assert len(result.drafted_per_position) == len(result.accepted_per_position)
    torch.manual_seed(0)
    sampled = method.run(prompt, torch.ones_like(prompt), 12, True, 0.7, 0).output_ids
    assert sampled.shape[0] == 1 and sampled.shape[1] <= prompt.shape[1] + 12

    # `beagle bench --prepack` packs the target first; the plugin then packs its draft alike, still lossless.
    from modeling_beagle import is_prepacked, prepack_linear_weights, prepacking_available, unpack_linear_weights

    if prepacking_available():
        prepack_linear_weights(target)
        assert is_prepacked(eagle2.load_draft(str(tmp_path / "eagle2"), target))
        (method,) = factory(target, None, arg)
        result = method.run(prompt, torch.ones_like(prompt), 12, False, 0.0, 0)
        assert torch.equal(result.output_ids, target.generate(prompt, do_sample=False, max_new_tokens=12,
                                                              attention_mask=torch.ones_like(prompt)))
        unpack_linear_weights(target)
    assert not is_prepacked(eagle2.load_draft(str(tmp_path / "eagle2"), target))


# ------------------------------------------------------------------------------------------------- the command
def test_train_command_end_to_end(tmp_path):
    from test_data_and_cli import chat_tokenizer, sharegpt

    target = make_target("llama", initializer_range=0.2)
    target.save_pretrained(tmp_path / "target")
    chat_tokenizer().save_pretrained(tmp_path / "target")
    (tmp_path / "data.json").write_text(json.dumps(sharegpt(24)))
    command = [sys.executable, str(SCRIPT), "train", "--target_model", str(tmp_path / "target"),
               "--dataset", str(tmp_path / "data.json"), "--output_dir", str(tmp_path / "run"), "--max_steps", "4",
               "--per_device_train_batch_size", "4", "--eval_records", "4", "--draft_vocab_size", "48",
               "--stage2_steps", "2", "--report_to", "none", "--save_strategy", "no", "--learning_rate", "1e-3"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[eagle2 train] held-out alpha per draft step" in result.stdout
    saved = tmp_path / "run" / "eagle2"
    draft = eagle2.Eagle2Draft.from_pretrained(saved)
    assert draft.config.draft_vocab_size == 48 and draft.config.stage2_steps == 2
    draft.bind_target(target)
    ids = torch.tensor([[5, 6, 7]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0, assistant_model=draft),
                       ref)


# ---------------------------------------------------------------------------------------- offline cache, DDP knobs
def test_offline_cache_of_a_beagle_trains_the_eagle2_draft_identically(tmp_path):
    """A cache built for a Beagle with the same draft vocabulary serves the EAGLE-2-style draft: its loss on a cached
    batch equals the loss on the same rows with the target run online; gradient checkpointing gives the same
    gradients."""
    from modeling_beagle import BeagleModel
    from trainer import BeagleDataCollator, OfflineCache, OfflineCollator, build_offline_cache

    target = peaky_target()
    data = tiny_dataset(target, rows=12)
    vocab = torch.arange(0, 96, 2)
    beagle = BeagleModel.from_target(target, draft_vocab_size=48)
    beagle.set_draft_vocabulary(vocab)
    cache = build_offline_cache(target, beagle, data, tmp_path / "cache", topk=48, dtype=torch.float32, progress=False)
    draft = perturbed(eagle2.Eagle2Draft.from_target(target, draft_vocab_size=48, attn_implementation="eager"))
    draft.set_draft_vocabulary(vocab)
    args = BeagleTrainingArguments(output_dir=str(tmp_path / "run"), bf16=False, max_steps=3, per_device_train_batch_size=4,
                                   report_to=[], save_strategy="no", noise_type="none", learning_rate=1e-3)
    trainer = eagle2.Eagle2Trainer(model=draft, args=args, target_model=target, train_dataset=OfflineCache(cache.cache_dir))
    rows = [cache[i] for i in range(4)]
    draft.eval()
    offline = trainer.compute_loss(draft, OfflineCollator()(rows))
    online = trainer.compute_loss(draft, BeagleDataCollator()([data[i] for i in range(4)]))
    torch.testing.assert_close(offline, online, rtol=1e-4, atol=1e-4)

    draft.train()
    batch = OfflineCollator()(rows)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            (getattr(draft, "activation_checkpointing_enable", None) or draft.gradient_checkpointing_enable)()
            assert draft.layer.gradient_checkpointing
        draft.zero_grad()
        trainer.compute_loss(draft, batch).backward()
        grads.append([p.grad.clone() for p in draft.parameters() if p.requires_grad])
    (getattr(draft, "activation_checkpointing_disable", None) or draft.gradient_checkpointing_disable)()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    trainer.train()  # the cached rows train through the Trainer loop
    assert trainer.state.global_step == 3


def test_make_eagle2_takes_the_layout_options_and_refuses_beagle_only_ones(tmp_path, caplog):
    """A recipe shared with `beagle train` sizes the baseline's layer with the same layout options, and an option the
    baseline has no counterpart for (`recency_bias`) is an error, not silently dropped; a continuation refuses
    another layout."""
    from trainer.train import BeagleModelArguments

    target = make_target("llama")
    args = BeagleModelArguments(target_model="tiny", num_key_value_heads=1, intermediate_size=48)
    draft = eagle2.make_eagle2(target, args, train_data=None)
    assert draft.config.num_key_value_heads == 1 and draft.config.intermediate_size == 48
    assert draft.layer.self_attn.k_proj.out_features == draft.config.head_dim
    assert draft.layer.mlp.up_proj.out_features == 48

    with pytest.raises(ValueError, match="--recency_bias true: a Beagle option"):
        eagle2.make_eagle2(target, BeagleModelArguments(target_model="tiny", recency_bias=True), train_data=None)

    # Beagle's two EAGLE-input options describe what this draft always reads: the same draft, and the log says so.
    with caplog.at_level(logging.INFO, logger=eagle2.logger.name):
        same = eagle2.make_eagle2(target, BeagleModelArguments(target_model="tiny", num_key_value_heads=1,
                                                               intermediate_size=48, query_newest_state=True,
                                                               context_next_token=True), train_data=None)
    assert {k: v.shape for k, v in same.state_dict().items()} == {k: v.shape for k, v in draft.state_dict().items()}
    notes = [r.getMessage() for r in caplog.records]
    assert any("--query_newest_state true" in m for m in notes) and any("--context_next_token true" in m for m in notes)

    draft.save_pretrained(tmp_path / "draft")
    continued = eagle2.make_eagle2(target, BeagleModelArguments(target_model="tiny", init_from=str(tmp_path / "draft"),
                                                                num_key_value_heads=1), train_data=None)
    assert continued.config.num_key_value_heads == 1
    with pytest.raises(ValueError, match="--num_key_value_heads 2: --init_from .* num_key_value_heads=1"):
        eagle2.make_eagle2(target, BeagleModelArguments(target_model="tiny", init_from=str(tmp_path / "draft"),
                                                        num_key_value_heads=2), train_data=None)


# --------------------------------------------------------------------------------- benchmarks/target_text_alpha.py
def test_target_text_alpha_scores_both_drafts_on_the_same_reply_tokens():
    """`target_text_alpha.py` scores each draft on the target's greedy replies with its trainer's evaluation: the
    rows are the prompt plus exactly `target.generate`'s greedy reply (only the reply supervised), and the step-1 α
    it reports over every reply token equals a direct count of the draft's teacher-forced top-1 hits on those tokens."""
    from modeling_beagle import BeagleModel
    from trainer.bench import Case
    from trainer.objectives import next_token_ids

    tta = _load_module("target_text_alpha")

    target = make_target("llama", initializer_range=0.2)
    target.generation_config.pad_token_id = 0
    target.generation_config.eos_token_id = None
    prompts = [[5, 17, 42, 9], [33, 8, 61, 70, 12, 4]]
    rows = tta.greedy_replies(target, None, [Case("set", str(i), 1, input_ids=p) for i, p in enumerate(prompts)], 10)
    for prompt, row in zip(prompts, rows):
        plain = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10)[0].tolist()
        assert row["input_ids"] == plain
        assert row["loss_mask"] == [0] * len(prompt) + [1] * 10

    beagle = perturbed(BeagleModel.from_target(target)).eval()
    draft = perturbed(eagle2.Eagle2Draft.from_target(target)).eval().bind_target(target)
    with torch.no_grad():
        beagle_hits, eagle_hits, count = 0, 0, 0
        for row in rows:
            seq = torch.tensor([row["input_ids"]])
            h = target_states(target, seq)
            pb = beagle(input_ids=seq, context_states=h, context_next_ids=next_token_ids(seq)).logits.argmax(-1)[0]
            pe = draft(input_ids=eagle2._shift(seq, 1), features=h).logits.argmax(-1)[0]
            for p in range(1, seq.shape[1]):
                if row["loss_mask"][p]:  # position p's token, predicted from row p - 1 (EAGLE: row p - 2 reads t_{p-1})
                    count += 1
                    beagle_hits += int(pb[p - 1] == seq[0, p])
                    eagle_hits += int(p >= 2 and pe[p - 2] == seq[0, p])
    scored_b = tta.evaluate(tta.BeagleTrainer, beagle, target, rows, steps=2, batch_size=2)
    assert scored_b["alpha_step1_all"] == pytest.approx(beagle_hits / count)
    scored_e = tta.evaluate(tta.Eagle2Trainer, draft, target, rows, steps=2, batch_size=2)
    assert scored_e["alpha_step1_all"] == pytest.approx(eagle_hits / count)
    assert len(scored_b["alpha"]) == len(scored_e["alpha"]) == 2
