"""The data pipeline (ShareGPT / chat messages / text, assistant-only loss mask) and `beagle train` end to end."""

import json
import logging
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import make_target
from test_generation import tiny_tokenizer

from modeling_beagle import BeagleModel
from trainer.data import BeagleDataError, DataReport, build_dataset, read_records

TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def sharegpt(n):
    return [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}x"},
                                             {"from": "gpt", "value": f"ANS{i}yz"},
                                             {"from": "human", "value": "more"},
                                             {"from": "gpt", "value": f"B{i}"}]} for i in range(n)]


def test_truncated_json_array_keeps_every_complete_record(tmp_path):
    text = json.dumps(sharegpt(3))
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('{"id"') + 20])  # cut inside the third record
    report = DataReport()
    records = read_records(path, report)
    assert len(records) == 2 and report.truncated_file
    assert report.skipped["incomplete record at the end of the file"] == 1
    dataset, report = build_dataset(path, chat_tokenizer(), report=report)
    assert len(dataset) == 2 and "cut off" in report.summary()
    # with max_records ending before the cut, the cut-off record is not one this dataset skipped
    dataset, report = build_dataset(path, chat_tokenizer(), max_records=1)
    assert len(dataset) == 1 and not report.truncated_file and not report.skipped
    assert report.summary().startswith("1 of the first 1 (of 2) records kept; skipped: none;")


def test_jsonl_of_arrays_gzip_and_non_utf8_lines_are_read_or_refused_by_name(tmp_path):
    """A JSONL file whose lines are chat-message lists is JSON lines, not one array; text after a JSON array is
    refused; gzip is read; a JSONL line that is not UTF-8 is skipped and counted; a JSON array that is not UTF-8 is
    refused naming the file."""
    import gzip

    conversations = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(3)]
    path = tmp_path / "lists.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in conversations) + "\n")
    assert read_records(path) == conversations
    dataset, report = build_dataset(path, chat_tokenizer())
    assert len(dataset) == 3 and report.kept == 3
    path = tmp_path / "two.json"
    path.write_text(json.dumps(sharegpt(2), indent=1) + "\n" + json.dumps(sharegpt(2), indent=1))
    with pytest.raises(BeagleDataError, match="more text after the array"):
        read_records(path)
    path = tmp_path / "data.json.gz"
    path.write_bytes(gzip.compress(json.dumps(sharegpt(4)).encode()))
    assert read_records(path) == sharegpt(4)
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in sharegpt(3)]
    path.write_bytes(b"\n".join(lines[:1] + ['{"text": "caf\xe9"}'.encode("latin-1")] + lines[1:]))
    report = DataReport()
    assert read_records(path, report) == sharegpt(3) and report.skipped["JSONL lines that are not UTF-8"] == 1
    path = tmp_path / "latin1.json"
    path.write_bytes(('[{"text": "caf\xe9"}]').encode("latin-1"))
    with pytest.raises(BeagleDataError, match="latin1.json: a JSON file expected UTF-8"):
        read_records(path)


def test_skip_records_takes_the_records_after_the_first_ones(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(sharegpt(5)))
    tokenizer = chat_tokenizer()
    dataset, report = build_dataset(path, tokenizer, max_records=2, skip_records=2)
    answers = [tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]) for row in dataset]
    assert answers == ["ANS2yz|B2|", "ANS3yz|B3|"]  # records 3 and 4, in order
    assert report.summary().startswith("2 of records 3-4 (of 5) records kept;")
    dataset, report = build_dataset(path, tokenizer, skip_records=4)  # the rest of the file
    assert len(dataset) == 1 and report.summary().startswith("1 of records 5-5 (of 5) records kept;")
    with pytest.raises(BeagleDataError, match="skip_records 5: expected fewer than the source's 5"):
        build_dataset(path, tokenizer, skip_records=5)
    with pytest.raises(BeagleDataError, match="skip_records expected a non-negative integer, found -1"):
        build_dataset(path, tokenizer, skip_records=-1)


