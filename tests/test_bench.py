"""`beagle bench` on tiny targets: every built-in method runs, fp32 greedy identity is checked, outputs are written."""

import contextlib
import importlib.util
import json
import statistics

import pytest
import torch
from conftest import make_target
from transformers import DynamicCache

import modeling_beagle  # noqa: F401  (installs the generate hook)
from modeling_beagle import BeagleModel, TreeShape
from trainer.bench import (
    BUILTIN_METHODS,
    DTYPES,
    BeagleBenchError,
    BenchSettings,
    Method,
    MethodRun,
    bench,
    builtin_methods,
    load_plugin,
    parse_tree_shape,
    reproduce_in_chunks,
    tree_shape_label,
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
        assert row["speedup_over_fastest_plain"] is None  # no unpacked reference without --prepack
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


def test_unknown_method_error_names_the_choices_and_the_plugin_rule():
    """A method name that is not built-in (e.g. a plugin's) is refused with the built-in names, and the message says
    that a plugin's methods always run rather than being chosen in `--methods`."""
    target, beagle = tiny_pair()
    with pytest.raises(BeagleBenchError, match=r"expected one of \[.*'beagle-chain'.*found 'eagle2-chain'") as info:
        builtin_methods(["plain", "eagle2-chain"], target, beagle)
    assert "always runs" in str(info.value) and "--plugin" in str(info.value)


def test_bench_command_refuses_an_unknown_method_before_loading_anything(monkeypatch):
    """`beagle bench --methods` with a name that is not built-in fails at once, before any prompt set or model
    is fetched or loaded."""
    import trainer.assets
    from trainer.bench import run_from_args
    from trainer.cli import build_parser

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the method names were checked")

    monkeypatch.setattr(trainer.assets, "load_target", must_not_load)
    monkeypatch.setattr(trainer.assets, "load_prompts", must_not_load)
    args = build_parser().parse_args(["bench", "--beagle", "x", "--methods", "plain,eagle2-chain", "--dtypes",
                                      "float32", "--device", "cpu"])
    with pytest.raises(BeagleBenchError, match="found 'eagle2-chain'"):
        run_from_args(args)


def test_prepacked_target_adds_the_unpacked_reference(tmp_path):
    """`--prepack`: every method runs the packed target; plain-unpacked times the same target through F.linear, and a
    greedy difference there (another summation order) is reported, not a lossless failure."""
    from modeling_beagle import prepack_linear_weights, prepacking_available

    if not prepacking_available():
        pytest.skip("this torch build has no oneDNN packed linear")

    def load(dtype):
        target, beagle = tiny_pair(dtype)
        with pytest.raises(Exception, match="--prepack"):
            builtin_methods(["plain", "plain-unpacked"], target, beagle)
        prepack_linear_weights(target)
        beagle.bind_target(target)
        names = ["plain", "beagle-chain", "beagle-tree", "plain-unpacked"]
        return target, None, builtin_methods(names, target, beagle, TreeShape(depth=3, top_k=2, total_tokens=4), 3)

    report = bench(load, PROMPTS, settings())
    assert report["valid"]
    by = {r["method"]: r for r in report["results"]}
    assert by["plain-unpacked"]["status"] == "reference" and by["plain-unpacked"]["identical_share"] is not None
    assert by["beagle-chain"]["status"] == "valid" and by["beagle-tree"]["status"] == "valid"
    # the speedup over the faster plain layout never exceeds the speedup over either one
    for row in report["results"]:
        assert row["speedup_over_fastest_plain"] is not None
        assert row["speedup_over_fastest_plain"] <= row["speedup"] * (1 + 1e-9)
    assert by["plain"]["speedup_over_fastest_plain"] <= 1.0
    assert by["plain-unpacked"]["speedup_over_fastest_plain"] <= 1.0
    write_outputs(report, tmp_path)
    text = (tmp_path / "bench.md").read_text()
    assert "plain-unpacked" in text and "speedup over faster plain" in text


def test_bf16_divergences_are_examined_not_invalid():
    report = bench(loader(extra=[wrong_method]), PROMPTS, settings(dtypes=("bfloat16",)))
    assert report["valid"]  # only float32 mismatches invalidate a run
    wrong = next(r for r in report["results"] if r["method"] == "wrong")
    assert wrong["dtype"] == "bfloat16" and wrong["identical_share"] == 0.0
    for divergence in wrong["divergences"]:
        assert divergence["position"] == 7 and divergence["gap"] >= 0 and divergence["gap_bf16_spacings"] >= 0
        magnitude = max(abs(divergence["plain_logit"]), abs(divergence["method_logit"]))
        within_spacing = divergence["gap"] <= 2**-7 * magnitude
        reproduced = divergence["reproduced_chunk"] is not None or divergence["reproduced_reading_chunk"] is not None
        assert divergence["within_rounding"] == (within_spacing or reproduced)
        if within_spacing or divergence["reproduced_chunk"] is not None:  # the costlier replay runs only as a fallback
            assert divergence["reproduced_reading_chunk"] is None
    assert wrong["status"] == ("valid" if all(d["within_rounding"] for d in wrong["divergences"]) else "suspect")
    assert report["suspect"] == ([] if wrong["status"] == "valid" else ["synthetic bfloat16 T=0 wrong"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reproduce_in_chunks_finds_the_targets_own_choice_and_never_a_token_it_ranks_last(dtype):
    target, _ = tiny_pair(dtype)
    ids = PROMPTS["synthetic"][0]["input_ids"] + [11, 29, 40]
    with torch.no_grad():
        logits = target(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    reproduced = reproduce_in_chunks(target, ids, int(logits.argmax()))
    assert reproduced is not None and 1 <= reproduced <= 16
    with torch.no_grad():  # the chunk it names does give that token: j tokens read over the cache of the rest
        cache = DynamicCache(config=target.config)
        full = torch.tensor([ids])
        target(full[:, :-reproduced], past_key_values=cache, use_cache=True)
        again = target(full[:, -reproduced:], past_key_values=cache, use_cache=True).logits[0, -1]
    assert int(again.argmax()) == int(logits.argmax())
    assert reproduce_in_chunks(target, ids, int(logits.argmin())) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reproduce_reading_in_chunks_replays_the_whole_reply_and_never_finds_a_token_ranked_last(dtype):
    """`reproduce_reading_in_chunks`: the chunk size it names does give the token when the reply is read in forwards
    of that many tokens after the prompt, and the target's last-ranked token is never reproduced (a biased method's
    token stays unexplained)."""
    from trainer.bench import reproduce_reading_in_chunks

    target, _ = tiny_pair(dtype)
    prompt, reply = PROMPTS["synthetic"][0]["input_ids"], [11, 29, 40, 7, 63, 18, 2]
    with torch.no_grad():
        logits = target(torch.tensor([prompt + reply]), logits_to_keep=1).logits[0, -1]
    chunk = reproduce_reading_in_chunks(target, prompt, reply, int(logits.argmax()))
    assert chunk is not None and 2 <= chunk <= 16
    with torch.no_grad():
        cache = DynamicCache(config=target.config)
        full = torch.tensor([prompt + reply])
        out = target(full[:, :len(prompt)], past_key_values=cache, use_cache=True)
        for pos in range(len(prompt), full.shape[1], chunk):
            out = target(full[:, pos:pos + chunk], past_key_values=cache, use_cache=True)
    assert int(out.logits[0, -1].argmax()) == int(logits.argmax())
    assert reproduce_reading_in_chunks(target, prompt, reply, int(logits.argmin())) is None


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
    assert parse_tree_shape("4,2,6,0.05") == TreeShape(depth=4, top_k=2, total_tokens=6, min_prob=0.05)
    for bad in ("4,2", "4,2,6,x", "4,2,6,0.1,1"):
        with pytest.raises(ValueError, match="D,K,N"):
            parse_tree_shape(bad)
    with pytest.raises(ValueError, match="min_prob"):
        parse_tree_shape("4,2,6,1.5")


def test_tree_size_sweep_measures_each_shape_losslessly():
    """Several tree shapes in one run: the tree methods are measured once per shape, named by it, each with its own
    resolved shape, and every one stays greedy-identical in fp32."""
    shapes = [TreeShape(depth=2, top_k=1, total_tokens=2), TreeShape(depth=4, top_k=2, total_tokens=7, min_prob=0.05)]
    assert [tree_shape_label(s) for s in shapes] == ["2,1,2", "4,2,7,0.05"]
    assert tree_shape_label("auto") == "auto" and tree_shape_label(dict(depth=3, top_k=2, total_tokens=4)) == "3,2,4"

    def load(dtype):
        target, beagle = tiny_pair(dtype)
        return target, None, builtin_methods(["plain", "beagle-tree", "beagle-tree-lookup"], target, beagle, shapes, 3)

    report = bench(load, PROMPTS, settings())
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["plain", "beagle-tree[2,1,2]", "beagle-tree[4,2,7,0.05]", "beagle-tree-lookup[2,1,2]",
                          "beagle-tree-lookup[4,2,7,0.05]"]
    assert report["valid"] and all(r["identical_share"] == 1.0 for r in rows.values())
    # a depth-2 chain drafts at most 2 positions; the depth-4 tree's acceptance reaches further when it accepts
    assert len(rows["beagle-tree[2,1,2]"]["acceptance_per_position"] or []) <= 2
    assert "depth=4, top_k=2, total_tokens=7, min_prob=0.05" in rows["beagle-tree[4,2,7,0.05]"]["description"]

    target, beagle = tiny_pair()
    single = builtin_methods(["beagle-tree"], target, beagle, shapes[0], 3)
    assert [m.name for m in single] == ["beagle-tree"]  # one shape keeps the plain names
    with pytest.raises(ValueError, match="each once"):
        builtin_methods(["beagle-tree"], target, beagle, [shapes[0], TreeShape(depth=2, top_k=1, total_tokens=2)], 3)


def test_cli_parses_bench_options():
    from trainer.cli import build_parser

    args = build_parser().parse_args(["bench", "--beagle", "x", "--num-prompts", "2", "--temperatures", "0",
                                      "--plugin", "p.py:arg", "--allow-mismatch"])
    assert args.command == "bench" and args.num_prompts == 2 and args.plugin == ["p.py:arg"] and args.allow_mismatch
    assert args.methods == ",".join(BUILTIN_METHODS) and args.max_new_tokens == 256 and args.tree_shape is None
    sweep = build_parser().parse_args(["bench", "--tree-shape", "auto", "--tree-shape", "4,2,8"])
    assert sweep.tree_shape == ["auto", "4,2,8"]


def _benchmark_module(name):
    """A script of `benchmarks/` (not a package) loaded as a module."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _learning_curve_module():
    return _benchmark_module("learning_curve")


def _finished_run(folder, name, taus, total_wall_s, peak=None, identical=None, target_dtype=None):
    (folder / name).mkdir(parents=True)
    identical = identical or [1.0] * len(taus)
    rows = [{"step": 100 * (i + 1), "eval_tau": tau, "eval_greedy_identical": identical[i],
             "train_wall_s": 60.0 * (i + 1), "eval_alpha_step_1": tau - 1} for i, tau in enumerate(taus)]
    (folder / "tau_curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = {"data": "24 records", "machine": "x86_64 2 CPUs", "wall_s": 10}
    if target_dtype:
        last["target_dtype"] = target_dtype
    record = {"runs": [{"data": "24 records", "machine": "x86_64 2 CPUs", "wall_s": total_wall_s - 10}, last],
              "total_wall_s": total_wall_s, "total_token_updates": 5000, "total_steps": 100 * len(taus)}
    (folder / name / "config.json").write_text(json.dumps({"training_record": record}))
    return rows


def test_learning_curve_compares_finished_runs_from_their_folders(tmp_path):
    """`learning_curve.py --from-run LABEL=DIR`: a run that spanned sessions is compared from its τ curve and its
    draft's training record (all processes), without training; a folder that is not a finished run is refused."""
    curves_module = _learning_curve_module()
    beagle_rows = _finished_run(tmp_path / "a", "beagle", [1.2, 1.4], total_wall_s=7200.0)
    eagle_rows = _finished_run(tmp_path / "b", "eagle2", [1.1, 1.3], total_wall_s=3600.0)
    runs, curves = curves_module.finished_runs([f"beagle={tmp_path / 'a'}", f"eagle2={tmp_path / 'b'}"])
    assert curves == {"beagle": beagle_rows, "eagle2": eagle_rows}
    assert runs["beagle"]["wall_s_with_cache_and_evals"] == 7200.0 and runs["beagle"]["steps"] == 200
    assert runs["eagle2"]["final"]["eval_tau"] == 1.3 and runs["eagle2"]["peak_rss_bytes"] is None

    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="expected a finished training run's folder.*found no tau_curve.jsonl"):
        curves_module.finished_runs([f"x={tmp_path / 'c'}"])
    with pytest.raises(SystemExit, match="expected LABEL=OUTPUT_DIR"):
        curves_module.finished_runs([str(tmp_path / "a")])

    if importlib.util.find_spec("matplotlib") is not None:
        out = tmp_path / "out"
        assert curves_module.main(["--from-run", f"beagle={tmp_path / 'a'}", "--from-run", f"eagle2={tmp_path / 'b'}",
                                   "--output-dir", str(out)]) == 0
        table = (out / "learning_curve.md").read_text()
        assert "| 200 | 120 | 1.400 | 0.40 | 120 | 1.300 | 0.30 |" in table
        assert "| beagle | 5,000 | – | 7200 |" in table
        assert json.loads((out / "learning_curve.json").read_text())["settings"]["from_run"][0].startswith("beagle=")


def test_learning_curve_joins_a_draft_trained_in_parts(tmp_path):
    """`LABEL=DIR1+DIR2`: the second part (an --init_from continuation) counts its steps and training time on from the
    first part's last point; the totals are the last part's record, which must hold a process per part."""
    curves_module = _learning_curve_module()
    _finished_run(tmp_path / "p1", "beagle", [1.2, 1.4], total_wall_s=3000.0)
    _finished_run(tmp_path / "p2", "beagle", [1.4, 1.5, 1.6], total_wall_s=6000.0)
    runs, curves = curves_module.finished_runs([f"beagle={tmp_path / 'p1'}+{tmp_path / 'p2'}"])
    assert [(r["step"], r["train_wall_s"], r["part"]) for r in curves["beagle"]] == [
        (100, 60.0, 1), (200, 120.0, 1), (300, 180.0, 2), (400, 240.0, 2), (500, 300.0, 2)]
    assert [r["eval_tau"] for r in curves["beagle"]] == [1.2, 1.4, 1.4, 1.5, 1.6]
    assert runs["beagle"]["wall_s_with_cache_and_evals"] == 6000.0 and runs["beagle"]["final"]["step"] == 500
    _finished_run(tmp_path / "p3", "beagle", [1.3], total_wall_s=100.0)
    with pytest.raises(SystemExit, match="expected at least one per part"):  # 2 processes recorded, 3 parts named
        curves_module.finished_runs([f"beagle={tmp_path / 'p1'}+{tmp_path / 'p2'}+{tmp_path / 'p3'}"])


def test_learning_curve_reads_earlier_parts_from_committed_curves(tmp_path):
    """Earlier parts may be committed copies of their τ curves (a folder with only tau_curve.jsonl, or the .jsonl file
    itself): the curve joins as from the run folder, the totals come from the last part's draft; the last part
    without its saved draft, or a part with no curve, is refused with the part named."""
    curves_module = _learning_curve_module()
    _finished_run(tmp_path / "p1", "beagle", [1.2, 1.4], total_wall_s=3000.0)
    _finished_run(tmp_path / "p2", "beagle", [1.4, 1.5], total_wall_s=4000.0)
    _finished_run(tmp_path / "p3", "beagle", [1.6], total_wall_s=6000.0)
    (tmp_path / "p3" / "beagle" / "config.json").write_text(json.dumps({"training_record": {
        "runs": [{"data": "a"}, {"data": "b"}, {"data": "c"}], "total_wall_s": 6000.0, "total_token_updates": 9000,
        "total_steps": 500}}))
    expected = curves_module.finished_runs([f"beagle={tmp_path / 'p1'}+{tmp_path / 'p2'}+{tmp_path / 'p3'}"])
    copies = tmp_path / "copies"
    (copies / "p1").mkdir(parents=True)
    (copies / "p1" / "tau_curve.jsonl").write_text((tmp_path / "p1" / "tau_curve.jsonl").read_text())
    (copies / "p2.tau_curve.jsonl").write_text((tmp_path / "p2" / "tau_curve.jsonl").read_text())
    joined = curves_module.finished_runs([f"beagle={copies / 'p1'}+{copies / 'p2.tau_curve.jsonl'}+{tmp_path / 'p3'}"])
    assert joined[1] == expected[1] and [r["step"] for r in joined[1]["beagle"]] == [100, 200, 300, 400, 500]
    assert joined[0]["beagle"]["steps"] == 500 and joined[0]["beagle"]["token_updates"] == 9000
    with pytest.raises(SystemExit, match=r"p1: expected a finished training run's folder.*\(the last part.*found no "
                                         "saved draft"):
        curves_module.finished_runs([f"beagle={tmp_path / 'p3'}+{copies / 'p1'}"])
    with pytest.raises(SystemExit, match="missing.jsonl: expected a tau_curve.jsonl file or a folder holding one"):
        curves_module.finished_runs([f"beagle={copies / 'missing.jsonl'}+{tmp_path / 'p3'}"])


def test_learning_curve_holds_float32_runs_to_identity_and_reports_bf16_shares(tmp_path, monkeypatch):
    """Greedy identity is exact only in float32: a float32 run (or one whose ledger predates the dtype field) whose
    evaluation differed from plain greedy makes the comparison INVALID (exit 1); a bf16 run reports its identical
    share per evaluation instead (near-ties can flip there)."""
    curves_module = _learning_curve_module()
    plotted_dtypes = []  # the verdict and the plot's dtype label, not the figure itself (matplotlib)
    monkeypatch.setattr(curves_module, "plot", lambda curves, path, target_dtypes: plotted_dtypes.append(target_dtypes))
    _finished_run(tmp_path / "bf16", "beagle", [1.2, 1.4], 600.0, identical=[1.0, 0.67], target_dtype="bfloat16")
    _finished_run(tmp_path / "fp32", "eagle2", [1.1, 1.3], 600.0, identical=[1.0, 0.67], target_dtype="float32")
    _finished_run(tmp_path / "old", "eagle2", [1.1, 1.3], 600.0, identical=[0.67, 1.0])
    _finished_run(tmp_path / "ok", "eagle2", [1.1, 1.3], 600.0, target_dtype="float32")

    def run(*specs):
        out = tmp_path / ("out-" + "-".join(s.split("=")[1].rsplit("/", 1)[1] for s in specs))
        argv = [a for spec in specs for a in ("--from-run", spec)] + ["--output-dir", str(out)]
        return curves_module.main(argv), (out / "learning_curve.md").read_text()

    status, table = run(f"beagle={tmp_path / 'bf16'}", f"eagle2={tmp_path / 'ok'}")
    assert status == 0 and "**VALID**" in table and "beagle 1.00 / 0.67" in table
    for other in ("fp32", "old"):
        status, table = run(f"beagle={tmp_path / 'bf16'}", f"eagle2={tmp_path / other}")
        assert status == 1 and "**INVALID" in table, other
    status, _ = run(f"beagle={tmp_path / 'bf16'}")
    # the y label names the evaluations' target dtypes; a ledger without one counts as float32
    assert plotted_dtypes == [{"bfloat16", "float32"}] * 3 + [{"bfloat16"}]


def test_round_budget_splits_rounds_and_derives_the_tau_each_speedup_needs():
    """`benchmarks/round_budget.py`: one timed run counts the target's forwards after the prefill as steps (a round
    each for Beagle), τ as the bench defines it, and restores the target's forward afterwards; the summary's
    speedup and break-even τ follow from the per-step times."""
    from conftest import trained_pair

    budget = _benchmark_module("round_budget")
    target, beagle = trained_pair()
    ids = torch.randint(3, 96, (1, 9))
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    timer = budget.ForwardTimer(target)
    try:
        plain = budget.run_once(target, beagle, ids, kwargs, {"name": "plain"}, timer, seed=0)
        tree = budget.run_once(target, beagle, ids, kwargs, {"name": "beagle-tree", "lookup": {},
                               "shape": TreeShape(depth=3, top_k=2, total_tokens=4)}, timer, seed=0)
    finally:
        timer.close()
    assert "forward" not in vars(target)
    assert plain["new_tokens"] == tree["new_tokens"] == 24 and plain["steps"] == 23 and plain["draft_s"] == 0
    assert tree["steps"] == beagle.generation_stats.rounds and tree["steps"] < 23 and tree["draft_s"] > 0
    assert 0 < plain["forward_s"] < plain["wall_s"] and 0 < tree["forward_s"] + tree["draft_s"] < tree["wall_s"]

    runs = [{"new_tokens": 11, "steps": 4, "wall_s": 0.2, "forward_s": 0.12, "draft_s": 0.04}] * 2
    row = budget.summarise(runs, plain_step=20.0)
    assert row["tau"] == pytest.approx(2.5) and row["ms_per_step"] == pytest.approx(50.0)
    assert row["rest_ms"] == pytest.approx(10.0) and row["speedup"] == pytest.approx(1.0)
    assert row["tau_for_1.5x"] == pytest.approx(3.75) and row["speedup_if_draft_and_rest_free"] == pytest.approx(2.5 * 20 / 30)


def test_sampled_tree_variants_values_children_by_the_calibration_table(monkeypatch):
    """`benchmarks/sampled_tree_variants.py`: the calibrated value of a sampled child is the table's pick probability
    for its rank, interpolated in q and never decreasing in q; swapped in for `sampled_child_scores`, it changes which
    nodes the sampled tree keeps (the loop reads the function by name) while the tree stays whole sibling groups, each
    a prefix of its draws."""
    from conftest import trained_pair
    from test_decoding import _true_context

    import modeling_beagle.decoding_beagle as decoding
    from modeling_beagle import draft_sampled_tree

    variants = _benchmark_module("sampled_tree_variants")
    table = [{"rank": 0, "mean_q": 0.01, "mean_pick": 0.3}, {"rank": 0, "mean_q": 0.1, "mean_pick": 0.5},
             {"rank": 0, "mean_q": 0.5, "mean_pick": 0.45}, {"rank": 0, "mean_q": 0.9, "mean_pick": 0.8},
             {"rank": 1, "mean_q": 0.01, "mean_pick": 0.05}, {"rank": 1, "mean_q": 0.3, "mean_pick": 0.2}]
    curves = variants.pick_curves(table)
    assert curves[0][0].tolist() == pytest.approx([0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
    assert curves[0][1].tolist() == pytest.approx([0.3, 0.3, 0.5, 0.5, 0.8, 0.8])  # 0.45 lifted: non-decreasing
    scores = variants.calibrated_scores(curves)
    q = torch.tensor([[[0.01, 0.3, 0.3], [0.3, 0.01, 0.0]]])  # (batch 1, 2 nodes, 3 draws); rank 2 reads rank 1's curve
    drawn = torch.tensor([[[0, 1, 2], [1, 0, 2]]])
    log_q = torch.full((1, 2, 4), 1e-9).scatter(-1, drawn, q).log()
    values = scores(log_q, drawn).exp()
    assert values[0, 0].tolist() == pytest.approx([0.3, 0.2, 0.2], rel=1e-4)
    assert values[0, 1].tolist() == pytest.approx([0.5, 0.05, 0.05], rel=1e-4)
    between = scores(torch.tensor([[[0.05, 0.35, 0.3, 0.3]]]).log(), torch.tensor([[[0, 1, 2]]])).exp()[0, 0]
    assert between[0] == pytest.approx(0.3 + 0.2 * (0.05 - 0.01) / 0.09, rel=1e-4)  # linear between the bins' mean q
    # a rank-0 child with q = 0.01 now outranks a rank-1 child with q = 0.3, as the table says
    assert values[0, 0, 0] > values[0, 0, 1]

    target, beagle = trained_pair()
    torch.manual_seed(0)
    ids = torch.randint(3, 96, (2, 7))
    shape = TreeShape(depth=4, top_k=3, total_tokens=9)
    kept = {}
    for name, score in (("q", decoding.sampled_child_scores), ("calibrated", scores)):
        monkeypatch.setattr(decoding, "sampled_child_scores", score)
        cache = _true_context(target, beagle, ids)
        torch.manual_seed(5)
        tokens, parents, depths, ranks, _ = draft_sampled_tree(beagle, cache, ids[:, 6], torch.tensor([6, 6]), shape)
        for b in range(2):
            groups = {}
            for i in range(tokens.shape[1]):
                assert int(parents[b, i]) < i
                groups.setdefault(int(parents[b, i]), []).append(int(ranks[b, i]))
            assert all(sorted(r) == list(range(len(r))) for r in groups.values())
        kept[name] = (parents.tolist(), depths.tolist())
    assert kept["q"] != kept["calibrated"], "the calibrated values did not change the tree: the swap had no effect"


def test_bench_prompts_from_text_turns_with_and_without_a_chat_template():
    """`_Setting.prompt_ids`: pre-tokenized prompts pass through; a first turn goes through the chat template when the
    tokenizer has one (`first_turn_ids`, which the benchmark scripts share), else as plain text; a second turn holds
    the target's own greedy answer to the first (generated once, kept in `answers`), and is skipped (None) without a
    template; text without a tokenizer is refused."""
    from test_generation import tiny_tokenizer

    from trainer.bench import Case, _Setting, first_turn_ids

    target, _ = tiny_pair()
    plain_tok = tiny_tokenizer()
    chat_tok = tiny_tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    first, second = Case("set", "q", 1, turns=["Hi"]), Case("set/turn-2", "q", 2, turns=["Hi", "More"])

    def setting(tokenizer, answers):
        return _Setting(target, tokenizer, [], "float32", 0.0, settings(), answers)

    assert setting(None, {}).prompt_ids(Case("set", "p", 1, input_ids=[4, 5])) == [4, 5]
    with pytest.raises(BeagleBenchError, match="tokenizer"):
        setting(None, {}).prompt_ids(first)
    assert setting(plain_tok, {}).prompt_ids(first) == first_turn_ids(plain_tok, "Hi") == plain_tok("Hi")["input_ids"]
    assert setting(plain_tok, {}).prompt_ids(second) is None
    chat_first = setting(chat_tok, {}).prompt_ids(first)
    assert chat_first == first_turn_ids(chat_tok, "Hi") == chat_tok("<user>Hi<assistant>")["input_ids"]
    answers = {}
    chat_second = setting(chat_tok, answers).prompt_ids(second)
    ids = torch.tensor([chat_first])  # the mask is explicit: this tokenizer's pad symbol occurs in "<assistant>"
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    plain = plain[0, ids.shape[1]:]
    assert answers == {("set", "q"): chat_tok.decode(plain, skip_special_tokens=True)}
    assert chat_second == chat_tok(f"<user>Hi<assistant>{answers[('set', 'q')]}<user>More<assistant>")["input_ids"]


def test_reexamine_divergences_replays_a_finished_runs_prompt_and_keeps_a_last_ranked_token_unexplained(
        tmp_path, monkeypatch):
    """`benchmarks/reexamine_divergences.py` on a bench.json it did not write: it rebuilds the run's prompt (chat
    template, first and second turns), regenerates plain greedy up to the divergence, and applies the bench's current
    checks. A method token the target ranks first at that position (the same token as plain greedy's, so a one-token
    "divergence" by construction) is explained; the token it ranks last is not, and then the exit status is 1. A
    recorded plain token this target does not replay is refused; a run with nothing to re-examine writes nothing."""
    from test_generation import tiny_tokenizer

    from trainer.bench import Case, _Setting, examine_divergence

    script = _benchmark_module("reexamine_divergences")
    target, _ = tiny_pair("bfloat16")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    questions = [{"id": 7, "turns": ["Hello", "Again"]}]
    monkeypatch.setattr(script, "load_target", lambda name, dtype: (target, tokenizer))
    monkeypatch.setattr(script, "load_prompts", lambda name: questions)

    # what the bench would have seen: its prompt ids and plain greedy on them, per turn
    answers = {}
    setting = _Setting(target, tokenizer, [], "bfloat16", 0.0, settings(max_new_tokens=6), answers)
    cases = {"mt-bench": Case("mt-bench", "7", 1, turns=questions[0]["turns"][:1]),
             "mt-bench/turn-2": Case("mt-bench/turn-2", "7", 2, turns=questions[0]["turns"])}
    divergences, expected = [], {}
    for prompt_set, case in cases.items():
        prompt = setting.prompt_ids(case)
        ids = torch.tensor([prompt])
        plain = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=6)[0, len(prompt):].tolist()
        with torch.no_grad():
            logits = target(torch.tensor([prompt + plain[:4]]), logits_to_keep=1).logits[0, -1]
        last = int(logits.argmin())
        expected[prompt_set] = examine_divergence(target, prompt, plain[:5], plain[:4] + [last])
        divergences.append({"prompt_set": prompt_set, "dtype": "bfloat16", "method": "biased",
                            "divergences": [{"prompt_id": "7", "position": 4, "plain_token": plain[4],
                                             "method_token": last, "within_rounding": False}]})
    run = tmp_path / "run"
    run.mkdir()
    bench_json = {"settings": {"target": "tiny", "max_new_tokens": 6, "prepack": False}, "results": divergences}
    (run / "bench.json").write_text(json.dumps(bench_json))

    assert script.main([str(run)]) == 1
    out = json.loads((run / "reexamined.json").read_text())
    assert out["all_explained"] is False and len(out["divergences"]) == 2
    for row in out["divergences"]:
        assert row["now"] == json.loads(json.dumps(expected[row["prompt_set"]]))  # the second turn replayed too
        assert row["now"]["within_rounding"] is False
    assert "All explained: False." in (run / "reexamined.md").read_text()

    # a token the target scores exactly as its own choice (its head row copied, so an exact tie everywhere that
    # greedy breaks towards the lower id) is explained, on both turns
    tied = 95
    assert all(tied > row["divergences"][0]["plain_token"] for row in bench_json["results"])
    with torch.no_grad():
        head = target.get_output_embeddings().weight
        head[tied] = head[bench_json["results"][0]["divergences"][0]["plain_token"]]
    for row in bench_json["results"]:
        row["divergences"][0]["method_token"] = tied
    (run / "bench.json").write_text(json.dumps(bench_json))
    assert script.main([str(run)]) == 0
    out = json.loads((run / "reexamined.json").read_text())
    assert out["all_explained"] is True and all(row["now"]["gap"] == 0.0 for row in out["divergences"])

    # a "divergence" with the same token on both sides is malformed
    bench_json["results"][0]["divergences"][0]["method_token"] = bench_json["results"][0]["divergences"][0][
        "plain_token"]
    (run / "bench.json").write_text(json.dumps(bench_json))
    with pytest.raises(SystemExit, match="not a divergence"):
        script.main([str(run)])
    bench_json["results"][0]["divergences"][0]["method_token"] = tied

    # a recorded plain token this target does not give is refused, naming the prompt and the position
    bench_json["results"][0]["divergences"][0]["plain_token"] = (bench_json["results"][0]["divergences"][0]
                                                                 ["plain_token"] + 1) % 96
    (run / "bench.json").write_text(json.dumps(bench_json))
    with pytest.raises(SystemExit, match="does not give the recorded token .* at 4"):
        script.main([str(run)])

    # nothing to re-examine: no files written
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bench.json").write_text(json.dumps({"settings": bench_json["settings"], "results": [
        {**divergences[0], "divergences": [{**divergences[0]["divergences"][0], "within_rounding": True}]}]}))
    assert script.main([str(empty)]) == 0
    assert not (empty / "reexamined.json").exists()


