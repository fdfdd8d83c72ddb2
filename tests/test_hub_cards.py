"""Model cards (`beagle card`) and publishing (`beagle push`): Hub metadata checked with huggingface_hub's own parser,
a usage snippet that runs, push plans, offline failures and refused folders. Nothing touches the network."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import make_target
from hub_cards import BeagleCardError, export_checkpoint, push_checkpoint, render_model_card, write_model_card
from modeling_beagle import BeagleModel
from trainer.cli import main as cli_main

TARGET_ID = "example-org/tiny-llama-instruct"
REPO_ID = "example-user/beagle-tiny"
MAX_NEW_TOKENS = 24

BENCH = {
    "machine": {"cpu": "test CPU", "threads": 2, "torch": torch.__version__, "gpu": ""},  # no GPU: an empty field
    "settings": {"max_new_tokens": MAX_NEW_TOKENS, "num_prompts": 8, "dtypes": ["bfloat16", "float32"],
                 "timing": "per prompt: median wall time of `repeats` runs; methods interleaved in a rotating order",
                 "method_descriptions": {"beagle-tree": "target.generate(custom_generate=beagle_generate): a | tree"}},
    "runs": [{"method": "plain", "prompt_id": "mt-bench/81", "time_s": 1.0}],  # per-run detail: not in the card
    "results": [
        {"prompt_set": "mt-bench", "temperature": 0.0, "dtype": "bfloat16", "method": "plain", "tau": 1.0,
         "tokens_per_s": 20.0, "speedup": 1.0, "peak_memory_mb": 600, "identical_share": 1.0},
        {"prompt_set": "mt-bench", "temperature": 0.0, "dtype": "bfloat16", "method": "prompt-lookup", "tau": 1.3,
         "tokens_per_s": 22.0, "speedup": 1.1, "peak_memory_mb": 600},
        {"prompt_set": "mt-bench", "temperature": 0.0, "dtype": "bfloat16", "method": "beagle-tree", "tau": 3.1,
         "tokens_per_s": 40.2, "speedup": 2.1, "peak_memory_mb": 700,
         "acceptance_per_position": [0.8, 0.6, 0.45, 0.3], "identical_share": 0.9, "status": "valid"},
        {"prompt_set": "mt-bench", "temperature": 0.0, "dtype": "bfloat16", "method": "beagle-chain", "tau": 2.6,
         "tokens_per_s": 35.5, "speedup": 1.77, "peak_memory_mb": 690},
        {"prompt_set": "humaneval", "temperature": 0.7, "dtype": "float32", "method": "beagle-tree", "tau": 3.4,
         "tokens_per_s": 31.0, "speedup": 2.3, "peak_memory_mb": 720, "status": "unchecked"},
        {"prompt_set": "humaneval", "temperature": 0.0, "dtype": "float32", "method": "beagle-tree", "tau": 3.9,
         "tokens_per_s": 33.0, "speedup": 2.5, "peak_memory_mb": 720, "identical_share": 0.75, "status": "invalid"},
    ],
    "plots": ["speedup.png", "missing.png"],
}
TRAINING = {"command": ["beagle", "train", "--target_model", TARGET_ID, "--max_steps", "4000"],
            "wall_time_s": 5400.0, "token_updates": 12_345_678, "dataset": "sharegpt",
            "stages": [{"stage": 1, "steps": 2000, "wall_time_s": 2500.0}, {"stage": 2, "steps": 2000,
                                                                            "wall_time_s": 2900.0}]}


def chat_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the generation tests, with a plain chat template."""
    import string

    chars = (string.ascii_letters + string.digits + string.punctuation + "éü")[:vocab_size]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=chars[0], unk_token=chars[0])
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny target folder (with tokenizer) and a Beagle checkpoint folder built for it."""
    root = tmp_path_factory.mktemp("hub_cards")
    target = make_target("llama")
    target.generation_config.pad_token_id = 0
    target.save_pretrained(root / "target")
    chat_tokenizer().save_pretrained(root / "target")
    torch.manual_seed(0)
    beagle = BeagleModel.from_target(target, target_model_name_or_path=TARGET_ID)
    beagle.save_pretrained(root / "beagle")
    (root / "bench").mkdir()
    (root / "bench" / "speedup.png").write_bytes(b"\x89PNG\r\n\x1a\n fake plot")
    (root / "bench" / "results.json").write_text(json.dumps(BENCH))
    return root


@pytest.fixture
def checkpoint(saved, tmp_path) -> Path:
    """A private copy of the checkpoint folder (tests add and delete files in it)."""
    return Path(shutil.copytree(saved / "beagle", tmp_path / "beagle"))


def python_block(card_text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    assert blocks, "the card has no python code block"
    return blocks[0]


# ----------------------------------------------------------------------------------------------- the card
def test_card_metadata_parses_with_huggingface_hub(checkpoint, saved):
    text = render_model_card(checkpoint, saved / "bench" / "results.json", repo_id=REPO_ID, training=TRAINING)
    data = ModelCard(text).data
    assert data.base_model == TARGET_ID
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"speculative-decoding", "beagle", "eagle", "draft-model", "llama"} <= set(data.tags)
    assert data.datasets == ["anon8231489123/ShareGPT_Vicuna_unfiltered"]  # the named asset, as a Hub dataset id
    assert render_model_card(checkpoint, BENCH, repo_id=REPO_ID, license="mit").count("license: mit") == 1


def test_model_index_round_trips_tau_and_speedup(checkpoint):
    text = render_model_card(checkpoint, BENCH, repo_id=REPO_ID)
    name, results = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
    assert name == "beagle-tiny"
    found = {(r.dataset_name, r.dataset_config, r.metric_config, r.metric_type): r.metric_value for r in results}
    for row in BENCH["results"]:
        config = f"temperature-{row['temperature']:g}-{row['dtype']}"
        name = {"mt-bench": "MT-Bench", "humaneval": "HumanEval"}[row["prompt_set"]]
        if row["method"].startswith("beagle") and row.get("status") != "invalid":
            assert found[(name, config, row["method"], "tau")] == row["tau"]
            assert found[(name, config, row["method"], "speedup")] == row["speedup"]
            assert found[(name, config, row["method"], "tokens_per_second")] == row["tokens_per_s"]
        elif not row["method"].startswith("beagle"):  # baselines are in the table, not in this model's model-index
            assert not any(key[2] == row["method"] for key in found)
        else:  # a measurement the bench marked invalid (outputs differ from plain greedy in fp32) is no claim
            assert (name, config, row["method"], "tau") not in found
    # one model-index result per (prompt set, temperature, dtype)
    assert {(r.dataset_name, r.dataset_config) for r in results} == {("MT-Bench", "temperature-0-bfloat16"),
                                                                      ("HumanEval", "temperature-0.7-float32")}
    args = next(r for r in results if r.dataset_name == "HumanEval").dataset_args
    assert args["temperature"] == 0.7 and args["max_new_tokens"] == MAX_NEW_TOKENS
    assert "timing" not in args and "dtypes" not in args  # prose and lists stay out of the metadata


def test_card_sections_table_recipe_and_plots(checkpoint, saved):
    path = write_model_card(checkpoint, saved / "bench" / "results.json", repo_id=REPO_ID, training=TRAINING)
    assert path == checkpoint / "README.md"
    text = path.read_text()
    for heading in ("## Usage", "## Model details", "## Training recipe", "## Results", "## Limitations"):
        assert heading in text
    assert "### MT-Bench, temperature 0, bfloat16" in text and "### HumanEval, temperature 0.7, float32" in text
    assert "| **beagle-tree** | 3.10 | 40.2 | 2.10× | 700 | 0.90 | 0.80 / 0.60 / 0.45 / 0.30 |" in text
    assert "| prompt-lookup | 1.30 | 22.0 | 1.10× |" in text
    assert "**Flagged by the bench**" in text and "humaneval float32 T=0 beagle-tree: invalid" in text
    assert "- timing: per prompt: median wall time" in text and "mt-bench/81" not in text
    assert "Methods:\n\n- `beagle-tree`: target.generate(custom_generate=beagle_generate): a \\| tree" in text
    assert "cpu: test CPU" in text and "gpu:" not in text  # empty machine fields are left out of the card
    assert "beagle train --target_model example-org/tiny-llama-instruct --max_steps 4000" in text
    assert "1 h 30 min" in text and "12,345,678" in text
    # the plot that exists is copied next to README.md and referenced relatively; the missing one is left out
    assert "![speedup](speedup.png)" in text and (checkpoint / "speedup.png").is_file()
    assert "missing.png" not in text
    assert not [p for p in checkpoint.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


def _bench_folder(root: Path, name: str, bench: dict, plot_bytes: bytes) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "speedup.png").write_bytes(plot_bytes)
    (folder / "bench.json").write_text(json.dumps(bench))
    return folder / "bench.json"


def test_rerendered_card_removes_only_the_plots_its_predecessor_showed(checkpoint, tmp_path):
    """A card re-rendered from new bench runs drops the old runs' plots (the folder is what `beagle push` uploads),
    keeps every other file, and never deletes images that a README not written by `beagle card` showed."""
    t0 = {**BENCH, "results": [r for r in BENCH["results"] if r["temperature"] == 0.0], "plots": ["speedup.png"]}
    t1 = {**BENCH, "results": [r for r in BENCH["results"] if r["temperature"] != 0.0], "plots": ["speedup.png"]}
    old = [_bench_folder(tmp_path, "bench-v1", t0, b"v1"), _bench_folder(tmp_path, "bench-v1-t1", t1, b"v1 t1")]
    new = [_bench_folder(tmp_path, "bench-v2", t0, b"v2"), old[1]]  # the T = 0 run re-made, the other kept
    (checkpoint / "notes.png").write_bytes(b"kept")  # not shown by any card
    write_model_card(checkpoint, old, repo_id=REPO_ID)
    assert (checkpoint / "bench-v1-speedup.png").is_file() and (checkpoint / "bench-v1-t1-speedup.png").is_file()
    text = write_model_card(checkpoint, new, repo_id=REPO_ID).read_text()
    assert "bench-v1-speedup.png" not in text and not (checkpoint / "bench-v1-speedup.png").exists()
    assert (checkpoint / "bench-v2-speedup.png").read_bytes() == b"v2"
    assert (checkpoint / "bench-v1-t1-speedup.png").read_bytes() == b"v1 t1"  # still shown: kept
    assert (checkpoint / "notes.png").read_bytes() == b"kept" and (checkpoint / "model.safetensors").is_file()
    # a hand-written README (no Beagle card metadata) that shows an image: the image survives the new card
    (checkpoint / "README.md").write_text("# my notes\n\n![logo](logo.png)\n")
    (checkpoint / "logo.png").write_bytes(b"logo")
    write_model_card(checkpoint, new, repo_id=REPO_ID)
    assert (checkpoint / "logo.png").read_bytes() == b"logo"


def test_card_from_several_bench_runs(checkpoint, tmp_path):
    """A T = 0 run and a T = 1 run (different settings, same plot file name) make one card: a subsection per run with
    its own settings and plot, every run's results in the model-index, and no group taken from two runs."""
    rows = [r for r in BENCH["results"] if r["temperature"] == 0.0 and r["dtype"] == "bfloat16"]
    t1 = {"machine": {"cpu": "other CPU"}, "settings": {"max_new_tokens": 99, "seed": 7},
          "results": [{**r, "temperature": 1.0, "tau": r["tau"] / 2} for r in rows], "plots": ["speedup.png"]}
    # the T = 0 run also timed plain generate unpacked (`--prepack`): the speedup over the faster plain is kept apart
    rows = [{**r, "speedup_over_fastest_plain": 1.8} if r["method"] == "beagle-tree" else r for r in rows]
    t0 = {**BENCH, "results": rows, "plots": ["speedup.png"]}
    paths = [_bench_folder(tmp_path, "bench-t0", t0, b"plot 0"), _bench_folder(tmp_path, "bench-t1", t1, b"plot 1")]
    path = write_model_card(checkpoint, paths, repo_id=REPO_ID)
    text = path.read_text()
    results = text.split("## Results")[1].split("## Limitations")[0]
    assert "From 2 bench runs" in results
    run0, run1 = results.split("### Run 1: bench-t0")[1].split("### Run 2: bench-t1")
    assert "cpu: test CPU" in run0 and "#### MT-Bench, temperature 0, bfloat16" in run0 and "seed: 7" not in run0
    assert "cpu: other CPU" in run1 and "#### MT-Bench, temperature 1, bfloat16" in run1 and "seed: 7" in run1
    assert "| **beagle-tree** | 1.55 | 40.2 | 2.10× | 700 |" in run1 and "over faster plain" not in run1
    assert "| speedup | over faster plain |" in run0 and "| **beagle-tree** | 3.10 | 40.2 | 2.10× | 1.80× | 700 |" in run0
    assert "| **beagle-chain** | 2.60 | 35.5 | 1.77× | — | 690 |" in run0
    # each run's plot is copied under its run's name, so the two speedup.png files do not overwrite each other
    assert "![speedup](bench-t0-speedup.png)" in run0 and "![speedup](bench-t1-speedup.png)" in run1
    assert (checkpoint / "bench-t0-speedup.png").read_bytes() == b"plot 0"
    assert (checkpoint / "bench-t1-speedup.png").read_bytes() == b"plot 1"
    _, evals = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
    taus = {(r.dataset_config, r.metric_config): (r.metric_value, r.dataset_args["max_new_tokens"])
            for r in evals if r.metric_type == "tau"}
    assert taus[("temperature-0-bfloat16", "beagle-tree")] == (3.1, MAX_NEW_TOKENS)
    assert taus[("temperature-1-bfloat16", "beagle-tree")] == (1.55, 99)
    fastest = {(r.dataset_config, r.metric_config): r.metric_value for r in evals
               if r.metric_type == "speedup_over_fastest_plain"}
    assert fastest == {("temperature-0-bfloat16", "beagle-tree"): 1.8}
    # the usage snippet takes the first run's token budget
    assert f"max_new_tokens={MAX_NEW_TOKENS}" in python_block(text)

    clash = _bench_folder(tmp_path, "bench-t0-again", t0, b"plot 2")
    with pytest.raises(BeagleCardError, match="mt-bench, temperature 0, bfloat16 expected from one run, found it in "
                                              "bench-t0 and in bench-t0-again"):
        render_model_card(checkpoint, [paths[0], paths[1], clash])
    with pytest.raises(BeagleCardError, match="different folders"):
        render_model_card(checkpoint, [paths[1], _bench_folder(tmp_path / "x", "bench-t1", {"results": []}, b"")])
    # one run in a list is the single-run card; the CLI takes several runs after one --bench-results
    assert render_model_card(checkpoint, [paths[0]]) == render_model_card(checkpoint, paths[0])
    (checkpoint / "README.md").unlink()
    assert cli_main(["card", str(checkpoint), "--bench-results", str(paths[0]), str(paths[1]),
                     "--repo-id", REPO_ID]) == 0
    assert (checkpoint / "README.md").read_text() == text


