"""How often the target takes a sampled draft child at T > 0, by the child's place in its sampling order and its
draft probability q: the measurement behind choosing which nodes of a sampled tree to expand and keep.

Beagle's own loop (`sampled_drafts=True`) draws each node's children from the draft without replacement and tries
them in that order with recursive rejection sampling. Given the target's distribution p and the draft's q at a
visited node, the probability that the rule picks the i-th child is exact: min(1, p'/q') for it under the residuals
left by the earlier children, times the chance that all earlier ones were rejected. This script records that exact
probability for every child tried (no sampling noise beyond which nodes are visited) and tabulates its mean by rank
and q bin. The tree currently values a node by its cumulative draft probability (the product of q along its path),
which is right for fixed top-k children (taken with probability p ≈ q) but not for sampled ones if the table is flat
in q. τ does not depend on the machine's speed, so this needs no quiet machine.

    python benchmarks/sampled_acceptance.py --beagle checkpoints/beagle-smollm2-135m-instruct \
        --out benchmarks/results/sampled_acceptance

writes `<out>.json` and `<out>.md`.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import modeling_beagle.decoding_beagle as decoding  # noqa: E402
from benchmarks.round_budget import load_models, write_report  # noqa: E402
from modeling_beagle import beagle_generate  # noqa: E402
from trainer.assets import load_prompts  # noqa: E402
from trainer.bench import first_turn_ids, machine_info, parse_tree_shape, tree_shape_label  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402

Q_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0 + 1e-9)


def pick_probabilities(p: torch.Tensor, q: torch.Tensor, candidates: list[int]) -> list[float]:
    """Exact probability that recursive rejection sampling (`decoding.recursive_rejection_sample`, same updates)
    returns each candidate, in order."""
    p, q = p.double(), q.double()
    reach, picks = 1.0, []
    for c in candidates:
        accept = min(1.0, float(p[c]) / float(q[c])) if float(q[c]) > 0 else 0.0
        picks.append(reach * accept)
        reach *= 1.0 - accept
        residual = (p - q).clamp(min=0)
        total = residual.sum()
        if total > 0:
            p = residual / total
        q = q.clone()
        q[c] = 0
        left = q.sum()
        if left <= 0:
            break
        q = q / left
    return picks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", required=True, help="Beagle checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tree-shape", default="6,3,16,0.1", help="D,K,N[,P] (the auto tree of the bench runs)")
    parser.add_argument("--prompts", default="4,12,20,28,36,44,52,60",
                        help="MT-bench question indices (first turns; the bench's spread of 5 is 0,16,32,48,64)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/sampled_acceptance")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = parse_tree_shape(args.tree_shape)
    target, tokenizer, beagle = load_models(args.target, args.beagle, DTYPES[args.dtype], prepack=True)
    questions = load_prompts("mt-bench")
    indices = [int(i) for i in args.prompts.split(",")]

    tried = []  # (rank, q(c), exact pick probability)
    rule = decoding.recursive_rejection_sample

    def recording_rule(p, q, candidates):
        for rank, (c, pick) in enumerate(zip(candidates, pick_probabilities(p, q, candidates))):
            tried.append((rank, float(q[c]), pick))
        return rule(p, q, candidates)

    decoding.recursive_rejection_sample = recording_rule  # the loop looks the rule up by name at every node
    taus = []
    try:
        for n, index in enumerate(indices):
            torch.manual_seed(n)
            ids = torch.tensor([first_turn_ids(tokenizer, questions[index]["turns"][0])])
            target.generate(ids, custom_generate=beagle_generate,
                            beagle=beagle, tree_shape=shape, do_sample=True, temperature=args.temperature, top_k=0,
                            top_p=1.0, max_new_tokens=args.max_new_tokens, prompt_lookup_num_tokens=0)
            taus.append(beagle.generation_stats.tau)
            print(f"mt-bench[{index}]: tau {taus[-1]:.3f}, {len(tried)} children tried so far", flush=True)
    finally:
        decoding.recursive_rejection_sample = rule

    ranks = sorted({r for r, _, _ in tried})
    table = []
    for rank in ranks:
        for lo, hi in zip(Q_BINS, Q_BINS[1:]):
            rows = [(q, pick) for r, q, pick in tried if r == rank and lo <= q < hi]
            if rows:
                table.append({"rank": rank, "q_low": lo, "q_high": min(hi, 1.0), "children": len(rows),
                              "mean_q": statistics.mean(q for q, _ in rows),
                              "mean_pick": statistics.mean(pick for _, pick in rows)})
    report = {"machine": machine_info(torch.device("cpu")),
              "settings": {**vars(args), "tree_shape_resolved": tree_shape_label(shape)},
              "tau_per_prompt": taus, "table": table}
    lines = [f"# Sampled draft children: how often the target takes them (T = {args.temperature:g}, {args.dtype})", "",
             f"{len(indices)} MT-bench first turns (indices {args.prompts}) × {args.max_new_tokens} new tokens, tree "
             f"{tree_shape_label(shape)}, draft `{args.beagle}`; mean τ {statistics.mean(taus):.3f}. For every "
             "sampled child tried at a visited node: its rank in the sampling order, its draft probability q, and "
             "the exact probability that recursive rejection sampling picks it there.", "",
             "| rank | q bin | children | mean q | mean pick probability |", "|---|---|---|---|---|"]
    lines += [f"| {row['rank']} | [{row['q_low']:g}, {row['q_high']:g}) | {row['children']} | {row['mean_q']:.3f} | "
              f"{row['mean_pick']:.3f} |" for row in table]
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