def test_loss_mask_covers_assistant_tokens_only(tmp_path):
    tokenizer = chat_tokenizer()
    path = tmp_path / "data.json"
    path.write_text(json.dumps(sharegpt(2)))
    dataset, report = build_dataset(path, tokenizer)
    row = dataset[0]
    supervised = tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
    # each assistant turn is supervised with its end-of-turn marker, nothing of the user turns or role headers
    assert supervised == "ANS0yz|B0|"
    assert report.supervised_tokens == sum(sum(r["loss_mask"]) for r in dataset)


def test_formats_jsonl_messages_text_and_datasets(tmp_path):
    tokenizer = chat_tokenizer()
    lines = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
             json.dumps({"text": "plain words"}),
             "{not json",
             json.dumps({"conversations": [{"from": "human", "value": "only a question"}]}),
             json.dumps({"conversations": [{"from": "gpt", "value": 3}]})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    dataset, report = build_dataset(path, tokenizer)
    assert len(dataset) == 2
    assert report.skipped == {"unparsable JSONL lines": 1, "conversations without an assistant turn": 1,
                              "malformed records": 1}
    text_row = dataset[1]
    assert all(text_row["loss_mask"])  # plain text: every token is supervised
    from_hf = datasets.Dataset.from_list([{"conversations": c["conversations"]} for c in sharegpt(3)])
    dataset, _ = build_dataset(from_hf, tokenizer)
    assert len(dataset) == 3


def test_truncation_and_no_template_fallback(tmp_path, caplog):
    tokenizer = tiny_tokenizer()  # no chat template
    path = tmp_path / "data.json"
    path.write_text(json.dumps(sharegpt(2)))
    with caplog.at_level(logging.WARNING):
        dataset, _ = build_dataset(path, tokenizer, max_length=12)
    assert "no chat template" in caplog.text
    assert all(len(r["input_ids"]) <= 12 for r in dataset)


def test_dataset_without_assistant_tokens_is_refused(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}]}] * 3))
    with pytest.raises(BeagleDataError, match="no assistant tokens"):
        build_dataset(path, chat_tokenizer())
    with pytest.raises(BeagleDataError, match="existing JSON"):
        build_dataset(tmp_path / "missing.json", chat_tokenizer())


def test_beagle_train_end_to_end(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    target.save_pretrained(tmp_path / "target")
    chat_tokenizer().save_pretrained(tmp_path / "target")
    data = tmp_path / "sharegpt.json"
    text = json.dumps(sharegpt(40))
    data.write_text(text[:-30])  # truncated, as the real ShareGPT copy is
    config = {"target_model": str(tmp_path / "target"), "dataset": str(data), "output_dir": str(tmp_path / "run"),
              "max_steps": 6, "per_device_train_batch_size": 4, "stage1_window": 3, "stage2_steps": 2,
              "eval_records": 4, "draft_vocab_size": 48, "report_to": [], "save_strategy": "no",
              "logging_steps": 2, "learning_rate": 1e-3, "bf16": False}
    (tmp_path / "train.json").write_text(json.dumps(config))
    command = [shutil.which("beagle")] if shutil.which("beagle") else [sys.executable, "-m", "trainer.cli"]
    result = subprocess.run(command + ["train", str(tmp_path / "train.json")], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "39 of 39 records kept" in result.stdout and "held-out alpha per draft step" in result.stdout
    saved = tmp_path / "run" / "beagle"
    assert f"saved the Beagle checkpoint to {saved}" in result.stdout
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.bin"))  # no pickle in what ships
    beagle = BeagleModel.from_pretrained(saved)
    assert beagle.config.draft_vocab_size == 48 and beagle.config.stage2_steps == 2
    beagle.bind_target(target)
    ids = torch.tensor([[5, 6, 7]])
    ref = target.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0,
                                       assistant_model=beagle), ref)
    # The same command again (no resume) does not run over the finished run's folder, and deletes nothing
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    again = subprocess.run(command + ["train", str(tmp_path / "train.json")], capture_output=True, text=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert again.returncode == 1 and "expected no earlier run" in again.stderr and "'beagle'" in again.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_fresh_run_refuses_or_overwrites_an_earlier_runs_output_dir(tmp_path):
    """Without resuming, an earlier run's checkpoints, ledger, regenerated data, τ curve and final draft in the output
    folder would be taken for the new run's (a later resume continuing the other run's latest checkpoint)."""
    from types import SimpleNamespace

    from trainer.train import BeagleArgumentError, check_fresh_output_dir

    run = tmp_path / "run"

    def args(resume=None, overwrite=False):
        return SimpleNamespace(resume_from_checkpoint=resume, output_dir=str(run), overwrite_output_dir=overwrite)

    check_fresh_output_dir(args(), "beagle", "[test]")  # no folder yet
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "checkpoint-x.txt").write_text("mine too")
    check_fresh_output_dir(args(), "beagle", "[test]")  # nothing of a run in it
    for name in ("checkpoint-3", "checkpoint-6", "beagle"):
        (run / name).mkdir()
    for name in ("compute_ledger.json", "regenerated.jsonl", "tau_curve.jsonl"):
        (run / name).write_text("{}")
    with pytest.raises(BeagleArgumentError, match=r"\['beagle', 'checkpoint-3', 'checkpoint-6', 'compute_ledger.json', "
                                                  r"'regenerated.jsonl', 'tau_curve.jsonl'\]"):
        check_fresh_output_dir(args(), "beagle", "[test]")
    check_fresh_output_dir(args(resume="true"), "beagle", "[test]")  # continuing it is what they are for
    assert len(list(run.iterdir())) == 8
    check_fresh_output_dir(args(overwrite=True), "beagle", "[test]")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-x.txt", "notes.txt"]