def test_reexamine_divergences_replays_the_method_in_float32(tmp_path, monkeypatch):
    """`--replay-fp32`: each still unexplained divergence's method is rebuilt from the run's settings (its Beagle
    checkpoint, tree shape and plugins) for the float32 target and its whole reply compared with float32 plain
    greedy: Beagle's tree and transformers' prompt lookup replay identically, a plugin method that alters a token
    does not, and a method the settings cannot rebuild is refused by name."""
    from test_generation import tiny_tokenizer

    from trainer.bench import Case, _Setting

    script = _benchmark_module("reexamine_divergences")
    target32, beagle = tiny_pair("float32")
    beagle.save_pretrained(tmp_path / "beagle")
    target16, _ = tiny_pair("bfloat16")
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(script, "load_target",
                        lambda name, dtype: (target32 if dtype == torch.float32 else target16, tokenizer))
    questions = [{"id": 7, "turns": ["Hello"]}]
    monkeypatch.setattr(script, "load_prompts", lambda name: questions)
    plugin = tmp_path / "altering.py"
    plugin.write_text(
        "from trainer.bench import Method, MethodRun\n\n"
        "def bench_methods(target, tokenizer, arg, tree_shape='auto'):\n"
        "    def run(ids, mask, new, do_sample, temperature, seed):\n"
        "        out = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=0)\n"
        "        out[0, -1] = (out[0, -1] + 1) % target.config.vocab_size\n"
        "        return MethodRun(out)\n"
        "    return [Method('altering', run)]\n")

    setting = _Setting(target16, tokenizer, [], "bfloat16", 0.0, settings(max_new_tokens=6), {})
    prompt = setting.prompt_ids(Case("mt-bench", "7", 1, turns=questions[0]["turns"]))
    ids = torch.tensor([prompt])
    plain = target16.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=6)[0, len(prompt):].tolist()
    with torch.no_grad():
        last = int(target16(torch.tensor([prompt + plain[:4]]), logits_to_keep=1).logits[0, -1].argmin())
    divergence = {"prompt_id": "7", "position": 4, "plain_token": plain[4], "method_token": last,
                  "within_rounding": False}
    results = [{"prompt_set": "mt-bench", "dtype": "bfloat16", "method": name, "divergences": [divergence]}
               for name in ("beagle-tree", "altering", "prompt-lookup")]
    run = tmp_path / "run"
    run.mkdir()
    bench_settings = {"target": "tiny", "max_new_tokens": 6, "prepack": False, "beagle": str(tmp_path / "beagle"),
                      "tree_shape": "3,2,4", "plugins": [str(plugin)]}
    (run / "bench.json").write_text(json.dumps({"settings": bench_settings, "results": results}))

    assert script.main([str(run), "--replay-fp32"]) == 1  # the bf16 checks still leave both unexplained
    rows = {row["method"]: row for row in json.loads((run / "reexamined.json").read_text())["divergences"]}
    assert rows["beagle-tree"]["fp32_replay_identical"] is True
    assert rows["altering"]["fp32_replay_identical"] is False
    assert rows["prompt-lookup"]["fp32_replay_identical"] is True  # transformers' prompt lookup, rebuilt too
    report = (run / "reexamined.md").read_text()
    assert "| True |" in report and "replays identically in float32: False" in report

    # A tree-size sweep (two --tree-shape): its tree methods are named by shape and rebuilt with that shape.
    sweep = [dict(results[0], method=f"beagle-tree[{shape}]") for shape in ("3,2,4", "2,1,2")]
    (run / "bench.json").write_text(json.dumps({"settings": dict(bench_settings, tree_shape="3,2,4, 2,1,2"),
                                                "results": sweep}))
    script.main([str(run), "--replay-fp32"])
    rows = {row["method"]: row for row in json.loads((run / "reexamined.json").read_text())["divergences"]}
    assert rows["beagle-tree[3,2,4]"]["fp32_replay_identical"] is True
    assert rows["beagle-tree[2,1,2]"]["fp32_replay_identical"] is True

    results[1]["method"] = "eagle9-tree"
    (run / "bench.json").write_text(json.dumps({"settings": bench_settings, "results": results}))
    with pytest.raises(SystemExit, match="'eagle9-tree' cannot be rebuilt"):
        script.main([str(run), "--replay-fp32"])


