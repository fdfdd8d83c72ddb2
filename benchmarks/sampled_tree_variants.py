"""Sampled draft trees at T > 0: two ways to spend the tree differently, against the shipped rule, in one run.

At T = 1 Beagle's own loop draws each node's children from the draft (`draft_sampled_tree`) and ranks them by their
cumulative draft probability, which is right for top-k children (taken with probability p ≈ q) but not for drawn
ones: a child drawn first is taken by recursive rejection sampling 26% of the time even when q < 0.02
(`benchmarks/sampled_acceptance.py`). This script compares, on the real target with methods interleaved per prompt:

- `q`: the shipped rule (`decoding_beagle.sampled_child_scores`: a child's value is its draft probability);
- `rank-calibrated`: a child's value is the probability that the rule picks it, read off a committed
  `sampled_acceptance` table by its rank and q (piecewise linear between the bins' mean q, made non-decreasing in
  q), so the expansion and the kept sibling groups follow the estimated acceptance of each path;
- `draft-T`: the children drawn at another temperature than the target's (still lossless: the rule reads the same
  distribution the children were drawn from);

and plain `generate`. It reports τ, verified nodes per round, tokens/s and the speedup over plain (ratio of totals
and median over prompts). Both variants stay lossless; only the tree changes.

    python benchmarks/sampled_tree_variants.py --beagle checkpoints/beagle-smollm2-135m-instruct --threads 2 \
        --out benchmarks/results/sampled_tree_variants

writes `<out>.json` and `<out>.md`.
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

import modeling_beagle.decoding_beagle as decoding  # noqa: E402
from benchmarks.round_budget import first_turns, load_models, write_report  # noqa: E402
from modeling_beagle import beagle_generate  # noqa: E402
from trainer.bench import machine_info, parse_tree_shape  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402

# (name, tree shape, child values, draft temperature): the shipped rule first
VARIANTS = (
    ("q", "6,3,16,0.1", "q", 1.0),
    ("rank-calibrated", "6,3,16,0.1", "calibrated", 1.0),
    ("rank-calibrated", "6,2,12,0.1", "calibrated", 1.0),
    ("rank-calibrated", "6,2,8,0.15", "calibrated", 1.0),
    ("draft-T 0.8", "6,3,16,0.1", "q", 0.8),
    ("draft-T 1.25", "6,3,16,0.1", "q", 1.25),
)


def pick_curves(table: list[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: (q knots, pick probability at them) from a `sampled_acceptance` table, extended flat to q = 0 and
    q = 1 and made non-decreasing in q (a cumulative maximum)."""
    curves = {}
    for rank in sorted({row["rank"] for row in table}):
        rows = sorted((row["mean_q"], row["mean_pick"]) for row in table if row["rank"] == rank)
        qs = [0.0] + [q for q, _ in rows] + [1.0]
        picks = [rows[0][1]] + [pick for _, pick in rows] + [rows[-1][1]]
        curves[rank] = (torch.tensor(qs), torch.tensor(picks).cummax(0).values)
    return curves