def test_option_values_are_checked_and_typed_as_on_the_command_line(tmp_path):
    """Counts below their least value are refused (negative ones would slice records off the other end), and a
    YAML file's values take the command line's types: YAML reads 1e-4 as a string, and "false" quoted is true."""
    import yaml

    from trainer.train import BeagleArgumentError, parse

    base = ["--target_model", "t", "--dataset", "d", "--output_dir", str(tmp_path / "o")]
    for option, value in (("max_records", "-5"), ("max_length", "-1"), ("max_length", "1"), ("eval_records", "-1"),
                          ("tau_eval_prompts", "-1"), ("skip_records", "-2"), ("regenerate_batch_size", "0"),
                          ("offline_topk", "0"), ("max_steps", "0"), ("max_steps", "-3")):
        with pytest.raises(BeagleArgumentError, match=f"`{option}` expected"):
            parse(base + [f"--{option}", value])
    assert parse(base + ["--bf16", "auto"])[2].bf16 in (True, False)  # the default's name is accepted
    config = {"target_model": "t", "dataset": "d", "output_dir": str(tmp_path / "o"), "learning_rate": "1e-4",
              "recency_bias": "false", "stage2_steps": "3", "target_layer_ids": -1, "max_records": None}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    model_args, data_args, training_args = parse([str(tmp_path / "c.yaml")])
    assert training_args.learning_rate == 1e-4 and model_args.recency_bias is False
    assert training_args.stage2_steps == 3 and model_args.target_layer_ids == [-1] and data_args.max_records is None
    for option, value in (("recency_bias", "maybe"), ("max_steps", 1.5), ("max_steps", True),
                          ("target_layer_ids", ["top"]), ("learning_rate", "fast")):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, option: value}))
        with pytest.raises(BeagleArgumentError, match=f"option `{option}` expected"):
            parse([str(tmp_path / "c.yaml")])


