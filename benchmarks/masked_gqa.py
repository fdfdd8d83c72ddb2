"""Beagle's own loop on the CPU with and without transformers' `TRANSFORMERS_SDPA_FORCE_GQA=1`, interleaved in one
process, same prompts and seeds.

A verification forward passes a tree mask, and transformers' sdpa attention then repeats the target's key/value heads
for every query head (a copy of the whole cache in every layer) instead of asking torch's kernel for grouped-query
attention, which it does only without a mask (one-token decoding). The variable (read by transformers at every
attention call) makes it use the kernel's GQA with the mask too. This measures ms per round and tokens/s both ways
and checks that the outputs are identical, token for token (greedy and, with the same seed, sampled):

    LD_PRELOAD=libjemalloc.so.2 python benchmarks/masked_gqa.py --beagle checkpoints/beagle-smollm2-135m-instruct \
        --prepack --threads 2 --out benchmarks/results/masked_gqa

writes `<out>.json` and `<out>.md`.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.round_budget import first_turns, load_models, write_report  # noqa: E402
from modeling_beagle import beagle_generate  # noqa: E402
from trainer.bench import generation_kwargs, machine_info, parse_tree_shape  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402

VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", required=True, help="Beagle checkpoint folder")
    parser.add_argument("--num-prompts", type=int, default=5, help="MT-bench first turns, spread over the set")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tree-shape", default="auto")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--prepack", action="store_true", help="pack the target's and the draft's linear weights")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/masked_gqa")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = os.environ.get(VARIABLE)
    target, tokenizer, beagle = load_models(args.target, args.beagle, DTYPES[args.dtype], args.prepack)
    if target.config._attn_implementation != "sdpa":
        raise SystemExit(f"the target runs {target.config._attn_implementation!r} attention; this measures sdpa's.")
    shape = parse_tree_shape(args.tree_shape)
    _, inputs = first_turns(tokenizer, "mt-bench", args.num_prompts)
    extra = dict(custom_generate=beagle_generate, beagle=beagle, tree_shape=shape,
                 prompt_lookup_num_tokens=args.prompt_lookup_tokens)
    results = {}
    try:
        for temperature in (float(t) for t in args.temperatures.split(",")):
            kwargs = generation_kwargs(target, args.max_new_tokens, temperature > 0, temperature)
            target.generate(inputs[0], **{**kwargs, "max_new_tokens": 16}, **extra)  # warm-up (auto tree's curve)
            totals = {mode: {"time_s": 0.0, "new_tokens": 0, "rounds": 0} for mode in ("off", "on")}
            identical = 0
            for i, input_ids in enumerate(inputs):
                outputs = {}
                for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):  # alternate who goes first
                    os.environ[VARIABLE] = "1" if mode == "on" else "0"
                    torch.manual_seed(args.seed + i)
                    start = time.perf_counter()
                    outputs[mode] = target.generate(input_ids, **kwargs, **extra)
                    totals[mode]["time_s"] += time.perf_counter() - start
                    totals[mode]["new_tokens"] += outputs[mode].shape[1] - input_ids.shape[1]
                    totals[mode]["rounds"] += beagle.generation_stats.rounds
                identical += bool(torch.equal(outputs["on"], outputs["off"]))
            for row in totals.values():
                row["ms_per_round"] = row["time_s"] / row["rounds"] * 1e3
                row["tokens_per_s"] = row["new_tokens"] / row["time_s"]
            ratio = totals["on"]["tokens_per_s"] / totals["off"]["tokens_per_s"]
            results[str(temperature)] = {**totals, "identical": identical, "prompts": len(inputs),
                                         "speedup_on_over_off": ratio}
    finally:
        if before is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = before
    report = {"machine": machine_info(target.device),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    write_report(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Beagle's loop with and without {VARIABLE}=1 (masked grouped-query sdpa)", "",
             f"Machine: {', '.join(f'{k}: {v}' for k, v in report['machine'].items())}.", "",
             f"Settings: target {s['target']} ({s['dtype']}{', prepacked' if s['prepack'] else ''}), draft "
             f"{s['beagle']}, tree {s['tree_shape']} plus a {s['prompt_lookup_tokens']}-token lookup branch, "
             f"{s['num_prompts']} MT-bench first turns × {s['max_new_tokens']} new tokens, the two settings "
             f"alternating per prompt in one process, torch seeded with seed + prompt index before each run. "
             "Totals over prompts, prefill included.", "",
             "| T | ms per round, off | on | tokens/s, off | on | on / off | identical outputs |",
             "|---|---|---|---|---|---|---|"]
    for temperature, r in report["results"].items():
        off, on = r["off"], r["on"]
        lines.append(f"| {float(temperature):g} | {off['ms_per_round']:.1f} | {on['ms_per_round']:.1f} | "
                     f"{off['tokens_per_s']:.1f} | {on['tokens_per_s']:.1f} | {r['speedup_on_over_off']:.3f} | "
                     f"{r['identical']}/{r['prompts']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