def calibrated_scores(curves):
    """A replacement for `decoding.sampled_child_scores`: log of the interpolated pick probability by rank and q."""
    last = max(curves)

    def scores(log_q: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        q = log_q.gather(-1, drawn).exp().float()
        values = torch.empty_like(q)
        for rank in range(q.shape[-1]):
            knots, picks = curves[min(rank, last)]
            x = q[..., rank].clamp(0, 1).contiguous()
            right = torch.searchsorted(knots, x, right=True).clamp(1, len(knots) - 1)
            x0, x1, y0, y1 = knots[right - 1], knots[right], picks[right - 1], picks[right]
            values[..., rank] = y0 + (y1 - y0) * (x - x0) / (x1 - x0).clamp(min=1e-9)
        return values.clamp(min=1e-6).log()

    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", required=True, help="Beagle checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--calibration", default="benchmarks/results/sampled_acceptance.json",
                        help="a benchmarks/sampled_acceptance.py report (pick probability by rank and q)")
    parser.add_argument("--prompt-set", default="mt-bench")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-prepack", dest="prepack", action="store_false")
    parser.add_argument("--out", default="benchmarks/results/sampled_tree_variants")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    calibration = json.loads(Path(args.calibration).read_text())
    scores = {"q": decoding.sampled_child_scores, "calibrated": calibrated_scores(pick_curves(calibration["table"]))}
    target, tokenizer, beagle = load_models(args.target, args.beagle, DTYPES[args.dtype], args.prepack)
    _, inputs = first_turns(tokenizer, args.prompt_set, args.num_prompts)
    methods = ["plain"] + [f"{name} [{shape}]" for name, shape, _, _ in VARIANTS]
    settings = {"plain": None, **{f"{name} [{shape}]": (parse_tree_shape(shape), scores[value], temperature)
                                  for name, shape, value, temperature in VARIANTS}}
    rows = {m: {"tokens": [], "steps": [], "nodes": [], "seconds": []} for m in methods}
    draw_tree, score_children = decoding.draft_sampled_tree, decoding.sampled_child_scores
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature, top_k=0,
                  top_p=1.0)
    try:
        for i, ids in enumerate(inputs):
            for m in methods[i % len(methods):] + methods[: i % len(methods)]:  # rotate the order per prompt
                torch.manual_seed(args.seed + i)
                nodes = []
                start = time.perf_counter()
                if settings[m] is None:
                    out = target.generate(ids, **kwargs)
                    steps = out.shape[1] - ids.shape[1]
                else:
                    shape, decoding.sampled_child_scores, draft_temperature = settings[m]

                    def counted(beagle_, cache, roots, positions, shape_, temperature, _t=draft_temperature):
                        tree = draw_tree(beagle_, cache, roots, positions, shape_, _t)
                        nodes.append(tree[0].shape[1])
                        return tree

                    decoding.draft_sampled_tree = counted  # the loop looks it up by name every round
                    out = target.generate(ids, custom_generate=beagle_generate, beagle=beagle, tree_shape=shape,
                                          prompt_lookup_num_tokens=0, **kwargs)
                    steps = len(beagle.generation_stats.accepted) + 1
                    decoding.draft_sampled_tree, decoding.sampled_child_scores = draw_tree, score_children
                row = rows[m]
                row["seconds"].append(time.perf_counter() - start)
                row["tokens"].append(out.shape[1] - ids.shape[1])
                row["steps"].append(steps)
                row["nodes"].append(sum(nodes))
            print(f"prompt {i + 1}/{len(inputs)} done", flush=True)
    finally:
        decoding.draft_sampled_tree, decoding.sampled_child_scores = draw_tree, score_children

    plain = rows["plain"]
    plain_rate = sum(plain["tokens"]) / sum(plain["seconds"])
    summary = {}
    for m, row in rows.items():
        rounds = sum(row["steps"]) - len(inputs)  # the first token of each prompt comes from the prefill
        summary[m] = {
            "tau": (sum(row["tokens"]) - len(inputs)) / rounds,
            "nodes_per_round": sum(row["nodes"]) / rounds,
            "tokens_per_s": sum(row["tokens"]) / sum(row["seconds"]),
            "speedup_total": sum(row["tokens"]) / sum(row["seconds"]) / plain_rate,
            "speedup_median": statistics.median(
                (t / s) / (pt / ps) for t, s, pt, ps in zip(row["tokens"], row["seconds"], plain["tokens"],
                                                             plain["seconds"])),
        }
    report = {"machine": machine_info(torch.device("cpu")), "settings": vars(args),
              "variants": [dict(zip(("name", "tree_shape", "values", "draft_temperature"), v)) for v in VARIANTS],
              "per_prompt": rows, "summary": summary}
    lines = [f"# Sampled draft trees: child values and draft temperature (T = {args.temperature:g}, {args.dtype})", "",
             "Machine: " + ", ".join(f"{k}: {v}" for k, v in report["machine"].items()) + ".", "",
             f"{len(inputs)} {args.prompt_set} first turns × {args.max_new_tokens} new tokens, draft `{args.beagle}`, "
             f"{'prepacked, ' if args.prepack else ''}methods interleaved (rotating order), torch seeded with "
             f"{args.seed} + prompt index before every run; calibration `{args.calibration}`. τ and nodes per round "
             "after the first token; speedup over plain `generate` in this run (ratio of totals / median over "
             "prompts).", "",
             "| method | τ | verified nodes per round | tokens/s | speedup (total / median) |",
             "|---|---|---|---|---|"]
    lines += [f"| {m} | {s['tau']:.3f} | {s['nodes_per_round']:.1f} | {s['tokens_per_s']:.1f} | "
              f"{s['speedup_total']:.3f} / {s['speedup_median']:.3f} |" for m, s in summary.items()]
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