def test_regenerate_writes_target_replies_and_resumes(tmp_path, monkeypatch):
    from trainer import regenerate as regen

    target = make_target("llama", initializer_range=0.2)
    target.save_pretrained(tmp_path / "target")
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(tmp_path / "target")
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(sharegpt(7)))
    out = tmp_path / "regen.jsonl"
    calls = {"n": 0}
    original = type(target).generate

    def flaky_generate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted during the second batch
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "generate", flaky_generate)
    with pytest.raises(KeyboardInterrupt):
        regen.regenerate(target, tokenizer, data, str(out), batch_size=3, max_new_tokens=6, progress=False)
    assert len(out.read_text().splitlines()) == 3
    with open(out, "a") as handle:
        handle.write('{"messages": [{"role": "us')  # a torn line from a crash mid-write
    calls["n"] = 10
    report = regen.regenerate(target, tokenizer, data, str(out), batch_size=3, max_new_tokens=6, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # the resumed run's report covers every reply, the 3 an earlier run wrote included
    assert len(lines) == 7 and report.kept + report.skipped["empty replies"] == 7
    # every reply is the target's own greedy continuation of the prompt
    first = lines[0]["messages"]
    prompt = tokenizer.apply_chat_template(first[:-1], add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    expected = original(target, prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                        pad_token_id=0)
    assert first[-1]["content"] == tokenizer.decode(expected[0, prompt.shape[1] :], skip_special_tokens=True)
    dataset, _ = build_dataset(out, tokenizer)
    assert 0 < len(dataset) <= 7
    # The finished file is not taken for another data set's (or a smaller record limit's) replies: refused, unchanged
    written = out.read_bytes()
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"other {i}"},
                                                    {"from": "gpt", "value": "a"}]} for i in range(9)]))
    for source, limit in ((other, None), (data, 5)):
        with pytest.raises(BeagleDataError, match="another data set"):
            regen.regenerate(target, tokenizer, source, str(out), batch_size=3, max_new_tokens=6, max_records=limit,
                             progress=False)
        assert out.read_bytes() == written