def test_draft_overlap_reads_each_drafts_first_step_and_bounds_overlap_by_the_vocabulary():
    """`benchmarks/draft_overlap.py`: the Beagle distribution it scores at each reply position is the one a round's
    first draft step computes there (the true context in a cache, one query); the EAGLE-2-style draft's is its chain
    step after its rows up to that position; overlap is 1 - total variation and never exceeds p's mass on the draft
    vocabulary, which is 1 for a full-vocabulary draft."""
    from test_decoding import _true_context
    from test_eagle2_baseline import eagle2, perturbed

    script = _benchmark_module("draft_overlap")
    target, _ = tiny_pair()
    torch.manual_seed(3)
    reduced = BeagleModel.from_target(target, attn_implementation="eager", draft_vocab_size=40).eval()
    reduced.set_draft_vocabulary(torch.randperm(96)[:40].sort().values)
    full = BeagleModel.from_target(target, attn_implementation="eager").eval()
    baseline = perturbed(eagle2.Eagle2Draft.from_target(target, draft_vocab_size=40)).eval()
    sequence = torch.randint(3, 96, (1, 12))
    prompt_len = 5
    drafts = {"reduced": (reduced, script.beagle_first_step), "full": (full, script.beagle_first_step),
              "eagle2": (baseline, script.eagle2_first_step)}
    metrics = script.position_metrics(target, drafts, sequence, prompt_len, temperature=1.0)
    with torch.no_grad():
        out = target(sequence, output_hidden_states=True)
    for name, (draft, _) in drafts.items():
        assert len(metrics[f"{name}_overlap"]) == 12 - prompt_len
        for index, j in enumerate(range(prompt_len - 1, 11)):
            with torch.no_grad():
                if name == "eagle2":  # its rows 0..j-1, the last of which reads (t_j, f_{j-1})
                    step = draft(input_ids=sequence[:, 1:j + 1], features=out.hidden_states[-1][:, :j]).logits[0, -1]
                else:  # states < j in a cache, the root t_j
                    cache = _true_context(target, draft, sequence[:, : j + 1])
                    step = draft(input_ids=sequence[:, j:j + 1], position_ids=torch.tensor([[j]]),
                                 past_key_values=cache).logits[0, 0]
            step = step.float().softmax(-1)
            to_target = draft.draft_to_target
            q = step if to_target is None else torch.zeros(96).index_copy_(0, to_target, step)
            p = out.logits[0, j].float().softmax(-1)
            assert metrics[f"{name}_overlap"][index] == pytest.approx(1 - 0.5 * float((p - q).abs().sum()), abs=1e-5)
            assert metrics[f"{name}_top1"][index] == float(int(p.argmax()) == int(q.argmax()))
            assert metrics[f"{name}_overlap"][index] <= metrics[f"{name}_vocab_mass"][index] + 1e-6
            assert (metrics["top1_mass"][index] <= metrics["top8_mass"][index] <= metrics["top32_mass"][index]
                    <= 1 + 1e-6)
    assert metrics["full_vocab_mass"] == pytest.approx([1.0] * (12 - prompt_len), abs=1e-5)
    assert max(metrics["reduced_vocab_mass"]) < 1


