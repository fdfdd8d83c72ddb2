"""`beagle bench` on tiny targets: every built-in method runs, fp32 greedy identity is checked, outputs are written."""

import importlib.util
import json

import pytest
import torch
from conftest import make_target

import modeling_beagle  # noqa: F401  (installs the generate hook)
from modeling_beagle import BeagleModel, TreeShape
from trainer.bench import (
    BUILTIN_METHODS,
    DTYPES,
    BenchSettings,
    Method,
    MethodRun,
    bench,
    builtin_methods,
    load_plugin,
    parse_tree_shape,
    write_outputs,
)


RESULT_KEYS = {"prompt_set", "temperature", "dtype", "method", "tau", "tokens_per_s", "speedup", "peak_memory_mb",
               "acceptance_per_position", "identical_share", "status", "speedup_total", "divergences"}
PROMPTS = {"synthetic": [{"id": "a", "input_ids": [5, 17, 33, 8, 41, 17, 33]},
                         {"id": "b", "input_ids": [60, 3, 9, 9, 71, 12]}]}


def tiny_pair(dtype: str = "float32"):
    target = make_target("llama").to(DTYPES[dtype])
    target.generation_config.pad_token_id = 0
    target.generation_config.eos_token_id = None  # always 8 new tokens
    torch.manual_seed(1)
    beagle = BeagleModel.from_target(target, attn_implementation="eager", dtype=DTYPES[dtype]).eval()
    return target, beagle


def settings(**overrides):
    base = dict(max_new_tokens=8, temperatures=(0.0,), dtypes=("float32",), repeats=1, progress=False)
    return BenchSettings(**{**base, **overrides})


def loader(extra=()):
    def load(dtype):
        target, beagle = tiny_pair(dtype)
        methods = builtin_methods(BUILTIN_METHODS, target, beagle, TreeShape(depth=3, top_k=2, total_tokens=4), 3)
        return target, None, methods + [m(target) for m in extra]

    return load


def test_all_methods_fp32_greedy_valid_and_outputs_written(tmp_path):
    report = bench(loader(), PROMPTS, settings(temperatures=(0.0, 1.0)))
    assert report["valid"] and not report["invalid"]
    assert {"machine", "settings", "results", "runs", "valid"} <= set(report)
    assert {"date", "platform", "cpu", "torch", "transformers", "torch_threads"} <= set(report["machine"])
    greedy = [r for r in report["results"] if r["temperature"] == 0]
    assert [r["method"] for r in greedy] == list(BUILTIN_METHODS)
    for row in report["results"]:
        assert RESULT_KEYS <= set(row)
        assert row["prompt_set"] == "synthetic" and row["dtype"] == "float32"
        assert row["tau"] >= 1.0 and row["tokens_per_s"] > 0 and row["speedup"] > 0 and row["peak_memory_mb"] > 0
    for row in greedy:
        assert row["status"] == "valid" and row["identical_share"] == 1.0
    by = {(r["method"], r["temperature"]): r for r in report["results"]}
    assert by[("plain", 0.0)]["tau"] == pytest.approx(1.0)
    assert by[("beagle-tree", 0.0)]["acceptance_per_position"] is not None
    assert by[("beagle-chain", 0.0)]["acceptance_per_position"] is not None
    assert by[("plain", 1.0)]["status"] == "unchecked" and by[("plain", 1.0)]["identical_share"] is None
    assert len(report["runs"]) == 2 * 2 * len(BUILTIN_METHODS)  # prompts x temperatures x methods (1 repeat)
    assert all(run["new_tokens"] == 8 for run in report["runs"])

    written = write_outputs(report, tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["results"] and data["valid"] is True and "markdown_table" in data
    assert "beagle-tree" in (tmp_path / "bench.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert written["plots"] == ["acceptance.png", "speedup.png"]
        for name in written["plots"]:
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def wrong_method(target):
    """Plain greedy with its last token changed: a lossy 'speculative' method."""

    def run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed):
        out = target.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=0).clone()
        out[0, -1] = (out[0, -1] + 1) % target.config.vocab_size
        return MethodRun(out)

    return Method("wrong", run, "plain greedy, last token altered")


def test_a_different_fp32_greedy_output_invalidates_the_run(tmp_path):
    report = bench(loader(extra=[wrong_method]), PROMPTS, settings())
    assert not report["valid"]
    wrong = next(r for r in report["results"] if r["method"] == "wrong")
    assert wrong["status"] == "invalid" and wrong["identical_share"] == 0.0
    assert wrong["divergences"][0]["position"] == 7
    assert all(r["status"] == "valid" for r in report["results"] if r["method"] != "wrong")
    write_outputs(report, tmp_path)
    assert "INVALID" in (tmp_path / "bench.md").read_text()


def test_bf16_divergences_are_examined_not_invalid():
    report = bench(loader(extra=[wrong_method]), PROMPTS, settings(dtypes=("bfloat16",)))
    assert report["valid"]  # only float32 mismatches invalidate a run
    wrong = next(r for r in report["results"] if r["method"] == "wrong")
    assert wrong["dtype"] == "bfloat16" and wrong["identical_share"] == 0.0
    for divergence in wrong["divergences"]:
        assert divergence["position"] == 7 and divergence["gap"] >= 0 and divergence["gap_bf16_spacings"] >= 0
        magnitude = max(abs(divergence["plain_logit"]), abs(divergence["method_logit"]))
        assert divergence["within_rounding"] == (divergence["gap"] <= 2**-7 * magnitude)
    assert wrong["status"] == ("valid" if all(d["within_rounding"] for d in wrong["divergences"]) else "suspect")
    assert report["suspect"] == ([] if wrong["status"] == "valid" else ["synthetic bfloat16 T=0 wrong"])


def test_plugin_loader(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from trainer.bench import Method, MethodRun\n"
        "def bench_methods(target, tokenizer, arg):\n"
        "    def run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed):\n"
        "        return MethodRun(target.generate(input_ids, attention_mask=attention_mask, do_sample=False,\n"
        "                                         max_new_tokens=max_new_tokens, pad_token_id=0))\n"
        "    return [Method('plugin-' + arg, run)]\n"
    )
    factory, arg = load_plugin(f"{plugin}:xyz")
    assert arg == "xyz"

    def load(dtype):
        target = tiny_pair()[0]
        return target, None, builtin_methods(["plain"], target) + factory(target, None, arg)

    report = bench(load, PROMPTS, settings())
    row = next(r for r in report["results"] if r["method"] == "plugin-xyz")
    assert row["status"] == "valid" and row["tau"] == pytest.approx(1.0)
    assert load_plugin(str(plugin))[1] is None
    with pytest.raises(ValueError, match="bench_methods"):
        empty = tmp_path / "empty.py"
        empty.write_text("x = 1\n")
        load_plugin(str(empty))


def test_tree_shape_option():
    assert parse_tree_shape("auto") == "auto" and parse_tree_shape("chain") == "chain"
    assert parse_tree_shape("4,2,6") == TreeShape(depth=4, top_k=2, total_tokens=6)
    with pytest.raises(ValueError, match="D,K,N"):
        parse_tree_shape("4,2")


def test_cli_parses_bench_options():
    from trainer.cli import build_parser

    args = build_parser().parse_args(["bench", "--beagle", "x", "--num-prompts", "2", "--temperatures", "0",
                                      "--plugin", "p.py:arg", "--allow-mismatch"])
    assert args.command == "bench" and args.num_prompts == 2 and args.plugin == ["p.py:arg"] and args.allow_mismatch
    assert args.methods == ",".join(BUILTIN_METHODS) and args.max_new_tokens == 256