def test_card_without_bench_results_or_training_record(checkpoint):
    text = render_model_card(checkpoint)
    data = ModelCard(text).data
    assert data.base_model == TARGET_ID and data.eval_results is None
    assert "No benchmark results" in text and "No training record" in text
    assert 'beagle_id = "./beagle"' in text  # without a repo id the snippet loads the local folder


def test_card_states_the_tested_transformers_range_from_the_package_metadata():
    import transformers
    from packaging.requirements import Requirement

    from hub_cards.card import transformers_requirement

    requirement = transformers_requirement()
    stated = Requirement(requirement)
    assert stated.name == "transformers" and re.fullmatch(r"transformers>=[\d.]+,<[\d.]+.*", requirement)
    assert stated.specifier.contains(transformers.__version__)  # pip installed the package under it
    assert f"`{requirement}`" in render_model_card(Path(__file__).parent.parent / "checkpoints" /
                                                   "beagle-smollm2-135m-instruct")


def test_usage_snippet_runs_and_matches_plain_greedy(checkpoint, saved, tmp_path):
    text = write_model_card(checkpoint, BENCH, repo_id=REPO_ID).read_text()
    code = python_block(text)
    assert 'AutoModel.from_pretrained(beagle_id, trust_remote_code=True' in code
    assert "target.generate(ids, assistant_model=beagle" in code and "custom_generate=beagle_id" in code
    # The card's code as a user runs it, with the tiny target and this checkpoint standing in for the Hub ids.
    code = code.replace(json.dumps(TARGET_ID), json.dumps(str(saved / "target")))
    code = code.replace(json.dumps(REPO_ID), json.dumps(str(checkpoint)))
    assert str(saved / "target") in code and str(checkpoint) in code
    check = textwrap.dedent(f"""
        ref = target.generate(ids, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False)
        print(tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True))
        assert torch.equal(out, ref), "custom_generate (tree) output differs from plain greedy"
        assert "modeling_beagle" not in sys.modules, "the card's code must run on the remote code alone"
    """)
    script = tmp_path / "usage.py"
    script.write_text("import sys\n" + code + check)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1",
               PYTHONPATH="")  # no repository on the path: the installed package is not imported
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assisted, tau_line, tree, reference = run.stdout.splitlines()[-4:]
    assert assisted == reference and tree == reference, run.stdout
    assert tau_line.startswith("tokens per target forward:") and float(tau_line.split(":")[1]) >= 1.0


