"""Offline target states: exactness against a fresh target forward, soft labels, resumption, mismatches, disk space."""

import functools
import json
import shutil
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import make_target

from modeling_beagle import BeagleModel
from trainer.objectives import SoftLabels
from trainer.offline_cache import BeagleCacheError, OfflineCache, OfflineCollator, build_offline_cache


def make_dataset(rows: int = 5, seed: int = 0, min_len: int = 6, max_len: int = 18) -> datasets.Dataset:
    """Rows of random ids with a prompt (loss 0) followed by an answer (loss 1); lengths vary."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(rows):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        records.append({"input_ids": torch.randint(1, 96, (length,), generator=g).tolist(),
                        "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return datasets.Dataset.from_list(records)


def fresh_features(target, beagle, ids: list[int]):
    """(context states, top states, full draft-vocabulary probabilities) of one row, unbatched, in fp32."""
    layer_ids = list(beagle.config.target_layer_ids)
    with torch.no_grad():
        hidden = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
        probs = beagle.compute_logits(hidden[-1][0]).float().softmax(-1)
    return torch.cat([hidden[i][0] for i in layer_ids], -1), hidden[-1][0], probs


def read_meta(cache_dir) -> dict:
    return json.loads((cache_dir / "meta.json").read_text())


def assert_same_rows(a: OfflineCache, b: OfflineCache) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        for name, value in a[i].items():
            assert torch.equal(value, b[i][name]), (i, name)


@pytest.mark.parametrize("layer_ids", [[-1], [0, 1], [1, -1]])
def test_cache_equals_fresh_forward(tmp_path, layer_ids):
    target = make_target("llama")
    beagle = BeagleModel.from_target(target, target_layer_ids=layer_ids)
    data = make_dataset()
    cache = build_offline_cache(target, beagle, data, tmp_path / "cache", batch_size=2, topk=8, progress=False)
    assert len(cache) == len(data) and cache.topk == 8
    assert (tmp_path / "cache" / "target_states.bin").exists() == (layer_ids == [0, 1])
    fresh_top, fresh_ids = [], []
    for i, row in enumerate(data):
        got = cache[i]
        context, top, probs = fresh_features(target, beagle, row["input_ids"])
        supervised = torch.tensor(row["loss_mask"]).bool()
        assert torch.equal(got["input_ids"], torch.tensor(row["input_ids"]))
        assert torch.equal(got["loss_mask"], supervised)
        assert got["context_states"].dtype == torch.bfloat16
        assert got["context_states"].shape == (len(row["input_ids"]), 64 * len(layer_ids))
        torch.testing.assert_close(got["context_states"].float(), context, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got["target_states"].float(), top, atol=2e-2, rtol=1e-2)
        values, ids = probs[supervised].topk(8, -1)
        assert torch.equal(got["topk_ids"], ids)
        torch.testing.assert_close(got["topk_probs"], values / values.sum(-1, keepdim=True), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got["topk_probs"].sum(-1), torch.ones(len(ids)))
        fresh_top.append(top[supervised])
        fresh_ids.append(ids)
    # The collated labels follow states[loss_mask] over the padded batch, row by row.
    batch = OfflineCollator(pad_token_id=0)([cache[i] for i in range(len(cache))])
    assert batch["context_states"].shape == (len(data), max(len(r) for r in data["input_ids"]), 64 * len(layer_ids))
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(r) for r in data["input_ids"]]))
    torch.testing.assert_close(batch["target_states"][batch["loss_mask"]].float(), torch.cat(fresh_top),
                               atol=2e-2, rtol=1e-2)
    assert torch.equal(batch["topk_ids"], torch.cat(fresh_ids))
    assert batch["topk_probs"].shape == batch["topk_ids"].shape == (int(batch["loss_mask"].sum()), 8)


def test_full_topk_cross_entropy_equals_fresh(tmp_path):
    target = make_target("llama")
    beagle = BeagleModel.from_target(target)
    data = make_dataset(rows=3)
    cache = build_offline_cache(target, beagle, data, tmp_path, batch_size=3, topk=96, progress=False)
    batch = OfflineCollator()([cache[i] for i in range(len(cache))])
    cached = SoftLabels(probs=batch["topk_probs"], indices=batch["topk_ids"])
    fresh = SoftLabels(torch.cat([fresh_features(target, beagle, row["input_ids"])[2][torch.tensor(row["loss_mask"])
                                                                                      .bool()] for row in data]))
    draft_logits = beagle.compute_logits(torch.randn(len(fresh.probs), 64))
    torch.testing.assert_close(cached.cross_entropy(draft_logits), fresh.cross_entropy(draft_logits),
                               atol=1e-2, rtol=2e-3)
    assert torch.equal(cached.argmax(), fresh.argmax())


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    target = make_target("llama")
    beagle = BeagleModel.from_target(target, target_layer_ids=[0, 1])
    data = make_dataset(rows=5)
    reference = build_offline_cache(target, beagle, data, tmp_path / "reference", batch_size=2, progress=False)

    forward, calls, crash_after = target.forward, [], [2]

    @functools.wraps(forward)
    def counting(*args, **kwargs):  # records the rows of each forward; crashes once `crash_after` rows have run
        if crash_after and sum(calls) >= crash_after[0]:
            raise RuntimeError("simulated crash")
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(target, "forward", counting)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_offline_cache(target, beagle, data, tmp_path / "cache", batch_size=2, progress=False)
    meta = read_meta(tmp_path / "cache")
    assert meta["complete"] is False and meta["rows_done"] == 2
    with pytest.raises(BeagleCacheError, match="2 of 5 rows"):
        OfflineCache(tmp_path / "cache")

    calls.clear()
    crash_after.clear()
    cache = build_offline_cache(target, beagle, data, tmp_path / "cache", batch_size=2, progress=False)
    assert sum(calls) == 3  # only rows 2..4 ran
    assert read_meta(tmp_path / "cache")["complete"] is True
    assert_same_rows(cache, reference)
    calls.clear()
    build_offline_cache(target, beagle, data, tmp_path / "cache", batch_size=2, progress=False)
    assert calls == []  # complete: nothing reruns


def test_mismatches_name_the_field(tmp_path):
    target = make_target("llama")
    beagle = BeagleModel.from_target(target)
    data = make_dataset(rows=3)
    cache = build_offline_cache(target, beagle, data, tmp_path, batch_size=3, progress=False)
    cache.check_target(target, beagle)

    other = make_target("llama", hidden_size=32)
    other_beagle = BeagleModel.from_target(other)
    with pytest.raises(BeagleCacheError, match=r"`target_hidden_size` expected 32 \(this call\), found 64"):
        build_offline_cache(other, other_beagle, data, tmp_path, progress=False)
    with pytest.raises(BeagleCacheError, match=r"`target_hidden_size` expected 64 \(the cache's\), found 32"):
        cache.check_target(other, other_beagle)
    with pytest.raises(BeagleCacheError, match="`target_head_sha256`"):  # same config, other weights
        cache.check_target(make_target("llama", seed=1), beagle)

    shorter = datasets.Dataset.from_list([{k: v[:5] for k, v in row.items()} for row in data])
    with pytest.raises(BeagleCacheError, match=f"`max_length` expected 5 .* found {max(map(len, data['input_ids']))}"):
        build_offline_cache(target, beagle, shorter, tmp_path, progress=False)
    edited = data.map(lambda row, i: {"loss_mask": [1] * len(row["loss_mask"])} if i == 0 else row, with_indices=True)
    with pytest.raises(BeagleCacheError, match="`dataset_sha256`"):  # same ids and lengths, another loss mask
        build_offline_cache(target, beagle, edited, tmp_path, progress=False)

    layered = BeagleModel.from_target(target, target_layer_ids=[1, -1])
    with pytest.raises(BeagleCacheError, match=r"`target_layer_ids` expected \[1, -1\] \(this call\), found \[-1\]"):
        build_offline_cache(target, layered, data, tmp_path, progress=False)
    with pytest.raises(BeagleCacheError, match="`target_layer_ids`"):
        cache.check_target(target, layered)

    rebuilt = build_offline_cache(target, layered, data, tmp_path, progress=False, overwrite=True)
    rebuilt.check_target(target, layered)
    assert read_meta(tmp_path)["target_layer_ids"] == [1, -1]


def test_too_little_disk_space_raises_before_writing(tmp_path, monkeypatch):
    target = make_target("llama")
    beagle = BeagleModel.from_target(target)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 100, free=100))
    with pytest.raises(BeagleCacheError, match=r"disk space expected at least \d+ bytes .* found 100 bytes"):
        build_offline_cache(target, beagle, make_dataset(), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(BeagleCacheError, match="build_offline_cache first"):
        OfflineCache(tmp_path / "cache")


def test_reduced_draft_vocabulary(tmp_path):
    target = make_target("llama")
    beagle = BeagleModel.from_target(target, draft_vocab_size=32)
    beagle.set_draft_vocabulary(torch.randperm(96, generator=torch.Generator().manual_seed(0))[:32])
    data = make_dataset(rows=3)
    cache = build_offline_cache(target, beagle, data, tmp_path, batch_size=2, progress=False)  # topk 64 -> 32
    assert cache.topk == 32
    for i, row in enumerate(data):
        got = cache[i]
        assert got["topk_ids"].min() >= 0 and got["topk_ids"].max() < 32
        probs = fresh_features(target, beagle, row["input_ids"])[2][torch.tensor(row["loss_mask"]).bool()]
        assert probs.shape[-1] == 32
        torch.testing.assert_close(got["topk_probs"], probs.gather(-1, got["topk_ids"]), atol=1e-3, rtol=1e-3)
    remapped = BeagleModel.from_target(target, draft_vocab_size=32)
    with pytest.raises(BeagleCacheError, match="`draft_to_target_sha256`"):
        cache.check_target(target, remapped)


def test_trainer_trains_from_an_offline_cache(tmp_path):
    """BeagleTrainer reads states and top-k soft labels from the cache (no target forward) and learns."""
    from test_training import tiny_dataset

    from trainer import BeagleTrainer, BeagleTrainingArguments, OfflineCache, build_offline_cache

    target = make_target("llama", initializer_range=0.2)
    data = tiny_dataset(target, rows=32)
    torch.manual_seed(0)
    beagle = BeagleModel.from_target(target, noise_type="none")
    build_offline_cache(target, beagle, data, tmp_path / "cache", batch_size=8, topk=16, progress=False)
    cache = OfflineCache(tmp_path / "cache")
    calls = {"n": 0}
    hook = target.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    args = BeagleTrainingArguments(output_dir=str(tmp_path / "run"), bf16=False, max_steps=8, per_device_train_batch_size=8,
                                   learning_rate=3e-3, report_to=[], save_strategy="no", stage1_window=3,
                                   stage2_steps=2, noise_type="none", logging_steps=2)
    trainer = BeagleTrainer(model=beagle, args=args, target_model=target, train_dataset=cache)
    trainer.train()
    hook.remove()
    assert calls["n"] == 0
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)


def test_build_runs_the_target_on_unpadded_groups_of_equal_length(tmp_path, monkeypatch):
    """Within a batch, rows of equal length go through the target together and unpadded (no attention mask): the
    fast causal kernels, and states that do not depend on which rows shared the batch."""
    target = make_target("llama")
    beagle = BeagleModel.from_target(target)
    records = [{"input_ids": list(range(1, n + 1)), "loss_mask": [0, 0] + [1] * (n - 2)} for n in (5, 7, 5, 5, 6)]
    data = datasets.Dataset.from_list(records)
    forward, shapes = target.forward, []

    @functools.wraps(forward)
    def recording(*args, **kwargs):
        assert kwargs.get("attention_mask") is None
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(target, "forward", recording)
    cache = build_offline_cache(target, beagle, data, tmp_path, batch_size=4, topk=8, progress=False)
    assert shapes == [(3, 5), (1, 7), (1, 6)]
    monkeypatch.undo()
    for i, record in enumerate(records):  # every row's labels landed at its own offsets
        _, top, probs = fresh_features(target, beagle, record["input_ids"])
        assert torch.equal(cache[i]["topk_ids"], probs[2:].topk(8, -1).indices)
        torch.testing.assert_close(cache[i]["context_states"].float(), top, atol=2e-2, rtol=1e-2)
