"""Two-Stage Block-Attention Training: masks, the stage-2 exactness check, the trainer."""

import datasets
import pytest
import torch
from conftest import make_target, target_states
from safetensors.torch import load_file
from transformers import TrainerCallback

from modeling_beagle import BeagleCache, BeagleModel, inverse_block_mask, window_draft_mask, window_starts
from trainer import BeagleTrainer, BeagleTrainingArguments, SpeculativeEvalCallback
import trainer.beagle_trainer as trainer_module
from trainer.objectives import offset_weights, soft_labels_from_states, stage1_forward, stage2_step


# ---------------------------------------------------------------------------------------------------- masks
def reference_window_start(p: int, k: int, eps: int) -> int:
    """Largest eps + w*k <= p over all integers w (written independently of the library)."""
    start = eps
    while start > p:
        start -= k
    while start + k <= p:
        start += k
    return start


@pytest.mark.parametrize("k", [1, 3, 5])
def test_stage_masks_match_brute_force(k):
    length = 13
    offsets = torch.arange(k)  # one sequence per offset value
    positions = torch.arange(length).expand(k, -1)
    starts = window_starts(positions, k, offsets)
    stage1 = inverse_block_mask(positions, positions, starts)
    for b, eps in enumerate(offsets.tolist()):
        for p in range(length):
            s = reference_window_start(p, k, eps)
            assert starts[b, p] == s
            for j in range(length):
                assert stage1[b, p, j] == (j < s)
            for step in range(1, k + 1):
                draft = window_draft_mask(positions, positions, starts, step)
                for m in range(length):
                    expected = s <= m < p and (m - s + 1) < step
                    assert draft[b, p, m] == expected, (eps, p, m, step)


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("variant", [{}, {"recency_bias": True}, {"query_newest_state": True},
                                     {"context_next_token": True}],
                         ids=["plain", "recency", "newest-state", "next-token"])
def test_stage2_equals_inference_draft_steps(variant):
    """With the same weights and tokens, the stage-2 output of the query at offset t (step t) equals the inference
    draft output at draft step t when the drafted tokens are the true tokens."""
    target = make_target("llama", initializer_range=0.2)
    beagle = BeagleModel.from_target(target, attn_implementation="eager", **variant).eval()
    with torch.no_grad():
        for p in beagle.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(3, 96, (2, 14))
    h = target_states(target, ids)
    steps, offsets = 4, torch.tensor([1, 3])
    labels = soft_labels_from_states(beagle, h.flatten(0, 1))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    draft = torch.zeros_like(h)
    simulated = torch.zeros_like(h)
    with torch.no_grad():
        for t in range(1, steps + 1):
            _, _, _, states, at_step = stage2_step(beagle, ids, h, draft, h, labels, loss_mask, torch.ones_like(ids),
                                                   steps, offsets, t, 10.0)
            draft = torch.where(at_step[..., None], states, draft)
            simulated = torch.where(at_step[..., None], states, simulated)
    positions = torch.arange(14).expand(2, -1)
    starts = window_starts(positions, steps, offsets)
    checked = 0
    for b in range(2):
        for s in sorted(set(starts[b].tolist())):
            if s < 0:
                continue
            cache = BeagleCache()
            # each true state is read with the token that followed it: h_{s-1} with t_s, the round's first query
            beagle.append_context(cache, h[b : b + 1, :s], torch.arange(s)[None], next_ids=ids[b : b + 1, 1 : s + 1])
            parent = None
            for t in range(1, steps + 1):
                p = s + t - 1
                if p >= 14:
                    break
                kwargs = {} if parent is None else dict(draft_states=parent, draft_position_ids=torch.tensor([[p - 1]]),
                                                        draft_next_ids=ids[b : b + 1, p : p + 1])
                with torch.no_grad():
                    out = beagle(input_ids=ids[b : b + 1, p : p + 1], position_ids=torch.tensor([[p]]),
                                 past_key_values=cache, **kwargs)
                parent = out.last_hidden_state
                torch.testing.assert_close(out.last_hidden_state[0, 0], simulated[b, p], rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked > 20


def test_reduced_vocabulary_equals_full_when_it_is_the_whole_vocabulary():
    target = make_target("llama", initializer_range=0.2)
    torch.manual_seed(0)
    full = BeagleModel.from_target(target, attn_implementation="eager").eval()
    reduced = BeagleModel.from_target(target, attn_implementation="eager", draft_vocab_size=96).eval()
    reduced.load_state_dict({**full.state_dict(), "draft_to_target": torch.arange(96)})
    reduced.set_draft_vocabulary(torch.arange(96))
    ids = torch.randint(3, 96, (2, 12))
    h = target_states(target, ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    losses = []
    for model in (full, reduced):
        labels = soft_labels_from_states(model, h[mask])
        loss, _ = stage1_forward(model, ids, h, h, labels, mask, torch.ones_like(ids), 3, torch.tensor([0, 2]), 10.0)
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])