def test_draft_overlap_pairs_variants_per_prompt_and_refuses_bad_variant_names():
    """`--variant NAME=FOLDER` drafts are paired per prompt against `--beagle` (difference, its standard error, how many
    prompts are higher); a malformed or clashing name stops before any model loads."""
    script = _benchmark_module("draft_overlap")
    result = script.paired([0.5, 0.4, 0.7], [0.4, 0.5, 0.5], "variant_higher")
    assert result["mean"] == pytest.approx(0.2 / 3) and result["variant_higher"] == 2
    assert result["standard_error"] == pytest.approx(statistics.stdev([0.1, -0.1, 0.2]) / 3 ** 0.5)
    for spec in ("no-folder", "=folder", "eagle2=folder", "beagle=folder"):
        with pytest.raises(SystemExit):
            script.main(["--variant", spec])
    with pytest.raises(SystemExit):
        script.main(["--variant", "a=x", "--variant", "a=y"])


def test_greedy_tree_calibration_records_every_scored_child_and_calibrates_node_values():
    """`benchmarks/greedy_tree_calibration.py`: the recorder follows the expansion's own frontier, so every node of the
    returned tree is among the recorded children (by its path from the root) with the draft's q; labels compare a
    child's path with the text after its root; the table is P(on text | parent on text) per depth, rank and q bin; the
    calibrated values replace log q by the log of that table's (non-decreasing) interpolation, keeping the tokens."""
    from conftest import trained_pair
    from test_decoding import _true_context

    from modeling_beagle.decoding_beagle import draft_tree

    script = _benchmark_module("greedy_tree_calibration")
    target, beagle = trained_pair()
    ids = torch.randint(3, 96, (1, 7))
    shape = TreeShape(depth=4, top_k=3, total_tokens=10)
    with script.ExpansionRecorder() as recorder:
        tokens, parents, depths = script.decoding.draft_tree(beagle, _true_context(target, beagle, ids), ids[:, 6],
                                                             torch.tensor([6]), shape)
    assert script.decoding.draft_topk is recorder._topk  # restored
    recorded = {tuple(path): (depth, q) for root, depth, rank, q, path in recorder.records}
    assert all(root == 6 for root, *_ in recorder.records)
    assert {depth for depth, _ in recorded.values()} == set(range(1, 5))
    for node in range(tokens.shape[1]):
        path, walk = [], node
        while walk >= 0:
            path.insert(0, int(tokens[0, walk]))
            walk = int(parents[0, walk])
        assert tuple(path) in recorded and recorded[tuple(path)][0] == int(depths[0, node])
    reference = draft_tree(beagle, _true_context(target, beagle, ids), ids[:, 6], torch.tensor([6]), shape)
    assert all(torch.equal(a, b) for a, b in zip(reference, (tokens, parents, depths)))  # recording changes nothing

    records = [(2, 1, 0, 0.5, [7]), (2, 2, 1, 0.2, [7, 9]), (2, 2, 0, 0.6, [8, 1]), (2, 3, 0, 0.9, [7, 8, 4])]
    labelled = script.label_records(records, [0, 0, 0, 7, 8])  # the text after root position 2: 7 8 (then it ends)
    assert [(r["on_text"], r["parent_on_text"]) for r in labelled] == [(True, True), (False, True), (False, False)]
    rows = [{"depth": 1, "rank": 0, "q": q, "on_text": on, "parent_on_text": True}
            for q, on in [(0.15, True)] * 15 + [(0.15, False)] * 5 + [(0.95, False)] * 19 + [(0.95, True)] * 1]
    table = script.calibration_table(rows, min_count=20)
    assert [(r["q_low"], r["count"], r["on_text"]) for r in table] == [(0.1, 20, 0.75), (0.9, 20, 0.05)]
    topk, state = script.calibrated_topk(table, lambda beagle_, logits, k: (logits.log_softmax(-1).topk(k)))
    logits = torch.log(torch.tensor([[[0.15, 0.05, 0.8]]]))
    values, kept = topk(None, logits, 2)
    assert torch.equal(kept, torch.tensor([[[2, 0]]])) and state["level"] == 1
    # non-decreasing in q: the 0.95 bin's 0.05 is lifted to 0.75; q 0.15 reads 0.75 exactly
    torch.testing.assert_close(values.exp(), torch.tensor([[[0.75, 0.75]]]))