def test_regenerate_skips_prompts_longer_than_the_limit(tmp_path):
    from trainer import regenerate as regen

    target = make_target("llama", initializer_range=0.2)
    tokenizer = chat_tokenizer()
    records = sharegpt(4)
    records[1]["conversations"][0]["value"] = "long " * 40  # this prompt alone exceeds the limit
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(records))
    limit = max(len(tokenizer.apply_chat_template([{"role": "user", "content": r["conversations"][0]["value"]}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"]) for i, r in enumerate(records) if i != 1)
    report = regen.regenerate(target, tokenizer, data, str(tmp_path / "out.jsonl"), batch_size=4, max_new_tokens=3,
                              max_prompt_tokens=limit, progress=False)
    assert report.records == 3 and report.skipped["prompts longer than max_prompt_tokens"] == 1
    written = [json.loads(line)["messages"][0]["content"] for line in open(tmp_path / "out.jsonl")]
    assert written == [records[i]["conversations"][0]["value"] for i in (0, 2, 3)]


def tiny_train_options(tmp_path, **options) -> dict:
    """A tiny chat target and 24 ShareGPT records saved in tmp_path, and `beagle train` options for them (4 steps
    of both stages into tmp_path/run) updated with `options`."""
    target = make_target("llama", initializer_range=0.2)
    target.save_pretrained(tmp_path / "target")
    chat_tokenizer().save_pretrained(tmp_path / "target")
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt(24)))
    return {"target_model": str(tmp_path / "target"), "dataset": str(tmp_path / "sharegpt.json"),
            "output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
            "stage1_window": 3, "stage2_steps": 2, "eval_records": 4, "report_to": [], "bf16": False, **options}


def test_beagle_train_recipe_pipeline_regenerate_offline_cache_and_record(tmp_path):
    """The recipe's steps in one `beagle train`: regenerate with the target, build the offline cache, train both
    stages from it; the checkpoint records the run, and a second run from it (`init_from`) adds to the record."""
    from trainer.offline_cache import OfflineCache

    config = tiny_train_options(tmp_path, regenerate=True, regenerate_batch_size=8, regenerate_max_new_tokens=8,
                                offline_cache_dir=str(tmp_path / "cache"), offline_topk=8, draft_vocab_size=48,
                                save_strategy="no", logging_steps=2)
    from trainer.train import run_training

    (tmp_path / "train.json").write_text(json.dumps(config))
    saved = run_training([str(tmp_path / "train.json")])
    assert len((tmp_path / "run" / "regenerated.jsonl").read_text().splitlines()) == 24
    assert len(OfflineCache(tmp_path / "cache" / "train")) + len(OfflineCache(tmp_path / "cache" / "eval")) > 0
    record = BeagleModel.from_pretrained(saved).config.training_record
    assert record["total_steps"] == 4 and len(record["runs"]) == 1 and record["runs"][0]["regenerated"]
    assert record["total_token_updates"] > 0 and record["total_wall_s"] > 0
    config.update(init_from=saved, output_dir=str(tmp_path / "run2"), regenerate=False,
                  dataset=str(tmp_path / "run" / "regenerated.jsonl"), offline_cache_dir=None, max_steps=2)
    (tmp_path / "train2.json").write_text(json.dumps(config))
    record = BeagleModel.from_pretrained(run_training([str(tmp_path / "train2.json")])).config.training_record
    assert [r["steps"] for r in record["runs"]] == [4, 2] and record["total_steps"] == 6


def test_a_stopped_and_resumed_run_records_the_compute_of_both_processes(tmp_path, monkeypatch):
    """`resume_from_checkpoint`: each `beagle train` process is a segment of <output_dir>/compute_ledger.json, and
    the final draft's training_record (the model card's total compute) sums them all; the τ learning curve's time
    axis continues across the resume instead of restarting at zero."""
    import trainer.train as train_module

    monkeypatch.setattr(train_module, "load_prompts", lambda name: [{"turns": ["q1x"]}])
    config = tiny_train_options(tmp_path, save_steps=2, eval_strategy="steps", eval_steps=2, tau_eval_prompts=1,
                                tau_eval_new_tokens=4)
    (tmp_path / "first.json").write_text(json.dumps(config))
    train_module.run_training([str(tmp_path / "first.json")])
    first = json.loads((tmp_path / "run" / "compute_ledger.json").read_text())["segments"]
    assert [(s["first_step"], s["last_step"], s["steps"]) for s in first] == [(0, 4, 4)]
    assert first[0]["wall_s"] >= first[0]["train_wall_s"] > 0 and first[0]["token_updates"] > 0

    # the "stopped" run continues from its step-2 checkpoint to a longer schedule (6 steps)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    saved = train_module.run_training([str(tmp_path / "first.json"), "--max_steps", "6",
                                       "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2")])
    segments = json.loads((tmp_path / "run" / "compute_ledger.json").read_text())["segments"]
    assert segments[0] == first[0] and [(s["first_step"], s["last_step"]) for s in segments] == [(0, 4), (2, 6)]
    record = BeagleModel.from_pretrained(saved).config.training_record
    assert [r["steps"] for r in record["runs"]] == [4, 4] and record["total_steps"] == 8  # steps 3-4 ran twice
    assert record["total_wall_s"] == pytest.approx(sum(s["wall_s"] for s in segments), abs=0.2)
    assert record["total_token_updates"] == sum(s["token_updates"] for s in segments)
    assert "resume_from_checkpoint" in record["runs"][1]["command"]
    curve = [json.loads(line) for line in (tmp_path / "run" / "tau_curve.jsonl").read_text().splitlines()]
    resumed = curve[2:]  # first process: steps 2 and 4 (the final evaluation is step 4's); then the resumed one
    assert [p["step"] for p in curve] == [2, 4, 4, 6]
    assert all(p["train_wall_s"] > first[0]["train_wall_s"] for p in resumed)

    # a fresh run into the same folder (told to delete the earlier run) starts a new ledger, and a later resume takes
    # its own checkpoints only; an unreadable ledger is refused on resume
    config.update(max_steps=2, eval_strategy="no", tau_eval_prompts=0)
    (tmp_path / "fresh.json").write_text(json.dumps(config))
    train_module.run_training([str(tmp_path / "fresh.json"), "--overwrite_output_dir", "true"])
    assert len(json.loads((tmp_path / "run" / "compute_ledger.json").read_text())["segments"]) == 1
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    (tmp_path / "run" / "compute_ledger.json").write_text('{"segments": ')
    with pytest.raises(ValueError, match="compute ledger .*expected a JSON object with a `segments` list"):
        train_module.run_training([str(tmp_path / "fresh.json"), "--resume_from_checkpoint", "true"])
    monkeypatch.setattr(train_module, "load_target", None)  # a wrong folder is refused before any work
    with pytest.raises(ValueError, match="--resume_from_checkpoint .*nowhere: expected a checkpoint folder or true"):
        train_module.run_training([str(tmp_path / "fresh.json"), "--resume_from_checkpoint", str(tmp_path / "nowhere")])