def test_stage1_decay_weights_weight_each_query_by_its_offset():
    """`stage1_offset_weights="decay"`: the stage-1 loss is Σ_p β(offset p) L_p / N with β_i ∝ k - i + 1 (mean 1);
    "uniform" is the plain mean. Checked against the per-offset sums the function reports."""
    target = make_target("llama", initializer_range=0.2)
    beagle = BeagleModel.from_target(target, attn_implementation="eager").eval()
    ids = torch.randint(3, 96, (2, 13))
    h = target_states(target, ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = soft_labels_from_states(beagle, h[mask])
    window, offsets = 4, torch.tensor([1, 3])
    beta = offset_weights(window, "decay")
    assert offset_weights(window, "uniform") is None and torch.allclose(beta, torch.tensor([1.6, 1.2, 0.8, 0.4]))
    uniform, stats = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), window, offsets, 10.0)
    decay, _ = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), window, offsets, 10.0,
                              weights=beta)
    per_offset = stats["ce"] + 10.0 * stats["smooth_l1"]  # summed over the queries at each offset
    torch.testing.assert_close(uniform, per_offset.sum() / 26)
    torch.testing.assert_close(decay, (beta * per_offset).sum() / 26)
    assert stats["count"].sum() == 26 and (stats["count"] > 0).all() and not torch.allclose(uniform, decay)
    with pytest.raises(ValueError, match="stage1_offset_weights"):
        BeagleTrainingArguments(output_dir="unused", stage1_offset_weights="linear", report_to=[])


def test_overlap_is_one_minus_total_variation_and_tv_weight_adds_it_to_the_loss():
    """`SoftLabels.cross_entropy_and_overlap`: Σ min(P, Q) = 1 - ½ Σ |P - Q| with full labels, and with sparse top-k
    labels the same sum over those tokens only (at most the full sum for the renormalised P); `tv_weight` w adds
    w × mean(1 - overlap) to the stage-1 and stage-2 losses, and its gradient raises the overlap (one SGD step on the
    TV term alone)."""
    from trainer.objectives import SoftLabels

    torch.manual_seed(0)
    p, logits = torch.softmax(2 * torch.randn(5, 40), -1), 2 * torch.randn(5, 40)
    ce, overlap = SoftLabels(p).cross_entropy_and_overlap(logits)
    q = logits.softmax(-1)
    torch.testing.assert_close(overlap, 1 - 0.5 * (p - q).abs().sum(-1))
    torch.testing.assert_close(ce, SoftLabels(p).cross_entropy(logits))
    top = p.topk(4, -1)
    sparse = SoftLabels(top.values / top.values.sum(-1, keepdim=True), top.indices)
    assert (sparse.cross_entropy_and_overlap(logits)[1] <= torch.minimum(p / top.values.sum(-1, keepdim=True), q)
            .sum(-1) + 1e-6).all()

    target = make_target("llama", initializer_range=0.2)
    beagle = BeagleModel.from_target(target, attn_implementation="eager", noise_type="none").eval()
    ids = torch.randint(3, 96, (2, 13))
    h = target_states(target, ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = soft_labels_from_states(beagle, h[mask])
    offsets = torch.tensor([1, 3])
    plain, stats = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), 4, offsets, 10.0)
    with_tv, _ = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), 4, offsets, 10.0,
                                tv_weight=2.0)
    torch.testing.assert_close(with_tv, plain + 2.0 * (1 - stats["overlap"].sum() / 26))
    draft = torch.zeros_like(h)
    sums = [stage2_step(beagle, ids, h, draft, h, labels, mask, torch.ones_like(ids), 4, offsets, 2, 10.0,
                        tv_weight=w)[:3] for w in (0.0, 2.0)]
    torch.testing.assert_close(sums[1][0], sums[0][0] + 2.0 * (sums[0][1] - sums[0][2]["overlap"].sum()))

    before = stats["overlap"].sum()
    tv_only, _ = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), 4, offsets, 0.0, tv_weight=1.0)
    ce_only, _ = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), 4, offsets, 0.0)
    (tv_only - ce_only).backward()  # the TV term alone
    with torch.no_grad():
        for param in beagle.parameters():
            if param.grad is not None:
                param -= 0.5 * param.grad
    _, after = stage1_forward(beagle, ids, h, h, labels, mask, torch.ones_like(ids), 4, offsets, 10.0)
    assert after["overlap"].sum() > before
    with pytest.raises(ValueError, match="tv_weight"):
        BeagleTrainingArguments(output_dir="unused", tv_weight=-1.0, report_to=[])