def test_usage_snippet_states_the_checkpoints_lookup_default():
    from hub_cards import usage_snippet

    on, off = usage_snippet(TARGET_ID, REPO_ID, lookup_tokens=7), usage_snippet(TARGET_ID, REPO_ID, lookup_tokens=0)
    assert "default_prompt_lookup_num_tokens = 7" in on and "verifies the 7 tokens" in on
    assert "default_prompt_lookup_num_tokens is 0: off" in off and "= 7" not in off
    from modeling_beagle.decoding_beagle import LOOKUP_TOKENS_PER_MATCH

    for code in (on, off):  # the loop's cap on the branch per matched token, as the loop has it
        assert f"at most {LOOKUP_TOKENS_PER_MATCH} per matched token" in code
    assert usage_snippet(TARGET_ID, REPO_ID) == usage_snippet(TARGET_ID, REPO_ID, lookup_tokens=10)  # BeagleConfig's
    for code in (on, off):
        compile(code, "usage", "exec")


def test_card_errors_name_file_and_field(checkpoint, tmp_path):
    with pytest.raises(BeagleCardError, match="config.json.*no such file"):
        render_model_card(tmp_path)
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(BeagleCardError, match="`model_type` expected 'beagle', found 'llama'"):
        render_model_card(checkpoint)
    config_path.write_text(json.dumps({**config, "target_model_name_or_path": None}))
    with pytest.raises(BeagleCardError, match="target_model_name_or_path"):
        render_model_card(checkpoint)
    assert ModelCard(render_model_card(checkpoint, base_model=TARGET_ID)).data.base_model == TARGET_ID
    config_path.write_text(json.dumps({**config, "target_model_name_or_path": "/data/models/target"}))
    with pytest.raises(BeagleCardError, match="local path.*--base-model"):
        render_model_card(checkpoint)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "auto_map"}))
    with pytest.raises(BeagleCardError, match="auto_map"):
        render_model_card(checkpoint)
    config_path.write_text(json.dumps(config))

    bad = {"results": [dict(BENCH["results"][0]), {"prompt_set": "mt-bench", "method": "beagle-tree", "tau": 2.0}]}
    with pytest.raises(BeagleCardError, match=r"results\[1\].*\['temperature', 'dtype'\] missing"):
        render_model_card(checkpoint, bad)
    with pytest.raises(BeagleCardError, match="no such file"):
        render_model_card(checkpoint, str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------------------------- pushing
@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or to build a Hub client fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)