def test_resume_from_checkpoint_true_takes_the_latest_checkpoint_or_starts_at_step_0(tmp_path):
    """`beagle train recipe.yaml --resume_from_checkpoint true` (a string on the command line, a bool in YAML): the
    latest checkpoint-N of --output_dir; none yet (stopped while building the cache) starts training at step 0 but
    still continues the run's compute ledger; a missing folder is an error naming it."""
    from types import SimpleNamespace

    from trainer.train import resume_checkpoint, resume_requested

    def args(value):
        return SimpleNamespace(resume_from_checkpoint=value, output_dir=str(tmp_path / "run"))

    for value in ("true", True, "True"):
        assert resume_requested(args(value)) and resume_checkpoint(args(value)) is None
    for name in ("checkpoint-4", "checkpoint-12", "checkpoint-8"):
        (tmp_path / "run" / name).mkdir(parents=True)
    assert resume_checkpoint(args("true")) == str(tmp_path / "run" / "checkpoint-12")
    assert resume_checkpoint(args(str(tmp_path / "run" / "checkpoint-4"))) == str(tmp_path / "run" / "checkpoint-4")
    for value in (None, False, "false"):
        assert not resume_requested(args(value)) and resume_checkpoint(args(value)) is None
    with pytest.raises(ValueError, match="--resume_from_checkpoint .*nowhere: expected a checkpoint folder or true"):
        resume_checkpoint(args(str(tmp_path / "nowhere")))


def test_compute_ledger_heartbeat_keeps_a_complete_file_while_the_process_runs(tmp_path):
    """A process stopped at any moment leaves a ledger that is complete JSON and at most one heartbeat stale: the
    time before training (data preparation, the offline cache) is counted too."""
    import time

    from trainer.callbacks import ComputeLedger

    path = tmp_path / "out" / "compute_ledger.json"
    ledger = ComputeLedger(str(path), {"command": "x"}, started=time.time() - 5.0, heartbeat_s=0.02)
    assert json.loads(path.read_text())["segments"][0]["wall_s"] >= 5.0
    ledger.describe(10.0, data="d")
    walls = []
    for _ in range(5):
        time.sleep(0.05)
        walls.append(json.loads(path.read_text())["segments"][0]["wall_s"])  # never a half-written file
    assert walls == sorted(walls) and walls[-1] > walls[0]
    segment = ledger.close()[0]
    assert segment["data"] == "d" and segment["steps"] == 0 and segment["first_step"] is None
    silent = ComputeLedger(str(tmp_path / "rank1" / "ledger.json"), {}, main_process=False)
    silent.close()
    assert not (tmp_path / "rank1").exists()


def test_init_from_refuses_options_that_would_change_the_drafts_architecture(tmp_path):
    """A continuation keeps its checkpoint's architecture: a fresh-draft option that disagrees with it is an error
    naming the option (not silently ignored); one that agrees is accepted."""
    from trainer.train import BeagleModelArguments, make_beagle

    target = make_target("llama")
    BeagleModel.from_target(target, num_key_value_heads=4).save_pretrained(tmp_path / "draft")
    agreeing = BeagleModelArguments(target_model="t", init_from=str(tmp_path / "draft"), num_key_value_heads=4)
    assert make_beagle(target, agreeing, None).config.num_key_value_heads == 4
    for option in ({"num_key_value_heads": 2}, {"recency_bias": True}, {"draft_vocab_size": 48},
                   {"target_layer_ids": [0, -1]}):
        args = BeagleModelArguments(target_model="t", init_from=str(tmp_path / "draft"), **option)
        name, value = next(iter(option.items()))
        with pytest.raises(ValueError, match=rf"--{name} .*{name}=.*expected the same value"):
            make_beagle(target, args, None)