# --------------------------------------------------------------------------------------------------- trainer
def tiny_dataset(target, rows=64, prompt=4, answer=28, seed=0):
    torch.manual_seed(seed)
    ids = target.generate(torch.randint(3, 96, (rows, prompt)), do_sample=True, max_new_tokens=answer,
                          min_new_tokens=answer, pad_token_id=0, eos_token_id=None)
    return datasets.Dataset.from_list(
        [{"input_ids": r.tolist(), "loss_mask": [0] * prompt + [1] * answer} for r in ids]
    )


def make_trainer(tmp_path, target, dataset, init_seed=0, **overrides):
    torch.manual_seed(init_seed)
    beagle = BeagleModel.from_target(target, attn_implementation="sdpa", noise_type="none")
    settings = dict(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=8, learning_rate=3e-3,
                    logging_steps=10, report_to=[], stage1_window=3, stage2_steps=3, save_strategy="no",
                    noise_type="none", seed=0, data_seed=0, bf16=False)
    settings.update(overrides)
    args = BeagleTrainingArguments(**settings)
    return BeagleTrainer(model=beagle, args=args, target_model=target, train_dataset=dataset.select(range(56)),
                         eval_dataset=dataset.select(range(56, 64)))


def test_evaluation_scores_every_supervised_position_at_every_draft_step(tmp_path):
    """`BeagleTrainer.evaluate` places the windows at every offset in turn: its first-step α (stage-1 offset 1 and
    stage-2 step 1) is exactly the first draft step's top-1 agreement over all held-out supervised positions, computed
    here directly (each query reads the true states before it); later steps are scored on as many positions; the
    global RNG is left as it was (training's stream does not depend on evaluations)."""
    from trainer.objectives import next_token_ids

    target = make_target("llama", initializer_range=0.2)
    data = tiny_dataset(target)
    trainer = make_trainer(tmp_path, target, data, max_steps=20, stage1_window=3, stage2_steps=4)
    trainer.train()
    counts = {}
    real_step = trainer_module.stage2_step

    def counting_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        counts[args[10]] = counts.get(args[10], 0) + int(out[1])  # (..., offsets, step, smooth_l1_weight)
        return out

    rng = torch.random.get_rng_state()
    trainer_module.stage2_step = counting_step
    try:
        metrics = trainer.evaluate()
    finally:
        trainer_module.stage2_step = real_step
    assert torch.equal(torch.random.get_rng_state(), rng)
    eval_rows = data.select(range(56, 64))
    ids = torch.tensor(eval_rows["input_ids"])
    supervised = torch.tensor(eval_rows["loss_mask"]).bool()
    assert counts == {t: int(supervised.sum()) for t in range(1, 5)}  # every position at every step
    beagle = trainer.beagle.eval()
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
        layer_ids = list(beagle.config.target_layer_ids)
        context = torch.cat([hidden[i] for i in layer_ids], -1) if len(layer_ids) > 1 else hidden[layer_ids[0]]
        logits = beagle(input_ids=ids, context_states=context, context_next_ids=next_token_ids(ids)).logits
        labels = soft_labels_from_states(beagle, hidden[-1][supervised])
    direct = (logits[supervised].argmax(-1) == labels.argmax()).float().mean()
    assert 0 < float(direct) < 1
    assert metrics["eval_alpha_step_1"] == pytest.approx(float(direct), abs=1e-6)
    assert metrics["eval_alpha_offset_1"] == pytest.approx(float(direct), abs=1e-6)
    assert {f"eval_alpha_step_{t}" for t in range(1, 5)} | {f"eval_alpha_offset_{i}" for i in range(1, 4)} <= set(metrics)