def test_lookup_rules_replay_and_branches(monkeypatch):
    """`benchmarks/lookup_rules.py`: the lookup-only walk counts rounds and taken tokens as speculative decoding
    would; several suffix-rule branches start with the loop's own proposal, are distinct, and merge into a tree whose
    nodes are the branches' prefixes; the multi-branch loop stays plain greedy."""
    from conftest import trained_pair

    from modeling_beagle import beagle_generate
    from modeling_beagle.decoding_beagle import suffix_lookup

    rules = _benchmark_module("lookup_rules")
    # a reply that repeats the prompt: round 1 has no earlier 8 (the target's token 5 only), round 2 proposes 6 7 8
    # after the earlier 5 and takes all three, round 3 has no room left for a proposal (the target's last token)
    walk = rules.replay(rules.RULES["suffix-latest"], [5, 6, 7, 8], [5, 6, 7, 8, 5, 6], num_tokens=3)
    assert walk == {"rounds": 3, "proposed": 3, "taken": 3, "tokens": 6}
    walk = rules.replay(rules.RULES["ngram2-earliest"], [1, 2], [3, 4, 5], num_tokens=4)  # nothing repeats
    assert walk == {"rounds": 3, "proposed": 0, "taken": 0, "tokens": 3}
    # by match length: after "1" (a 1-token match) the reply takes 2 of "2 3 4", after "1 2" 1 of "3 4 1", after
    # "1 2 3" none of "4 1 2"; "4" and "5" occurred nowhere earlier
    assert rules.taken_by_match_length([1, 2, 3, 4], [1, 2, 3, 5, 1, 2], num_tokens=3) == {
        1: [0, 0, 1, 0], 2: [0, 1, 0, 0], 3: [1, 0, 0, 0]}
    assert rules.taken_by_match_length([1, 2, 3, 4], [1, 2, 3, 5, 1, 2], num_tokens=3, longest=2) == {
        1: [0, 0, 1, 0], 2: [1, 1, 0, 0]}
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        sequence = torch.randint(0, 4, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g)
        proposals = rules.suffix_lookups(sequence, 5, 3)
        assert proposals[:1] == ([suffix_lookup(sequence, 5)] if suffix_lookup(sequence, 5) else [])
        assert len(proposals) <= 3 and len({tuple(p) for p in proposals}) == len(proposals)
    tokens, parents, depths = torch.tensor([[9]]), torch.tensor([[-1]]), torch.tensor([[1]])
    merged, merged_parents, merged_depths, from_lookup = rules.merge_branches(tokens, parents, depths,
                                                                              [[[9, 1, 2], [9, 1, 3], [4]]])
    paths = []
    for i in range(merged.shape[1]):
        path, node = [], i
        while node >= 0:
            path.insert(0, int(merged[0, node]))
            node = int(merged_parents[0, node])
        paths.append(tuple(path))
    assert sorted(paths) == sorted([(9,), (9, 1), (9, 1, 2), (9, 1, 3), (4,)])
    assert from_lookup[0].tolist() == [p != (9,) for p in paths]
    assert merged_depths[0].tolist() == [len(p) for p in paths]
    target, beagle = trained_pair()
    merged_branches = []  # per round, how many continuations the loop merged into its tree
    merge = rules.merge_branches
    monkeypatch.setattr(rules, "merge_branches",
                        lambda *args: merged_branches.append(max(len(p) for p in args[3])) or merge(*args))
    for seed in range(4):
        ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(seed))
        ref = target.generate(ids, do_sample=False, max_new_tokens=30)
        with rules.lookup_branches(3):
            out = target.generate(ids, custom_generate=beagle_generate, beagle=beagle, do_sample=False,
                                  max_new_tokens=30, tree_shape=TreeShape(depth=2, top_k=2, total_tokens=3),
                                  prompt_lookup_num_tokens=4)
        assert torch.equal(out, ref)
    assert max(merged_branches) > 1  # the swapped rule was the loop's: several branches in some rounds
    suffix_rule = rules.decoding.LOOKUP_RULES["suffix"]
    assert (suffix_rule.match, suffix_rule.continuation) == (rules.decoding.suffix_match, rules.decoding.periodic_continuation)
    assert rules.decoding.add_lookup_branch is rules.ADD_LOOKUP_BRANCH  # swapped back