def test_beagle_train_writes_the_tau_learning_curve(tmp_path, monkeypatch):
    """`--tau_eval_prompts`: each evaluation decodes the prompts with the draft (checked against plain greedy) and
    appends τ and the training wall time to <output_dir>/tau_curve.jsonl; without evaluations it is refused."""
    import trainer.train as train_module

    monkeypatch.setattr(train_module, "load_prompts", lambda name: [{"turns": ["q1x"]}, {"turns": ["q22y"]}])
    config = tiny_train_options(tmp_path, save_strategy="no", eval_strategy="steps", eval_steps=2,
                                tau_eval_prompts=2, tau_eval_new_tokens=6)
    (tmp_path / "train.json").write_text(json.dumps(config))
    train_module.run_training([str(tmp_path / "train.json")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "tau_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # two scheduled evaluations; the final one is step 4's, logged once
    assert all(r["eval_greedy_identical"] == 1.0 and r["eval_tau"] >= 1.0 and r["prompts"] == 2 for r in rows)
    assert 0 < rows[0]["train_wall_s"] <= rows[1]["train_wall_s"] and "eval_alpha_step_1" in rows[0]
    config.update(max_steps=5, output_dir=str(tmp_path / "run5"))  # the last step is not a scheduled evaluation's
    (tmp_path / "train5.json").write_text(json.dumps(config))
    train_module.run_training([str(tmp_path / "train5.json")])
    rows = [json.loads(line) for line in (tmp_path / "run5" / "tau_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # so the final evaluation runs and adds its point
    config.update(max_steps=4, eval_strategy="no", output_dir=str(tmp_path / "run2"))
    (tmp_path / "train2.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--tau_eval_prompts expected evaluations"):
        train_module.run_training([str(tmp_path / "train2.json")])


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys, monkeypatch):
    import trainer.cli as cli
    from trainer.cli import main

    missing = tmp_path / "nowhere"
    assert main(["inspect", str(missing)]) == 1
    assert f"beagle inspect: error: a Beagle checkpoint folder or Hub id (org/name) expected, found no folder at '{missing}'" \
        in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1  # transformers' OSError: no weights in the folder
    assert "beagle inspect: error:" in capsys.readouterr().err
    assert main(["bench", "--beagle", str(missing), "--methods", "plain,beagle-chain"]) == 2
    assert "`--beagle` expected a Beagle checkpoint folder" in capsys.readouterr().err
    for option, value in (("--num-prompts", "0"), ("--max-new-tokens", "-1"), ("--repeats", "x"),
                          ("--prompt-lookup-tokens", "-3")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", option, value])
        assert exit_.value.code == 2 and f"argument {option}: expected an integer" in capsys.readouterr().err
    for option, value, expected in (("--temperatures", "abc", "`--temperatures` expected"),
                                    ("--temperatures", "-1", "`--temperatures` expected"),
                                    ("--temperatures", "", "`--temperatures` expected"),
                                    ("--prompt-sets", "", "`--prompt-sets` expected at least one"),
                                    *([("--device", "cuda", "expected a CUDA GPU")] if not torch.cuda.is_available()
                                      else [])):
        assert main(["bench", "--output-dir", str(tmp_path / "bench"), option, value]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()  # refused before anything is measured or written
    monkeypatch.setattr("trainer.assets.load_target", lambda *a, **k: (None, None))
    for option, value, expected in (("--question", "80", "`--question` expected an MT-bench question index in 0..79"),
                                    ("--question", "-1", "`--question` expected"),
                                    ("--max-new-tokens", "0", "`--max-new-tokens` and `--repeats` expected")):
        assert main(["demo", option, value]) == 1
        assert f"beagle demo: error: {expected}" in capsys.readouterr().err
    train = ["train", "--target_model", "unused", "--dataset", "unused", "--output_dir", str(tmp_path / "run")]
    for option, value, expected in (("--stage2_steps", "0", "`stage2_steps` expected a positive integer"),
                                    ("--learning_rate", "-1", "`learning_rate` expected a float > 0"),
                                    ("--per_device_train_batch_size", "0", "`per_device_train_batch_size` expected"),
                                    ("--label_smoothing_factor", "0.1", "`label_smoothing_factor` expected 0"),
                                    ("--neftune_noise_alpha", "5", "`neftune_noise_alpha` expected None"),
                                    ("--nonsense_flag", "3", "Some specified arguments are not used by the HfArgumentParser: ['--nonsense_flag'")):
        assert main(train + [option, value]) == 1  # refused while parsing, before any model or data is loaded
        assert f"beagle train: error: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(cli, "_cmd_env", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as bad input: its traceback stays
        main(["env"])
