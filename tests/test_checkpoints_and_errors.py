"""Saving, remote-code loading in a fresh process, Auto-class registration, and clear errors on bad input."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import make_target, target_states
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, LlamaConfig

from modeling_beagle import BeagleCheckpointError, BeagleConfig, BeagleConfigError, BeagleModel, BeagleTargetWarning
from modeling_beagle import modeling_beagle as beagle_module


def trained_like_beagle(target, **overrides):
    torch.manual_seed(3)
    beagle = BeagleModel.from_target(target, **overrides).eval()
    with torch.no_grad():
        for p in beagle.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return beagle


def test_save_writes_remote_code_and_auto_map(tmp_path, llama_target):
    beagle = trained_like_beagle(llama_target)
    beagle.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_beagle.py", "configuration_beagle.py",
            "cache_beagle.py", "masking_beagle.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "beagle"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_beagle.BeagleConfig",
        "AutoModel": "modeling_beagle.BeagleModel",
        "AutoModelForCausalLM": "modeling_beagle.BeagleModel",
    }
    # The target's embedding and head are not in the checkpoint unless carried.
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in load_file(tmp_path / "model.safetensors"))
    # Remote-code files import each other only with single-dot relative imports, never trainer/ or hub_cards/.
    for name in files:
        if name.endswith(".py"):
            text = (tmp_path / name).read_text()
            assert "import trainer" not in text and "from trainer" not in text and "hub_cards" not in text
            assert "from modeling_beagle" not in text and "from .." not in text


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForCausalLM
    beagle_dir, target_dir, io_path = sys.argv[1:4]
    beagle = AutoModel.from_pretrained(beagle_dir, trust_remote_code=True).eval()
    assert "transformers_modules" in type(beagle).__module__, type(beagle).__module__
    assert "modeling_beagle" not in sys.modules, "the installed package must not be needed"
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    beagle.bind_target(target)
    inputs = load_file(io_path)
    out = beagle(input_ids=inputs["ids"], context_states=inputs["h"])
    state = {"logits": out.logits, "hidden": out.last_hidden_state}
    state.update({"param." + k: v for k, v in beagle.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, io_path)
    """
)


def test_remote_code_reload_in_fresh_process(tmp_path, llama_target):
    beagle = trained_like_beagle(llama_target)
    beagle.save_pretrained(tmp_path / "beagle")
    llama_target.save_pretrained(tmp_path / "target")
    ids = torch.randint(0, 96, (2, 7))
    h = target_states(llama_target, ids)
    save_file({"ids": ids, "h": h}, tmp_path / "io.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "beagle"), str(tmp_path / "target"),
                    str(tmp_path / "io.safetensors")], check=True, env=env, cwd=tmp_path)
    result = load_file(tmp_path / "io.safetensors")
    expected = beagle(input_ids=ids, context_states=h)
    assert torch.equal(result["logits"], expected.logits)
    assert torch.equal(result["hidden"], expected.last_hidden_state)
    for key, value in beagle.state_dict().items():
        assert torch.equal(result["param." + key], value), key


def test_installed_package_registers_auto_classes(tmp_path, llama_target):
    beagle = trained_like_beagle(llama_target)
    beagle.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is BeagleConfig
    loaded = AutoModel.from_pretrained(tmp_path)  # no trust_remote_code: the installed classes serve it
    assert type(loaded) is BeagleModel
    for key, value in beagle.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_carrying_target_embeddings_runs_without_target(tmp_path, llama_target):
    beagle = trained_like_beagle(llama_target, carry_target_embeddings=True, draft_vocab_size=40)
    beagle.set_draft_vocabulary(torch.arange(40) * 2)
    beagle.save_pretrained(tmp_path)
    loaded = BeagleModel.from_pretrained(tmp_path).eval()
    assert loaded.is_bound
    ids = torch.randint(0, 96, (1, 6))
    h = target_states(llama_target, ids)
    torch.testing.assert_close(loaded(input_ids=ids, context_states=h).logits,
                               llama_target.lm_head(beagle(input_ids=ids, context_states=h).last_hidden_state)[..., ::2][..., :40])


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 128),
        ("vocab_size", 100),
    ],
)
def test_mismatched_target_is_refused(field, value, llama_target):
    beagle = BeagleModel.from_target(llama_target)
    other = make_target("llama", **{field: value})
    with pytest.raises(BeagleConfigError) as err:
        beagle.bind_target(other)
    message = str(err.value)
    assert field in message and str(getattr(beagle.config, field)) in message and str(value) in message