def test_lookup_rules_chain_copy_match():
    """`chainmatchM` (`lookup_rules.chain_lookup_replaced`): the assisted path's copy rounds start at M tokens inside the
    block (none where no match is that long), at the package's CHAIN_LOOKUP_MATCH again after it, output plain greedy."""
    from conftest import markov_target

    from modeling_beagle import BeagleModel

    rules = _benchmark_module("lookup_rules")
    target = markov_target()  # its greedy text loops: every round's last tokens repeat an earlier passage
    beagle = BeagleModel.from_target(target, attn_implementation="eager")
    ids = target.generate(torch.tensor([[5, 6]]), do_sample=False, max_new_tokens=100)
    ref = target.generate(ids, do_sample=False, max_new_tokens=12)

    def copy_rounds():
        out = target.generate(ids, do_sample=False, max_new_tokens=12, assistant_model=beagle,
                              prompt_lookup_num_tokens=4)
        assert torch.equal(out, ref)
        return beagle.generation_stats.copy_rounds

    default = copy_rounds()
    with rules.chain_lookup_replaced(beagle, copy_match=1000):
        assert copy_rounds() == 0
    assert default > 0 and copy_rounds() == default
    assert "beagle_candidate_generator" not in vars(beagle)  # the instance's override is gone


def _copy_round_recorder(monkeypatch, match_ngram: int):
    """A looping tiny target, a fresh Beagle, a 102-token prompt from the target's own greedy loop, and the list every
    copy round of the suffix rule appends (match length up to `match_ngram`, tokens asked for) to."""
    from dataclasses import replace

    from conftest import markov_target

    from modeling_beagle import BeagleModel
    from modeling_beagle.decoding_beagle import LOOKUP_RULES

    rule = LOOKUP_RULES["suffix"]
    asked = []

    def recording(sequence, end, num_tokens):
        asked.append((rule.match(sequence, match_ngram)[1], num_tokens))
        return rule.continuation(sequence, end, num_tokens)

    monkeypatch.setitem(LOOKUP_RULES, "suffix", replace(rule, continuation=recording))
    target = markov_target()  # its greedy text loops: every round's last tokens repeat an earlier passage
    beagle = BeagleModel.from_target(target, attn_implementation="eager")
    ids = target.generate(torch.tensor([[5, 6]]), do_sample=False, max_new_tokens=100)
    return target, beagle, ids, asked


