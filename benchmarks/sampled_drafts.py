"""τ of Beagle's own loop when sampling: children drawn from the draft (`sampled_drafts=True`, the default) against
the draft's fixed top-k children (`sampled_drafts=False`), on the same prompts, seeds and tree shapes.

Both keep exactly the target's distribution; what differs is how often a drafted child is accepted (min(1, p/q) for
a drawn child, p for a fixed one). τ does not depend on the machine's speed, so this needs no quiet machine.

    python benchmarks/sampled_drafts.py --beagle checkpoints/beagle-smollm2-135m-instruct \
        --out benchmarks/results/sampled_drafts

writes `<out>.json` and `<out>.md`.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import BeagleModel, beagle_generate  # noqa: E402
from trainer.assets import load_prompts, load_target  # noqa: E402
from trainer.bench import DTYPES, first_turn_ids, machine_info, parse_tree_shape, spread, tree_shape_label  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", required=True, help="Beagle checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tree-shape", action="append", default=None, help="D,K,N[,P] (repeatable; default 5,2,8,0.1 "
                        "and 6,3,16,0.1)")
    parser.add_argument("--num-prompts", type=int, default=4, help="MT-bench first turns, spread over the set")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/sampled_drafts")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [parse_tree_shape(s) for s in (args.tree_shape or ["5,2,8,0.1", "6,3,16,0.1"])]
    dtype = DTYPES[args.dtype]
    target, tokenizer = load_target(args.target, dtype)
    beagle = BeagleModel.from_pretrained(args.beagle, dtype=dtype).eval()
    beagle.bind_target(target)
    questions = spread(load_prompts("mt-bench"), args.num_prompts)
    prompts = [torch.tensor([first_turn_ids(tokenizer, q["turns"][0])]) for q in questions]
    rows = []
    for shape in shapes:
        for sampled in (False, True):
            taus = []
            for i, ids in enumerate(prompts):
                for seed in range(args.seeds):
                    torch.manual_seed(1000 * seed + i)
                    target.generate(ids, custom_generate=beagle_generate, beagle=beagle, tree_shape=shape,
                                    do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                    max_new_tokens=args.max_new_tokens, sampled_drafts=sampled,
                                    prompt_lookup_num_tokens=0)
                    taus.append(beagle.generation_stats.tau)
            rows.append({"tree_shape": tree_shape_label(shape), "sampled_drafts": sampled,
                         "tau_mean": statistics.mean(taus), "tau_per_run": taus})
            print(f"{rows[-1]['tree_shape']} {'sampled' if sampled else 'top-k'}: tau {rows[-1]['tau_mean']:.3f}",
                  flush=True)
    report = {"machine": machine_info(torch.device("cpu")), "settings": {k: v for k, v in vars(args).items()},
              "prompts": [q.get("question_id", q.get("id")) for q in questions], "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Sampled against fixed draft children (T = {args.temperature:g}, {args.dtype} target)", "",
             f"{len(prompts)} MT-bench first turns × {args.seeds} seeds × {args.max_new_tokens} new tokens, draft "
             f"`{args.beagle}`; τ = tokens per target forward (bonus included), mean over runs.", "",
             "| tree shape (depth, top-k, nodes, min_prob) | top-k children τ | sampled children τ |", "|---|---|---|"]
    for shape in shapes:
        label = tree_shape_label(shape)
        by = {r["sampled_drafts"]: r["tau_mean"] for r in rows if r["tree_shape"] == label}
        lines.append(f"| {label} | {by[False]:.3f} | {by[True]:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
