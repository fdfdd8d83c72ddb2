"""Per-prompt paired comparison of `beagle bench` methods against one of them, from a run's `bench.json`.

A bench run's table compares every method with plain decoding. Two speculative methods are compared more finely
prompt by prompt, since each prompt's text (and length) is shared where the outputs are identical (fp32; in bf16
near-tie flips may change a text per method). For each method against `--base`, per prompt set and temperature:
the median and mean of the per-prompt tokens/s ratios (method / base) and on how many prompts the method was faster,
the ratio of total tokens/s (all new tokens over all time; the ratio of total times where the texts are the same), and
the mean paired τ difference with its standard error. `--exclude` leaves prompts out (`mt-bench/145`: a prompt id,
every turn of it). Several runs (e.g. sampled runs with different seeds) are pooled: each run's prompts are pairs of
their own.

    python benchmarks/paired.py benchmarks/results/bench-amx-v15-copy-modes-20-float32 --base tree-lookup-nocopy

prints a Markdown table (and writes it to `--out`, if given).
"""

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def paired_rows(runs: list[dict], base: str, exclude: tuple[str, ...] = ()) -> list[dict]:
    """One row per (prompt set, temperature, dtype, method other than `base` and plain), over the prompts that both
    the method and `base` ran (repeats: each prompt's first), less the prompt ids in `exclude`. A run's `source` (the
    bench it came from, when several are pooled) keeps the same prompt of different benches apart."""
    by_prompt = defaultdict(dict)
    for run in runs:
        if run["prompt_id"] in exclude:
            continue
        key = (run["prompt_set"], run["temperature"], run["dtype"], run.get("source", 0), run["prompt_id"],
               run.get("turn", 1))
        by_prompt[key].setdefault(run["method"], run)
    groups = defaultdict(lambda: defaultdict(list))
    for (prompt_set, temperature, dtype, *_), methods in by_prompt.items():
        if base not in methods:
            continue
        for method, run in methods.items():
            if method != base and not method.startswith("plain"):
                groups[(prompt_set, temperature, dtype)][method].append((run, methods[base]))
    if not groups:
        raise SystemExit(f"no prompt was run by both `{base}` and another method: check --base.")
    rows = []
    for (prompt_set, temperature, dtype), methods in sorted(groups.items()):
        for method, pairs in sorted(methods.items()):
            ratios = [(a["new_tokens"] / a["time_s"]) / (b["new_tokens"] / b["time_s"]) for a, b in pairs]
            tau_diffs = [a["tau"] - b["tau"] for a, b in pairs]
            error = statistics.stdev(tau_diffs) / math.sqrt(len(pairs)) if len(pairs) > 1 else float("nan")
            rows.append(dict(prompt_set=prompt_set, temperature=temperature, dtype=dtype, method=method, base=base,
                             prompts=len(pairs), ratio_median=statistics.median(ratios), ratio_mean=statistics.mean(ratios),
                             faster=sum(r > 1 for r in ratios),
                             total_ratio=(sum(a["new_tokens"] for a, _ in pairs) / sum(a["time_s"] for a, _ in pairs))
                             / (sum(b["new_tokens"] for _, b in pairs) / sum(b["time_s"] for _, b in pairs)),
                             tau_diff=statistics.mean(tau_diffs), tau_diff_se=error))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| prompt set | dtype | T | method | vs | prompts | tokens/s ratio (median / mean) | faster on | "
             "total tokens/s ratio | τ difference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt_set']} | {r['dtype']} | {r['temperature']:g} | {r['method']} | {r['base']} | "
                     f"{r['prompts']} | {r['ratio_median']:.3f} / {r['ratio_mean']:.3f} | {r['faster']}/{r['prompts']} | "
                     f"{r['total_ratio']:.3f} | {r['tau_diff']:+.3f} ± {r['tau_diff_se']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="bench output folders (or their bench.json); several are pooled")
    parser.add_argument("--base", required=True, help="the method every other one is compared with")
    parser.add_argument("--exclude", default="", help="comma-separated prompt ids to leave out (mt-bench/145)")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    runs = []
    for source, results in enumerate(args.results):
        path = Path(results)
        bench = json.loads((path / "bench.json" if path.is_dir() else path).read_text())
        runs += [dict(run, source=source) for run in bench["runs"]]
    exclude = tuple(name for name in args.exclude.split(",") if name)
    table = markdown(paired_rows(runs, args.base, exclude))
    if args.out:
        Path(args.out).write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
