"""How repeatable `tree_shape="auto"` is on this machine: the tree it picks over many measurements of the
verification-cost curve, with each count's time taken as the median or the minimum of its samples.

On a shared machine a slow spell only ever adds time, so the minimum of a count's samples estimates its cost with
less spread than the median; this measures whether that makes the auto tree repeatable. Each measurement is what
`auto_tree_shape` runs (`verification_cost_samples` with 3 interleaved rounds); pairs of consecutive measurements
also give the 6-round statistic.

    LD_PRELOAD=libjemalloc.so.2 python benchmarks/auto_tree_stability.py --threads 2 --measurements 12 \
        --out benchmarks/results/auto_tree_stability_epyc

writes `<out>.json` and `<out>.md`.
"""

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import prepack_linear_weights, tree_shape_for_costs, verification_cost_samples  # noqa: E402
from modeling_beagle.decoding_beagle import COST_STATISTICS, VERIFY_COST_COUNTS  # noqa: E402
from trainer.assets import load_target  # noqa: E402
from trainer.bench import machine_info  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402


def shape_text(shape) -> str:
    return f"{shape.depth},{shape.top_k},{shape.total_tokens}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="the target's dtype")
    parser.add_argument("--no-prepack", action="store_true", help="time F.linear instead of packed weights")
    parser.add_argument("--measurements", type=int, default=12, help="auto measurements (3 rounds each)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/auto_tree_stability")
    args = parser.parse_args(argv)
    if args.measurements < 2:
        parser.error(f"--measurements expected at least 2 (pairs give the 6-round statistic), found {args.measurements}")
    if args.threads:
        torch.set_num_threads(args.threads)
    target, _ = load_target(args.target, dtype=DTYPES[args.dtype])
    if not args.no_prepack:
        prepack_linear_weights(target)

    samples, seconds = [], []
    for _ in range(args.measurements):
        started = time.perf_counter()
        samples.append(verification_cost_samples(target, VERIFY_COST_COUNTS, rounds=3))
        seconds.append(time.perf_counter() - started)
        print(f"measurement {len(samples)}: {seconds[-1]:.1f} s", flush=True)

    def pooled(group):
        return {n: [t for s in group for t in s[n]] for n in VERIFY_COST_COUNTS}

    groups = {"3 rounds": [[s] for s in samples],
              "6 rounds": [samples[i : i + 2] for i in range(0, len(samples) - 1, 2)]}
    report = {"machine": machine_info(torch.device("cpu")),
              "settings": {"target": args.target, "dtype": args.dtype, "prepack": not args.no_prepack,
                           "measurements": args.measurements, "counts": list(VERIFY_COST_COUNTS)},
              "seconds_per_measurement": seconds, "samples_ms": [{n: [t * 1e3 for t in s[n]] for n in s} for s in samples],
              "results": {}}
    rows = []
    for rounds, group_list in groups.items():
        for name, statistic in COST_STATISTICS.items():
            curves = [{n: statistic(ts) for n, ts in pooled(g).items()} for g in group_list]
            shapes = [shape_text(tree_shape_for_costs(c)) for c in curves]
            ratios = {n: [c[n] / c[1] for c in curves] for n in VERIFY_COST_COUNTS}
            one_token = [c[1] * 1e3 for c in curves]
            spread = {n: statistics.pstdev(r) for n, r in ratios.items()}
            tally = collections.Counter(shapes)
            report["results"][f"{rounds}, {name}"] = {"shapes": shapes, "one_token_ms": one_token,
                                                    "ratio_to_one_token": ratios, "ratio_spread": spread}
            rows.append(f"| {rounds} | {name} | {len(shapes)} | "
                        + ", ".join(f"{s} ×{k}" for s, k in tally.most_common()) + f" | {len(tally)} | "
                        + f"{statistics.median(one_token):.1f} ({min(one_token):.1f}-{max(one_token):.1f}) | "
                        + " / ".join(f"{statistics.median(ratios[n]):.2f}±{spread[n]:.2f}" for n in (8, 12, 16, 20, 24))
                        + " |")
    machine = report["machine"]
    text = (f"# How repeatable the auto tree is\n\n{args.target}, {args.dtype}, "
            f"{'prepacked' if not args.no_prepack else 'unpacked'}, {machine.get('cpu')} "
            f"({machine.get('torch_threads')} threads, {machine.get('allocator')}); {args.measurements} measurements "
            f"of the curve as `auto_tree_shape` takes it (3 interleaved rounds of 3 forwards per count, "
            f"{statistics.median(seconds):.1f} s each by median), the tree `tree_shape_for_costs` picks from each, "
            "with every count's time the median or the minimum of its samples; \"6 rounds\" pools consecutive "
            "pairs of measurements.\n\n"
            "| rounds | statistic | curves | trees picked | distinct | one-token ms, median (range) | "
            "× one token at 8 / 12 / 16 / 20 / 24 (median ± sd) |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