def test_lookup_rules_chain_tokens_per_match(monkeypatch):
    """`chainpermatchK` (`ChainLookup.tokens_per_match`): a copy round proposes at most K tokens per matched token
    (and never more than N or the budget); in `generate` the output stays plain greedy and every copy round asks for
    at most K times its match's length, back to N after the block."""
    from dataclasses import replace

    from modeling_beagle.decoding_beagle import LOOKUP_RULES
    from modeling_beagle.generation_beagle import ChainLookup

    rules = _benchmark_module("lookup_rules")
    rule = LOOKUP_RULES["suffix"]
    sequence = torch.tensor([7, 8, 9, 1, 2, 3, 4, 5, 6, 9, 1])  # the suffix [9, 1] matched once: 2 tokens
    plain = ChainLookup(rule.match, rule.continuation, num_tokens=10, max_ngram=32, copy_match=2)  # 0: uncapped
    assert plain.proposal(sequence, budget=20) == [2, 3, 4, 5, 6, 9, 1, 2, 3, 4]
    for k, expected in [(1, [2, 3]), (3, [2, 3, 4, 5, 6, 9]), (5, [2, 3, 4, 5, 6, 9, 1, 2, 3, 4])]:
        capped = replace(plain, tokens_per_match=k)
        assert capped.proposal(sequence, budget=20) == expected
    assert replace(plain, tokens_per_match=3).proposal(sequence, budget=4) == [2, 3, 4, 5]
    assert replace(plain, tokens_per_match=3).proposal(sequence[:-1], budget=20) is None

    target, beagle, ids, asked = _copy_round_recorder(monkeypatch, match_ngram=2)
    ref = target.generate(ids, do_sample=False, max_new_tokens=24)

    def copy_rounds(context):
        asked.clear()
        with context:  # matches of at most 2 tokens (max_matching_ngram_size), 8 tokens per copy round uncapped
            out = target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=beagle,
                                  prompt_lookup_num_tokens=8, max_matching_ngram_size=2)
        assert torch.equal(out, ref)
        assert asked and len(asked) == beagle.generation_stats.copy_rounds
        return list(asked)

    capped = copy_rounds(rules.chain_lookup_replaced(beagle, tokens_per_match=1))
    assert all(n <= m for m, n in capped) and max(n for _, n in capped) < 8
    uncapped = copy_rounds(contextlib.nullcontext())
    assert "beagle_candidate_generator" not in vars(beagle)  # the instance's override is gone
    assert max(n for _, n in uncapped) == 8


