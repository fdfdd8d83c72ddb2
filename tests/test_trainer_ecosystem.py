"""BeagleTrainer with the transformers ecosystem: data parallel (gloo), gradient accumulation and checkpointing,
bf16, TensorBoard, peft (a LoRA-adapted target; a LoRA adapter on Beagle)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_target
from peft import LoraConfig, PeftModel, get_peft_model
from test_training import make_trainer, tiny_dataset

from modeling_beagle import BeagleModel
from trainer import BeagleTrainer, BeagleTrainingArguments


# On a CPU-only machine accelerate's multi-process launcher is `--multi_gpu` (its `--cpu` flag starts one process);
# BeagleTrainingArguments then sets use_cpu, so both launchers give gloo data parallelism.
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=29572"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_data_parallel_training(tmp_path, launcher):
    script = os.path.join(os.path.dirname(__file__), "scripts", "ddp_train.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(LAUNCHERS[launcher] + [script, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
    saved = tmp_path / "beagle"
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_beagle.BeagleModel"
    assert (saved / "model.safetensors").is_file() and (saved / "custom_generate" / "generate.py").is_file()
    BeagleModel.from_pretrained(saved)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    data = tiny_dataset(target)
    big = make_trainer(tmp_path / "big", target, data, max_steps=8, per_device_train_batch_size=8)
    big.train()
    accumulated = make_trainer(tmp_path / "acc", target, data, max_steps=8, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2)
    accumulated.train()
    for key, value in _weights(big).items():
        torch.testing.assert_close(_weights(accumulated)[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    data = tiny_dataset(target)
    plain = make_trainer(tmp_path / "plain", target, data, max_steps=6)
    plain.train()
    checkpointed = make_trainer(tmp_path / "ckpt", target, data, max_steps=6, activation_checkpointing=True)
    checkpointed.train()
    for key, value in _weights(plain).items():
        torch.testing.assert_close(_weights(checkpointed)[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_and_tensorboard(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    trainer = make_trainer(tmp_path, target, tiny_dataset(target), max_steps=6, bf16=True, logging_steps=2,
                           report_to=["tensorboard"])
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    events = [f for _, _, files in os.walk(tmp_path) for f in files if f.startswith("events.out.tfevents")]
    assert events


def test_lora_adapted_target_is_a_valid_target(tmp_path):
    base = make_target("llama", initializer_range=0.2)
    target = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    target.eval()
    data = tiny_dataset(target)
    torch.manual_seed(0)
    beagle = BeagleModel.from_target(target, noise_type="none")
    args = BeagleTrainingArguments(output_dir=str(tmp_path), bf16=False, max_steps=4, per_device_train_batch_size=8,
                                   report_to=[], save_strategy="no", stage1_window=3, stage2_steps=2)
    BeagleTrainer(model=beagle, args=args, target_model=target, train_dataset=data).train()
    ids = torch.tensor([[5, 9, 13]])
    ref = target.generate(input_ids=ids, do_sample=False, max_new_tokens=10, pad_token_id=0)
    out = target.generate(input_ids=ids, do_sample=False, max_new_tokens=10, pad_token_id=0, assistant_model=beagle)
    assert torch.equal(out, ref)


def test_lora_adapter_on_beagle_trains_and_saves_an_adapter(tmp_path):
    target = make_target("llama", initializer_range=0.2)
    torch.manual_seed(0)
    beagle = BeagleModel.from_target(target, noise_type="none")
    before = {k: v.clone() for k, v in beagle.state_dict().items()}
    adapted = get_peft_model(beagle, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = BeagleTrainingArguments(output_dir=str(tmp_path), bf16=False, max_steps=4, per_device_train_batch_size=8,
                                   learning_rate=1e-2, report_to=[], save_strategy="no", stage1_window=3,
                                   stage2_steps=2)
    trainer = BeagleTrainer(model=adapted, args=args, target_model=target, train_dataset=tiny_dataset(target))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # the base weights are untouched; the adapter changes the draft
    base = adapted.get_base_model()
    for key, value in before.items():
        peft_key = key.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "k_proj.weight", "k_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight").replace(
            "o_proj.weight", "o_proj.base_layer.weight")
        assert torch.equal(base.state_dict()[peft_key], value), key
    fresh = BeagleModel.from_target(target, noise_type="none")
    fresh.load_state_dict(before)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    ids = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        h = target(ids, output_hidden_states=True).hidden_states[-1]
        a = reloaded(input_ids=ids, context_states=h).last_hidden_state
        plain = BeagleModel.from_target(target, noise_type="none")
        plain.load_state_dict(before)
        c = plain.eval()(input_ids=ids, context_states=h).last_hidden_state
    assert not torch.allclose(a, c)
