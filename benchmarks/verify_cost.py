"""Target forward time by number of new tokens, with the target's linear layers prepacked and unpacked.

The cost of verifying k draft tokens against one ordinary decode step decides what τ a speculative method needs to
break even. This measures that curve for the real target on this machine, once through PyTorch's default linear
(`F.linear`) and once through oneDNN-packed weights (`modeling_beagle.prepack_linear_weights`), interleaved
(unpacked, packed, unpacked, packed, ...) on one packed model switched with `packed_path`, medians taken.

    python benchmarks/verify_cost.py --threads 2 --out benchmarks/results/verify_cost
    python benchmarks/verify_cost.py --threads 2 --dtype bfloat16 --prefix 300 --counts 1,8,16,20,24,28,32 \
        --rounds 4 --out benchmarks/results/verify_cost_amx_bf16        # the AMX Xeon's bf16 curve (session 26)

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

from modeling_beagle import measure_verification_cost, packed_path, prepack_linear_weights  # noqa: E402
from trainer.assets import load_target  # noqa: E402
from trainer.bench import machine_info  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--prefix", type=int, default=256, help="tokens already in the cache")
    parser.add_argument("--counts", default="1,2,4,8,16", help="new tokens per forward")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each: 3 timed forwards per count)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the target's dtype")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/verify_cost")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = tuple(int(c) for c in args.counts.split(","))
    target, _ = load_target(args.target, dtype=DTYPES[args.dtype])
    prepack_linear_weights(target)
    times = {"unpacked": {n: [] for n in counts}, "packed": {n: [] for n in counts}}
    for _ in range(args.rounds):
        for variant in ("unpacked", "packed"):
            with packed_path(target, enabled=variant == "packed"):
                for n, seconds in measure_verification_cost(target, counts, prefix=args.prefix).items():
                    times[variant][n].append(seconds * 1e3)
    medians = {v: {n: statistics.median(ts) for n, ts in per.items()} for v, per in times.items()}
    report = {"machine": machine_info(torch.device("cpu")),
              "settings": {"target": args.target, "dtype": args.dtype, "prefix": args.prefix, "rounds": args.rounds},
              "median_ms": medians, "all_ms": times}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    rows = ["| new tokens | " + " | ".join(str(n) for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for variant in ("unpacked", "packed"):
        rows.append(f"| {variant} ms | " + " | ".join(f"{medians[variant][n]:.1f}" for n in counts) + " |")
        rows.append(f"| {variant} × 1 token | " + " | ".join(f"{medians[variant][n] / medians[variant][1]:.2f}"
                                                        for n in counts) + " |")
    machine = report["machine"]
    text = (f"# Target forward time by new tokens, unpacked vs prepacked\n\n{args.target}, {args.dtype}, {args.prefix}-token "
            f"cache, {machine.get('cpu')} ({machine.get('torch_threads')} threads, {machine.get('allocator')}), "
            f"medians of {args.rounds} interleaved rounds.\n\n" + "\n".join(rows) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