def test_lookup_rules_chain_copy_extension(monkeypatch):
    """`chaincopyMxN` (`ChainLookup.extend_match` / `extend_tokens`): a match of at least M tokens proposes up to N
    tokens, a shorter one `num_tokens`, never more than the budget; the candidate generator announces N to
    transformers (`num_drafting_tokens`); in `generate` the output stays plain greedy, long matches ask for N tokens
    and the override is gone after the block."""
    from dataclasses import replace

    from modeling_beagle.decoding_beagle import LOOKUP_RULES
    from modeling_beagle.generation_beagle import ChainLookup

    rules = _benchmark_module("lookup_rules")
    rule = LOOKUP_RULES["suffix"]
    sequence = torch.tensor([7, 8, 9, 1, 2, 3, 4, 5, 6, 9, 1])  # the suffix [9, 1] matched once: 2 tokens
    plain = ChainLookup(rule.match, rule.continuation, num_tokens=4, max_ngram=32, copy_match=2)
    assert plain.max_tokens == 4 and replace(plain, extend_tokens=12).max_tokens == 4  # no extend_match: off
    extended = replace(plain, extend_match=3, extend_tokens=12)
    assert extended.max_tokens == 12
    assert extended.proposal(sequence, budget=20) == [2, 3, 4, 5]  # a 2-token match keeps num_tokens
    assert replace(plain, extend_match=2, extend_tokens=12).proposal(sequence, budget=20) == [2, 3, 4, 5, 6, 9, 1, 2, 3,
                                                                                                 4, 5, 6]
    assert replace(plain, extend_match=2, extend_tokens=12).proposal(sequence, budget=7) == [2, 3, 4, 5, 6, 9, 1]

    target, beagle, ids, asked = _copy_round_recorder(monkeypatch, match_ngram=32)
    ref = target.generate(ids, do_sample=False, max_new_tokens=40)
    announced = []
    with rules.chain_lookup_replaced(beagle, extend_match=4, extend_tokens=12):
        build = beagle.beagle_candidate_generator
        beagle.beagle_candidate_generator = lambda *a, **k: announced.append(build(*a, **k)) or announced[-1]
        out = target.generate(ids, do_sample=False, max_new_tokens=40, assistant_model=beagle,
                              prompt_lookup_num_tokens=4)
        beagle.beagle_candidate_generator = build
    assert torch.equal(out, ref)
    assert asked and len(asked) == beagle.generation_stats.copy_rounds
    assert all(n <= (12 if m >= 4 else 4) for m, n in asked) and max(n for _, n in asked) > 4
    assert len(announced) == 1 and announced[0].num_drafting_tokens >= 12
    assert "beagle_candidate_generator" not in vars(beagle)  # the override is gone


def test_paired_comparison_of_bench_methods():
    """`benchmarks/paired.py`: per prompt, tokens/s ratios and τ differences against the base method; plain rows and
    prompts the base did not run are left out; a base no prompt ran is refused."""
    paired = _benchmark_module("paired")

    def run(method, prompt, time_s, tau, new_tokens=100):
        return dict(prompt_set="mt-bench", temperature=0.0, dtype="float32", method=method, prompt_id=prompt, turn=1,
                    time_s=time_s, tau=tau, new_tokens=new_tokens)

    runs = [run("plain", "a", 10.0, 1.0), run("base", "a", 4.0, 2.0), run("new", "a", 2.0, 3.0),
            run("plain", "b", 10.0, 1.0), run("base", "b", 5.0, 2.5), run("new", "b", 5.0, 2.0),
            run("base", "c", 6.0, 2.0, new_tokens=60), run("new", "c", 4.0, 2.5, new_tokens=40),
            run("new", "d", 1.0, 9.0)]  # base never ran d
    (row,) = paired.paired_rows(runs, "base")
    assert row["method"] == "new" and row["prompts"] == 3
    ratios = [2.0, 1.0, 1.0]  # a: twice as fast; b: same; c: 40/4 against 60/6 tokens/s
    assert row["ratio_median"] == pytest.approx(1.0) and row["ratio_mean"] == pytest.approx(sum(ratios) / 3)
    assert row["faster"] == 1 and row["total_ratio"] == pytest.approx((240 / 11.0) / (260 / 15.0))
    assert row["tau_diff"] == pytest.approx((1.0 - 0.5 + 0.5) / 3)
    assert "| new | base | 3 |" in paired.markdown([row])
    (row,) = paired.paired_rows(runs, "base", exclude=("a",))
    assert row["prompts"] == 2 and row["ratio_median"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="--base"):
        paired.paired_rows(runs, "missing")
    # two benches pooled (e.g. two sampling seeds): the same prompt of each is a pair of its own
    second = [dict(r, source=1, time_s=r["time_s"] * (2 if r["method"] == "new" else 1)) for r in runs]
    (row,) = paired.paired_rows([dict(r, source=0) for r in runs] + second, "base")
    assert row["prompts"] == 6 and row["ratio_mean"] == pytest.approx((sum(ratios) + sum(ratios) / 2) / 6)


def test_beagle_checkpoint_plugin_runs_a_second_draft_under_its_label(tmp_path):
    """`benchmarks/beagle_checkpoint.py`: `LABEL=PATH@METHODS` loads the checkpoint at PATH as the bench loads
    `--beagle` and runs the built-in methods with it, renamed `LABEL-<method>`; their greedy output is plain greedy's,
    and malformed arguments are refused with the expected form."""
    from conftest import trained_pair

    plugin = _benchmark_module("beagle_checkpoint")
    target, beagle = trained_pair()
    beagle.save_pretrained(tmp_path / "candidate")
    methods = plugin.bench_methods(target, None, f"cand={tmp_path / 'candidate'}@tree,tree-lookup",
                                   tree_shape=TreeShape(depth=2, top_k=2, total_tokens=3), prompt_lookup_num_tokens=4)
    assert [m.name for m in methods] == ["cand-tree", "cand-tree-lookup"]
    assert all(str(tmp_path / "candidate") in m.description for m in methods)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = target.generate(ids, do_sample=False, max_new_tokens=20)
    for method in methods:
        run = method.run(ids, torch.ones_like(ids), 20, False, 0.0, 0)
        assert torch.equal(run.output_ids, ref) and run.accepted_per_position
    assert [m.name for m in plugin.bench_methods(target, None, f"c2={tmp_path / 'candidate'}", tree_shape="chain")] \
        == ["c2-chain", "c2-tree", "c2-tree-lookup"]
    for bad in (str(tmp_path / "candidate"), "=x", "a b=x", f"c={tmp_path}@bush", f"c={tmp_path}@tree,tree"):
        with pytest.raises(ValueError, match="LABEL=PATH"):
            plugin.parse_arg(bad)