def test_target_layer_ids_outside_the_target_are_refused(llama_target):
    layers = llama_target.config.num_hidden_layers
    for good in ([-1], [0], [layers], [-(layers + 1)], [1, -1]):
        BeagleModel.from_target(llama_target, target_layer_ids=good)
    for bad in ([layers + 1], [-(layers + 2)], [0, 99]):
        with pytest.raises(BeagleConfigError, match=f"target_layer_ids.*{layers + 1} hidden states"):
            BeagleModel.from_target(llama_target, target_layer_ids=bad)


def test_mismatched_rope_is_refused(llama_target):
    beagle = BeagleModel.from_target(llama_target)
    other = make_target("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(BeagleConfigError, match=r"rope_parameters\['rope_theta'\].*10000.0.*500000.0"):
        beagle.bind_target(other)


def test_a_target_named_otherwise_than_the_drafts_own_is_warned_about():
    target = make_target("llama")
    beagle = BeagleModel.from_target(target)
    beagle.config.target_model_name_or_path = "org/tiny-instruct"
    target.name_or_path = "org/tiny-base"  # same shapes, another model: exact output, fewer accepted drafts
    with pytest.warns(BeagleTargetWarning, match="trained for org/tiny-instruct, and is bound to org/tiny-base"):
        beagle.bind_target(target)
    # The same model under a local or cache folder's name, or a target of unknown name: no warning.
    for name in ("org/tiny-instruct", "/cache/beagle/models/org--tiny-instruct",
                 "/hub/models--org--tiny-instruct/snapshots/0a1b2c", ""):
        target.name_or_path = name
        with warnings.catch_warnings():
            warnings.simplefilter("error", BeagleTargetWarning)
            beagle.bind_target(target)


def test_draft_head_layout_is_its_own(tmp_path, llama_target):
    """Heads, key/value heads and MLP width default to the target's but are the draft's own: a draft with another
    layout is built, binds to the target (and to a target with another head layout), and saves and loads back."""
    default = BeagleModel.from_target(llama_target).config
    assert (default.num_attention_heads, default.num_key_value_heads, default.head_dim) == (4, 2, 16)
    beagle = trained_like_beagle(llama_target, num_key_value_heads=4, intermediate_size=96)
    assert beagle.block.cross_attn.v_proj.out_features == 4 * 16 and beagle.block.mlp.up_proj.out_features == 96
    assert (beagle.config.num_key_value_heads, beagle.config.intermediate_size) == (4, 96)
    wide = BeagleConfig.from_target_config(llama_target.config, num_attention_heads=8)
    assert (wide.num_attention_heads, wide.num_key_value_heads, wide.head_dim) == (8, 8, 8)
    beagle.bind_target(make_target("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    beagle.bind_target(llama_target)
    beagle.save_pretrained(tmp_path)
    loaded = BeagleModel.from_pretrained(tmp_path).bind_target(llama_target)
    ids = torch.randint(0, 96, (1, 7))
    h = target_states(llama_target, ids)
    torch.testing.assert_close(loaded(input_ids=ids, context_states=h).logits,
                               beagle(input_ids=ids, context_states=h).logits)


def test_override_of_a_shared_field_is_refused(llama_target):
    with pytest.raises(BeagleConfigError, match="hidden_size.*64.*32"):
        BeagleConfig.from_target_config(llama_target.config, hidden_size=32)


def test_override_of_an_unknown_field_is_refused_not_ignored(llama_target):
    with pytest.raises(BeagleConfigError, match="unknown field.*recency_bais"):
        BeagleModel.from_target(llama_target, recency_bais=True)
    # real fields, a generic PreTrainedConfig one and one from_target_config itself fills are all accepted
    config = BeagleConfig.from_target_config(llama_target.config, recency_bias=True, output_hidden_states=True,
                                             pad_token_id=0)
    assert config.recency_bias and config.output_hidden_states and config.pad_token_id == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("noise_type", "laplace"),
        ("noise_scale", -1.0),
        ("stage1_window", 0),
        ("stage1_offset_weights", "linear"),
        ("stage2_steps", -2),
        ("draft_vocab_size", 10_000),
        ("num_key_value_heads", 3),
        ("target_layer_ids", []),
        ("offset_range", 0),
        ("attention_dropout", 1.5),
        ("default_prompt_lookup_num_tokens", -1),
        ("default_prompt_lookup_num_tokens", True),
    ],
)
def test_config_field_out_of_range(field, value):
    with pytest.raises(ValueError) as err:
        BeagleConfig(hidden_size=64, num_attention_heads=4, vocab_size=96, **{field: value})
    assert field in str(err.value) and "expected" in str(err.value) and repr(value) in str(err.value)


def _saved(tmp_path, llama_target):
    trained_like_beagle(llama_target).save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_checkpoint_with_missing_tensor(tmp_path, llama_target):
    state = _saved(tmp_path, llama_target)
    del state["block.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BeagleCheckpointError, match="block.mlp.up_proj.weight.*missing"):
        BeagleModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="block.mlp.up_proj.weight.*missing"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_checkpoint_with_misshaped_tensor(tmp_path, llama_target):
    state = _saved(tmp_path, llama_target)
    state["block.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BeagleCheckpointError, match=r"up_proj.weight.*expected \(128, 64\), found \(3, 64\)"):
        BeagleModel.from_pretrained(tmp_path)


def test_checkpoint_with_unexpected_tensor(tmp_path, llama_target):
    state = _saved(tmp_path, llama_target)
    state["lm_head.weight"] = torch.zeros(96, 64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BeagleCheckpointError, match="lm_head.weight"):
        BeagleModel.from_pretrained(tmp_path)


def test_unbound_beagle_says_what_to_do(tmp_path, llama_target):
    trained_like_beagle(llama_target).save_pretrained(tmp_path)
    beagle = BeagleModel.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="bind_target"):
        beagle(input_ids=torch.tensor([[1, 2]]), context_states=torch.randn(1, 2, 64))


def test_bad_forward_inputs_are_named(llama_target):
    beagle = BeagleModel.from_target(llama_target)
    ids = torch.randint(0, 96, (1, 4))
    with pytest.raises(ValueError, match="context_states.*expected"):
        beagle(input_ids=ids, context_states=torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="attention_mask.*expected"):
        beagle(input_ids=ids, context_states=torch.randn(1, 4, 64), attention_mask=torch.ones(1, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        from modeling_beagle import BeagleCache

        beagle(input_ids=ids, past_key_values=BeagleCache())


def test_pickle_weights_are_never_written(tmp_path, llama_target):
    with pytest.raises(ValueError, match="safetensors"):
        BeagleModel.from_target(llama_target).save_pretrained(tmp_path, safe_serialization=False)


def test_module_registers_for_remote_code():
    assert BeagleConfig._auto_class == "AutoConfig"
    assert beagle_module.BeagleModel._auto_class == "AutoModel"


def test_non_rope_target_is_refused():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, vocab_size=96)
    config.rope_parameters = None
    with pytest.raises(BeagleConfigError, match="rope_parameters"):
        BeagleConfig.from_target_config(config)