def test_training_lowers_loss_and_raises_agreement(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    with torch.no_grad():  # a target whose next token depends mostly on the current one: learnable in seconds
        for name, param in target.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.mul_(0.05)
    data = tiny_dataset(target)
    trainer = make_trainer(tmp_path, target, data, max_steps=120)
    prompts = [torch.tensor(row["input_ids"][:4]) for row in data.select(range(56, 60))]
    trainer.add_callback(SpeculativeEvalCallback(trainer, prompts, max_new_tokens=24))
    before = trainer.evaluate()
    tau_before = trainer.state.log_history[-1]["eval_tau"]
    trainer.train()
    after = trainer.evaluate()
    tau_after = trainer.state.log_history[-1]
    assert tau_after["eval_greedy_identical"] == 1.0
    assert tau_after["eval_tau"] > tau_before
    assert after["eval_ce_offset_1"] < before["eval_ce_offset_1"] - 0.2
    assert after["eval_alpha_step_1"] > before["eval_alpha_step_1"] + 0.1
    history = [log for log in trainer.state.log_history if "stage" in log and "loss" in log]
    assert {log["stage"] for log in history} == {1, 2}
    assert any(k.startswith("stage2_agree_") for log in history for k in log)
    # each log names the stage of the steps it covers (the switch at step 60 falls on a log boundary)
    assert all({k.split("_")[0] for k in log if k.startswith("stage") and k != "stage"} == {f"stage{log['stage']}"}
               for log in history)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_weights(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    data = tiny_dataset(target)
    common = dict(max_steps=24, save_strategy="steps", save_steps=10, logging_steps=5)
    straight = make_trainer(tmp_path / "a", target, data, **common)
    straight.train()
    interrupted = make_trainer(tmp_path / "b", target, data, **common)
    interrupted.add_callback(StopAt(10))  # stage 1 ends at step 12: stop mid-stage-1, resume through stage 2
    interrupted.train()
    # A different initialisation: only a real resume (weights, optimizer, schedule, RNG, data order) ends equal.
    resumed = make_trainer(tmp_path / "b", target, data, init_seed=123, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-10"))
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.state.global_step == 24


def test_saved_checkpoint_records_training_settings(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    trainer = make_trainer(tmp_path, target, tiny_dataset(target), max_steps=4, stage2_steps=2, stage1_window=4,
                           stage1_offset_weights="decay", tv_weight=0.5)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = BeagleModel.from_pretrained(tmp_path / "final")
    assert loaded.config.stage2_steps == 2 and loaded.config.stage1_window == 4
    assert loaded.config.stage1_offset_weights == "decay" and loaded.config.tv_weight == 0.5
    assert not any(k.startswith(("embed", "lm_head")) for k in load_file(tmp_path / "final" / "model.safetensors"))
    assert (tmp_path / "final" / "custom_generate" / "generate.py").is_file()


def test_trainer_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="stage1_ratio"):
        BeagleTrainingArguments(output_dir=str(tmp_path), stage1_ratio=1.5, report_to=[])
    with pytest.raises(ValueError, match="noise_type"):
        BeagleTrainingArguments(output_dir=str(tmp_path), noise_type="laplace", report_to=[])
    target = make_target("llama")
    with pytest.raises(ValueError, match="target_model"):
        BeagleTrainer(model=BeagleModel.from_target(target), args=BeagleTrainingArguments(output_dir=str(tmp_path),
                                                                                        report_to=[]))


def test_head_rows_are_bucketed_and_losses_unchanged():
    """The head runs on supervised-row counts rounded up to HEAD_ROW_BUCKET (bounded matmul shapes: oneDNN caches a
    packed weight per shape on CPU); the padded rows change neither the losses nor the gradients."""
    from trainer.objectives import HEAD_ROW_BUCKET, SoftLabels, position_losses

    target = make_target("llama")
    beagle = BeagleModel.from_target(target)
    seen = []
    original = beagle.compute_logits
    beagle.compute_logits = lambda h: (seen.append(h.shape[0]), original(h))[1]
    rows = HEAD_ROW_BUCKET + 37
    hidden = torch.randn(rows, beagle.config.hidden_size, requires_grad=True)
    states = torch.randn(rows, beagle.config.hidden_size)
    labels = SoftLabels(torch.softmax(torch.randn(rows, beagle.config.vocab_size), -1))
    ce, _, regression, agree = position_losses(beagle, hidden, states, labels)
    assert seen == [2 * HEAD_ROW_BUCKET] and ce.shape == (rows,)
    (ce.sum() + regression.sum()).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference = -(labels.probs * original(hidden).log_softmax(-1)).sum(-1)
    torch.testing.assert_close(ce, reference)
    (reference.sum() + torch.nn.functional.smooth_l1_loss(hidden, states, reduction="none").mean(-1).sum()).backward()
    torch.testing.assert_close(grad, hidden.grad)