def test_push_dry_run_lists_every_file_without_network(checkpoint, no_network):
    write_model_card(checkpoint, BENCH, repo_id=REPO_ID)
    plan = push_checkpoint(checkpoint, REPO_ID, dry_run=True)
    local = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert sorted(f.path_in_repo for f in plan.files) == local
    assert {"config.json", "model.safetensors", "modeling_beagle.py", "configuration_beagle.py", "cache_beagle.py",
            "custom_generate/generate.py", "README.md"} <= set(local)
    for planned in plan.files:
        assert planned.size == (checkpoint / planned.path_in_repo).stat().st_size
        assert plan.url(planned) == f"hf://{REPO_ID}/{planned.path_in_repo}"
    assert f"hf://{REPO_ID}/custom_generate/generate.py" in plan.to_text() and not plan.warnings
    # a card written for another repo id is flagged; hidden files and caches are not uploaded
    (checkpoint / ".cache").mkdir()
    (checkpoint / ".cache" / "x").write_text("x")
    (checkpoint / "__pycache__").mkdir()
    (checkpoint / "__pycache__" / "modeling_beagle.cpython-311.pyc").write_bytes(b"\0")
    other = push_checkpoint(checkpoint, "someone-else/beagle", dry_run=True)
    assert sorted(f.path_in_repo for f in other.files) == local
    assert other.warnings and "--repo-id someone-else/beagle" in other.warnings[0]


