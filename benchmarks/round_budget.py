"""Where a speculative round's time goes on the real target, and the τ each speedup target needs.

`beagle bench` gives τ and speedup; this splits the time behind them. For plain `generate` and for Beagle's own
loop (draft tree, with and without the prompt-lookup branch) it times, per prompt and with the methods interleaved:
the target's forwards (the prefill excluded: every rate here is after the first token), Beagle's drafting (the
loop's own `draft_time_s`), and the rest of the loop (acceptance walk, sampling, cache bookkeeping, Beagle reading
the accepted states). From the totals over prompts it reports, per temperature:

- plain: ms per decode step (target forward, rest);
- each Beagle method: τ, ms per round (verify forward, draft, rest), the speedup these imply
  (τ × plain step / round), the τ that 1.5× and 2× would need at this round cost, and the speedup if drafting and
  the loop's rest were free (τ × plain step / verify forward): what acceptance alone allows.

    python benchmarks/round_budget.py --beagle checkpoints/beagle-smollm2-135m-instruct --prepack --threads 2 \
        --out benchmarks/results/round_budget

writes `<out>.json` and `<out>.md`. With a bf16 target, greedy outputs may leave plain greedy at near-ties (see
`beagle bench`, which checks them); this script does not judge losslessness, it only times.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import BeagleModel, beagle_generate, prepack_linear_weights  # noqa: E402
from modeling_beagle.decoding_beagle import resolve_tree_shape  # noqa: E402
from trainer.assets import load_prompts, load_target  # noqa: E402
from trainer.bench import first_turn_ids, generation_kwargs, machine_info, parse_tree_shape, spread  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402


class ForwardTimer:
    """Times every call of `model.forward` (an instance attribute shadowing the class's, removed by `close`)."""

    def __init__(self, model):
        self.model, self.times = model, []
        inner = model.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.times.append(time.perf_counter() - start)
            return out

        model.forward = timed

    def close(self):
        del self.model.forward


def load_models(target_name: str, beagle_dir: str, dtype: torch.dtype, prepack: bool):
    """(target, tokenizer, Beagle) in `dtype`, in eval mode, bound; with `prepack`, both models' linear weights packed
    (the target's first, so that binding packs the draft's reduced head too)."""
    target, tokenizer = load_target(target_name, dtype)
    beagle = BeagleModel.from_pretrained(beagle_dir, dtype=dtype).eval()
    if prepack:
        prepack_linear_weights(target)
        prepack_linear_weights(beagle)
    beagle.bind_target(target)
    return target, tokenizer, beagle


def first_turns(tokenizer, prompt_set: str, num_prompts: int) -> tuple[list[dict], list[torch.Tensor]]:
    """`num_prompts` prompts spread over `prompt_set`, and their first turns as chat-templated `(1, n)` input ids."""
    prompts = spread(load_prompts(prompt_set), num_prompts)
    return prompts, [torch.tensor([first_turn_ids(tokenizer, p["turns"][0])]) for p in prompts]


def write_report(out: str, report: dict, table: str) -> None:
    """`<out>.json` (the report) and `<out>.md` (its table), and the table on stdout. The suffixes are appended, not
    swapped in, so an `out` with a dot in its name (`shape-2-8-16-0.1`) keeps it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".json").write_text(json.dumps(report, indent=2))
    path.with_name(path.name + ".md").write_text(table)
    print(table)


def run_once(target, beagle, input_ids, kwargs, method: dict, timer: ForwardTimer, seed: int) -> dict:
    timer.times.clear()
    torch.manual_seed(seed)
    extra = {} if method["name"] == "plain" else dict(custom_generate=beagle_generate, beagle=beagle,
                                                      tree_shape=method["shape"], **method["lookup"])
    start = time.perf_counter()
    out = target.generate(input_ids, **kwargs, **extra)
    wall = time.perf_counter() - start
    forwards = len(timer.times)
    if forwards < 2:
        raise RuntimeError(f"{method['name']}: expected at least two target forwards (prefill and one step), found "
                           f"{forwards}; raise --max-new-tokens.")
    prefill = timer.times[0]
    return {"new_tokens": out.shape[1] - input_ids.shape[1], "steps": forwards - 1, "wall_s": wall - prefill,
            "forward_s": sum(timer.times[1:]),
            "draft_s": 0.0 if method["name"] == "plain" else beagle.generation_stats.draft_time_s}


def summarise(runs: list[dict], plain_step: float | None) -> dict:
    steps = sum(r["steps"] for r in runs)
    total = {key: sum(r[key] for r in runs) for key in ("wall_s", "forward_s", "draft_s")}
    row = {"steps": steps, "tau": (sum(r["new_tokens"] for r in runs) - len(runs)) / steps,
           "ms_per_step": total["wall_s"] / steps * 1e3, "forward_ms": total["forward_s"] / steps * 1e3,
           "draft_ms": total["draft_s"] / steps * 1e3}
    row["rest_ms"] = row["ms_per_step"] - row["forward_ms"] - row["draft_ms"]
    if plain_step is not None:
        row["speedup"] = row["tau"] * plain_step / row["ms_per_step"]
        row["tau_for_1.5x"] = 1.5 * row["ms_per_step"] / plain_step
        row["tau_for_2x"] = 2.0 * row["ms_per_step"] / plain_step
        row["speedup_if_draft_and_rest_free"] = row["tau"] * plain_step / row["forward_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", required=True, help="Beagle checkpoint folder")
    parser.add_argument("--prompt-set", default="mt-bench", choices=("mt-bench", "humaneval"))
    parser.add_argument("--num-prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tree-shape", default="auto", help="auto, chain, or D,K,N[,P] (as beagle bench)")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--prepack", action="store_true", help="pack the target's and the draft's linear weights")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/round_budget")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer, beagle = load_models(args.target, args.beagle, DTYPES[args.dtype], args.prepack)
    shape = parse_tree_shape(args.tree_shape)
    methods = [{"name": "plain"},
               {"name": "beagle-tree", "shape": shape, "lookup": {"prompt_lookup_num_tokens": 0}},
               {"name": "beagle-tree-lookup", "shape": shape,
                "lookup": {"prompt_lookup_num_tokens": args.prompt_lookup_tokens}}]
    prompts, inputs = first_turns(tokenizer, args.prompt_set, args.num_prompts)
    timer = ForwardTimer(target)
    results = {}
    try:
        for temperature in (float(t) for t in args.temperatures.split(",")):
            kwargs = generation_kwargs(target, args.max_new_tokens, temperature > 0, temperature)
            for method in methods:  # warm-up (the auto tree measures its cost curve here)
                run_once(target, beagle, inputs[0][:, :16], {**kwargs, "max_new_tokens": 8}, method, timer, 0)
            runs = {m["name"]: [] for m in methods}
            for i, input_ids in enumerate(inputs):
                order = methods[i % len(methods):] + methods[: i % len(methods)]  # rotate who goes first
                for method in order:
                    runs[method["name"]].append(run_once(target, beagle, input_ids, kwargs, method, timer,
                                                         args.seed + i))
            plain = summarise(runs["plain"], None)
            results[str(temperature)] = {"plain": plain, **{m["name"]: summarise(runs[m["name"]], plain["ms_per_step"])
                                                            for m in methods[1:]}}
    finally:
        timer.close()
    resolved = str(resolve_tree_shape(target, beagle, shape))  # auto: measured in the warm-up, cached
    report = {"machine": machine_info(target.device),
              "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "tree_shape_resolved": resolved,
                           "prompts": [p["id"] for p in prompts]},
              "results": results}
    write_report(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Round budget: where a round's time goes, and the τ each speedup needs", "",
             f"Machine: {', '.join(f'{k}: {v}' for k, v in report['machine'].items())}.", "",
             f"Settings: target {s['target']} ({s['dtype']}{', prepacked' if s['prepack'] else ''}), draft "
             f"{s['beagle']}, {s['num_prompts']} {s['prompt_set']} first turns × {s['max_new_tokens']} new tokens, "
             f"tree {s['tree_shape_resolved']}, lookup branch {s['prompt_lookup_tokens']} tokens, methods interleaved "
             "per prompt. Totals over prompts, prefill excluded: a step is one target forward after the first token "
             "(plain: one token; Beagle: one round). τ = tokens per step after the first token. Speedup = τ × plain "
             "step / round (this run's plain); 'if free' = τ × plain step / verify forward alone.", "",
             "| T | method | τ | ms per step | forward ms | draft ms | rest ms | speedup | τ for 1.5× | τ for 2× "
             "| speedup if draft and rest free |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for temperature, rows in report["results"].items():
        for name, r in rows.items():
            extra = (f"{r['speedup']:.2f} | {r['tau_for_1.5x']:.2f} | {r['tau_for_2x']:.2f} | "
                     f"{r['speedup_if_draft_and_rest_free']:.2f}") if "speedup" in r else "1.00 | – | – | –"
            lines.append(f"| {float(temperature):g} | {name} | {r['tau']:.2f} | {r['ms_per_step']:.1f} | "
                         f"{r['forward_ms']:.1f} | {r['draft_ms']:.1f} | {r['rest_ms']:.1f} | {extra} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