def test_push_uploads_exactly_the_planned_files(checkpoint, monkeypatch):
    write_model_card(checkpoint, BENCH, repo_id=REPO_ID)
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def upload_folder(self, **kwargs):
            calls["upload_folder"] = kwargs
            return "https://huggingface.co/example-user/beagle-tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    plan = push_checkpoint(checkpoint, REPO_ID, private=True, token="hf_test")
    assert calls["token"] == "hf_test"
    assert calls["create_repo"] == (REPO_ID, {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == REPO_ID and Path(upload["folder_path"]) == checkpoint
    assert sorted(upload["allow_patterns"]) == sorted(f.path_in_repo for f in plan.files)
    assert not plan.dry_run and plan.commit_url.endswith("/commit/abc")


def test_push_without_network_fails_clearly(checkpoint, monkeypatch):
    write_model_card(checkpoint, BENCH, repo_id=REPO_ID)
    # huggingface_hub's own offline mode: its HTTP client refuses every request before it is sent.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
    with pytest.raises(BeagleCardError, match=r"could not reach the Hugging Face Hub to push .*"
                                              r"OfflineModeIsEnabled.*HF_TOKEN.*--dry-run"):
        push_checkpoint(checkpoint, REPO_ID, token="hf_test")

    class Unreachable:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    with pytest.raises(BeagleCardError, match="could not reach the Hugging Face Hub.*Name or service not known"):
        push_checkpoint(checkpoint, REPO_ID)


def test_push_refuses_incomplete_folders_and_pickles(checkpoint, no_network):
    with pytest.raises(BeagleCardError, match="README.md.*beagle card"):
        push_checkpoint(checkpoint, REPO_ID, dry_run=True)
    write_model_card(checkpoint, BENCH, repo_id=REPO_ID)
    (checkpoint / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (checkpoint / "extra").mkdir()
    (checkpoint / "extra" / "state.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BeagleCardError, match=r"pickle files.*\['extra/state.pt', 'training_args.bin'\]"):
        push_checkpoint(checkpoint, REPO_ID, dry_run=True)
    shutil.rmtree(checkpoint / "extra")
    (checkpoint / "training_args.bin").unlink()
    (checkpoint / "custom_generate" / "generate.py").unlink()
    (checkpoint / "cache_beagle.py").unlink()  # imported by modeling_beagle.py, not named in auto_map
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(BeagleCardError) as error:
        push_checkpoint(checkpoint, REPO_ID, dry_run=True)
    message = str(error.value)
    for missing in ("model.safetensors", "cache_beagle.py", "custom_generate/generate.py"):
        assert missing in message
    with pytest.raises(BeagleCardError, match="repo_id"):
        push_checkpoint(checkpoint, "not a repo id", dry_run=True)


# ----------------------------------------------------------------------------------------------- the command
def test_cli_card_and_push_dry_run(checkpoint, saved, no_network, capsys):
    assert cli_main(["card", str(checkpoint), "--bench-results", str(saved / "bench" / "results.json"),
                     "--repo-id", REPO_ID, "--license", "mit"]) == 0
    assert capsys.readouterr().out.strip() == str(checkpoint / "README.md")
    assert ModelCard((checkpoint / "README.md").read_text()).data.license == "mit"
    assert (checkpoint / "speedup.png").is_file()

    assert cli_main(["push", str(checkpoint), REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would upload") and "public model repo" in out
    for path in checkpoint.rglob("*"):
        if path.is_file():
            assert f"hf://{REPO_ID}/{path.relative_to(checkpoint).as_posix()}" in out

    (checkpoint / "README.md").unlink()
    assert cli_main(["push", str(checkpoint), REPO_ID, "--dry-run"]) == 1
    assert "beagle push: error:" in capsys.readouterr().err
    assert cli_main(["card", str(checkpoint.parent / "nowhere")]) == 1
    assert "beagle card: error:" in capsys.readouterr().err


def test_export_writes_a_pushable_bf16_folder(tmp_path):
    """`beagle export`: a training output (fp32 weights, the Trainer's pickled training_args.bin) becomes the Hub
    folder: bf16 safetensors, remote code, custom_generate, no pickle; the weights load back equal after rounding."""
    from safetensors import safe_open

    target = make_target("llama")
    trained = BeagleModel.from_target(target, target_model_name_or_path="org/tiny-target")
    trained.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "training_args.bin").write_bytes(b"pickle")
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "hub")]) == 0
    hub = tmp_path / "hub"
    assert not list(hub.glob("*.bin")) and (hub / "custom_generate" / "generate.py").is_file()
    with safe_open(hub / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    reloaded = BeagleModel.from_pretrained(hub)
    for (name, a), (_, b) in zip(trained.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    write_model_card(hub, repo_id="org/beagle-tiny")
    assert push_checkpoint(hub, "org/beagle-tiny", dry_run=True).files
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1

    # Exporting again into the folder keeps its card and the plots the card shows; nothing else of the old folder.
    with open(hub / "README.md", "a", encoding="utf-8") as card:
        card.write("\n![speedup](run-speedup.png)\n![gone](missing.png)\n")
    for name in ("run-speedup.png", "unlinked.png", "model-00002-of-00002.safetensors"):
        (hub / name).write_bytes(b"old")
    card_text = (hub / "README.md").read_text()
    assert cli_main(["export", str(tmp_path / "run"), str(hub)]) == 0
    assert (hub / "README.md").read_text() == card_text and (hub / "run-speedup.png").read_bytes() == b"old"
    assert not (hub / "unlinked.png").exists() and not (hub / "model-00002-of-00002.safetensors").exists()
    assert (hub / "model.safetensors").is_file()

    # A destination that is not an earlier export (a training output folder, the source's parent, a git clone, a
    # folder of other files) is refused before anything is deleted.
    (tmp_path / "run" / "checkpoint-2").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    (hub / ".git").mkdir()
    for destination in (tmp_path, tmp_path / "notes", hub, tmp_path / "notes" / "notes.txt", tmp_path / "run"):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(BeagleCardError):
            export_checkpoint(tmp_path / "run", destination)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, destination
    (hub / ".git").rmdir()
    (tmp_path / "run" / "checkpoint-2").rmdir()
    assert export_checkpoint(tmp_path / "run", tmp_path / "run") == tmp_path / "run"  # in place: the source itself
    assert export_checkpoint(tmp_path / "run", tmp_path / "notes" / "empty") and BeagleModel.from_pretrained(hub)


def test_card_says_which_stages_and_input_options_the_draft_was_trained_with(checkpoint):
    """A draft whose every recorded run trained stage 1 only is not described as two-stage trained, and the card lists
    the departures from the paper's block (recency bias, the two EAGLE-style inputs) as the config has them."""
    from hub_cards.card import _model_details, training_recipe

    config = {"stage1_window": 1, "stage2_steps": 4, "recency_bias": True, "query_newest_state": True,
              "context_next_token": False}
    only_stage1 = training_recipe(config, {"runs": [{"stage1_ratio": 1.0}, {"stage1_ratio": 1.0}]})
    assert "trained with stage 1 only" in only_stage1
    for runs in ([{"stage1_ratio": 0.5}], [{"stage1_ratio": 1.0}, {"stage1_ratio": 0.5}], [{}]):
        assert "stage 1 only" not in training_recipe(config, {"runs": runs}), runs
    assert "tv_weight" not in only_stage1  # the paper's loss: no row for an unused term
    assert "| total-variation weight (`tv_weight`: + w · (1 − Σ min(P, Q))) | 0.500 |" in training_recipe(
        {**config, "tv_weight": 0.5}, {})
    details = _model_details(config, checkpoint, TARGET_ID)
    assert "| learned recency bias in the cross-attention (`recency_bias`) | yes |" in details
    assert "(`query_newest_state`; EAGLE-style, beyond the paper) | yes |" in details
    assert "(`context_next_token`; EAGLE-style, beyond the paper) | no |" in details


def test_card_lists_each_training_process_and_the_totals():
    """A draft trained in several processes (a resumed run, an --init_from continuation on other data) gets one row
    per process, with its data, steps and times, and the totals over all of them, not a JSON blob."""
    from hub_cards.card import training_recipe

    runs = [{"command": "beagle train part1.yaml", "data": "3606 of the first 4000 records kept", "first_step": 0,
             "last_step": 1200, "steps": 1200, "train_wall_s": 2242.1, "wall_s": 4076.1, "token_updates": 7460073,
             "machine": "x86_64 2 CPUs", "target_dtype": "bfloat16", "stage1_ratio": 1.0},
            {"command": "beagle train part2.yaml", "data": "3581 of records 4001-8000 (of 17671) records kept",
             "first_step": 0, "last_step": 1000, "steps": 1000, "train_wall_s": 1900.0, "wall_s": 3700.0,
             "token_updates": 6100000, "machine": "x86_64 2 CPUs", "stage1_ratio": 1.0}]
    text = training_recipe({"stage1_window": 1}, {"runs": runs, "total_wall_s": 7776.1, "total_steps": 2200,
                                                  "total_token_updates": 13560073})
    assert "| total wall time (all processes) | 2 h 9 min |" in text
    assert "| optimizer steps (all processes) | 2,200 |" in text
    assert "| supervised token-updates (all processes) | 13,560,073 |" in text
    assert ("| 1 | beagle train part1.yaml | — | 3606 of the first 4000 records kept | 0-1200 | 37 min 22 s | "
            "1 h 7 min | 7,460,073 | x86_64 2 CPUs, bfloat16 |") in text
    assert "| 2 | beagle train part2.yaml | — | 3581 of records 4001-8000 (of 17671) records kept | 0-1000 |" in text
    assert '"command"' not in text  # no JSON dump of the records
