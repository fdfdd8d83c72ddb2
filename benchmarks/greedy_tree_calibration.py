"""Greedy draft trees: is the draft's probability q a good value for a node, and does a calibrated value keep better
nodes? Deterministic (τ on identical texts), no timing.

At T = 0 Beagle's own loop expands each frontier node's top-k children and keeps the `total_tokens` nodes of highest
cumulative log q (`decoding_beagle._expand_tree`). A node is worth verifying by the chance that the target's greedy
text passes through it, which q estimates only if the draft is calibrated for greedy acceptance, at every depth and
sibling rank. Two steps:

- `measure`: greedy speculative decoding (tree + lookup branch, the shipped settings) on prompts the bench does not
  use (the MT-bench and HumanEval prompts outside `spread(..., --num-prompts)`); every child the expansion scored is
  recorded with its depth, sibling rank, q, and whether the target's greedy text passes through it and through its
  parent (known afterwards: the output is plain greedy). Writes the table of P(child on the text | parent on the
  text) by depth, rank and q bin.
- `compare`: on the bench's prompts (the first `--num-prompts` spread over each set), the shipped value (log q)
  against the calibrated one (log of the table's interpolated probability by depth, rank and q), one generation each
  in float32 so both texts equal plain greedy (checked); τ per prompt, paired, and verified nodes per round.

    python benchmarks/greedy_tree_calibration.py measure --threads 2 --out benchmarks/results/greedy_calibration
    python benchmarks/greedy_tree_calibration.py compare --calibration benchmarks/results/greedy_calibration.json \
        --threads 2 --out benchmarks/results/greedy_calibration_compare

each writes `<out>.json` and `<out>.md`.
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

import modeling_beagle.decoding_beagle as decoding  # noqa: E402
from benchmarks.round_budget import load_models, write_report  # noqa: E402
from modeling_beagle import beagle_generate  # noqa: E402
from trainer.assets import load_prompts  # noqa: E402
from trainer.bench import first_turn_ids, generation_kwargs, machine_info, parse_tree_shape, spread  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402

Q_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)


class ExpansionRecorder:
    """Wraps `decoding._expand_tree` and `decoding.draft_topk` (both looked up by name in the loop) to record every
    scored child: (root position, depth, rank, q, path tokens from the root's child down). The frontier is followed
    with the same rule as the expansion (the `top_k` best cumulative scores); batch size 1."""

    def __init__(self):
        self.records, self._level, self._root = [], 0, None
        self._expand, self._topk = decoding._expand_tree, decoding.draft_topk

    def __enter__(self):
        def expand(beagle, cache, roots, root_positions, shape, *args, **kwargs):
            self._level, self._root = 0, int(root_positions[0])
            self._paths, self._cumulative = [[]], torch.zeros(1)
            return self._expand(beagle, cache, roots, root_positions, shape, *args, **kwargs)

        def topk(beagle, logits, k):
            scores, ids = self._topk(beagle, logits, k)
            children, cumulative = [], []
            for i, path in enumerate(self._paths):
                for rank in range(k):
                    child = path + [int(ids[0, i, rank])]
                    self.records.append((self._root, self._level + 1, rank, float(scores[0, i, rank].exp()), child))
                    children.append(child)
                    cumulative.append(float(self._cumulative[i] + scores[0, i, rank] - 1e-6))
            cumulative = torch.tensor(cumulative)
            best = cumulative.topk(min(k, len(children))).indices
            self._paths, self._cumulative = [children[j] for j in best.tolist()], cumulative[best]
            self._level += 1
            return scores, ids

        decoding._expand_tree, decoding.draft_topk = expand, topk
        return self

    def __exit__(self, *exc):
        decoding._expand_tree, decoding.draft_topk = self._expand, self._topk


def label_records(records, sequence: list[int]) -> list[dict]:
    """Each record with `on_text` (the greedy text passes through the child) and `parent_on_text`."""
    labelled = []
    for root, depth, rank, q, path in records:
        text = sequence[root + 1: root + 1 + depth]
        if len(text) < depth:  # past the end of the output: unknown
            continue
        labelled.append({"depth": depth, "rank": rank, "q": q, "on_text": path == text,
                         "parent_on_text": path[:-1] == text[:-1]})
    return labelled


def calibration_table(rows: list[dict], min_count: int = 20) -> list[dict]:
    """P(on text | parent on text) per depth, rank and q bin (bins with at least `min_count` children)."""
    table = []
    for depth in sorted({r["depth"] for r in rows}):
        for rank in sorted({r["rank"] for r in rows}):
            for low, high in zip(Q_BINS[:-1], Q_BINS[1:]):
                cell = [r for r in rows if r["depth"] == depth and r["rank"] == rank and r["parent_on_text"]
                        and low <= r["q"] < high]
                if len(cell) >= min_count:
                    table.append({"depth": depth, "rank": rank, "q_low": low, "q_high": min(high, 1.0),
                                  "count": len(cell), "mean_q": statistics.mean(r["q"] for r in cell),
                                  "on_text": statistics.mean(r["on_text"] for r in cell)})
    return table


def calibrated_topk(table: list[dict], original):
    """A replacement for `decoding.draft_topk` that keeps the top-k children by q but values each by the log of the
    table's probability for its depth (the expansion level, counted per call since the last reset), rank and q:
    piecewise linear between the bins' mean q, flat beyond the first and last, made non-decreasing in q. Depths and
    ranks without rows use the nearest shallower depth measured (else the shallowest), and any rank when theirs has
    none."""
    curves = {}
    for depth, rank in {(row["depth"], row["rank"]) for row in table}:
        rows = sorted((row["mean_q"], row["on_text"]) for row in table if (row["depth"], row["rank"]) == (depth, rank))
        knots = torch.tensor([0.0] + [q for q, _ in rows] + [1.0])
        values = torch.tensor([rows[0][1]] + [v for _, v in rows] + [rows[-1][1]]).cummax(0).values
        curves[depth, rank] = (knots, values)
    state = {"level": 0}

    def value(depth: int, rank: int, q: torch.Tensor) -> torch.Tensor:
        keys = sorted(key for key in curves if key[1] == rank) or sorted(curves)
        knots, values = curves[max([key for key in keys if key[0] <= depth] or keys[:1])]
        right = torch.searchsorted(knots, q.contiguous(), right=True).clamp(1, len(knots) - 1)
        x0, x1, y0, y1 = knots[right - 1], knots[right], values[right - 1], values[right]
        return y0 + (y1 - y0) * (q - x0) / (x1 - x0).clamp(min=1e-9)

    def topk(beagle, logits, k):
        scores, ids = original(beagle, logits, k)
        state["level"] += 1
        q = scores.exp()
        calibrated = torch.stack([value(state["level"], rank, q[..., rank]) for rank in range(k)], dim=-1)
        return calibrated.clamp(min=1e-6).log(), ids

    return topk, state


def held_out_prompts(tokenizer, sets: list[str], num_bench: int) -> list[tuple[str, torch.Tensor]]:
    prompts = []
    for name in sets:
        items = load_prompts(name)
        used = {p["id"] for p in spread(items, num_bench)}
        prompts += [(p["id"], torch.tensor([first_turn_ids(tokenizer, p["turns"][0])])) for p in items
                    if p["id"] not in used]
    return prompts


def bench_prompts(tokenizer, sets: list[str], num_bench: int) -> list[tuple[str, torch.Tensor]]:
    return [(p["id"], torch.tensor([first_turn_ids(tokenizer, p["turns"][0])])) for name in sets
            for p in spread(load_prompts(name), num_bench)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("measure", "compare"))
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", default="checkpoints/beagle-smollm2-135m-instruct")
    parser.add_argument("--prompt-sets", default="mt-bench,humaneval")
    parser.add_argument("--num-prompts", type=int, default=20, help="the bench's prompts per set (spread)")
    parser.add_argument("--max-held-out", type=int, default=40, help="measure: held-out prompts per set at most")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tree-shape", default="6,3,16,0.1")
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (0: no lookup branch)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 to measure, float32 to compare (identical texts)")
    parser.add_argument("--calibration", default=None, help="compare: the measure run's JSON")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.mode == "compare" and not args.calibration:
        parser.error("compare needs --calibration (a measure run's JSON)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.mode == "measure" else "float32")
    target, tokenizer, beagle = load_models(args.target, args.beagle, DTYPES[dtype], prepack=False)
    sets = args.prompt_sets.split(",")
    shape = parse_tree_shape(args.tree_shape)
    kwargs = {**generation_kwargs(target, args.max_new_tokens, False, 0.0), "custom_generate": beagle_generate,
              "beagle": beagle, "tree_shape": shape, "prompt_lookup_num_tokens": args.lookup}
    settings = {**vars(args), "dtype": dtype}

    if args.mode == "measure":
        prompts = []
        for name in sets:
            prompts += held_out_prompts(tokenizer, [name], args.num_prompts)[: args.max_held_out]
        rows = []
        for i, (prompt_id, ids) in enumerate(prompts):
            with ExpansionRecorder() as recorder:
                out = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            rows += label_records(recorder.records, out[0].tolist())
            print(f"{i + 1}/{len(prompts)} {prompt_id}: {len(recorder.records)} children scored", flush=True)
        table = calibration_table(rows)
        report = {"machine": machine_info(torch.device("cpu")), "settings": settings,
                  "prompts": [p for p, _ in prompts], "children": len(rows), "table": table}
        lines = [f"# Greedy draft trees: P(child on the target's text | parent on it) by depth, rank and q ({dtype})",
                 "", f"{len(prompts)} held-out first turns ({args.prompt_sets}, outside the bench's "
                 f"{args.num_prompts} per set), {args.max_new_tokens} new tokens, tree {args.tree_shape}, lookup "
                 f"{args.lookup}; {len(rows)} scored children. A calibrated draft has on-text = mean q in every row.",
                 "", "| depth | rank | q bin | children | mean q | on text |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['depth']} | {r['rank'] + 1} | [{r['q_low']:.2f}, {r['q_high']:.2f}) | {r['count']} | "
                  f"{r['mean_q']:.3f} | {r['on_text']:.3f} |" for r in table]
        write_report(args.out, report, "\n".join(lines) + "\n")
        return 0

    table = json.loads(Path(args.calibration).read_text())["table"]
    prompts = bench_prompts(tokenizer, sets, args.num_prompts)
    original = decoding.draft_topk
    calibrated, state = calibrated_topk(table, original)
    expand = decoding._expand_tree
    per_prompt = {"plain": [], "q": [], "calibrated": []}
    nodes = {"q": [], "calibrated": []}
    try:
        for i, (prompt_id, ids) in enumerate(prompts):
            plain = target.generate(ids, attention_mask=torch.ones_like(ids),
                                    **generation_kwargs(target, args.max_new_tokens, False, 0.0))
            per_prompt["plain"].append(plain[0].tolist())
            for name in ("q", "calibrated"):
                counted = []

                def counting(beagle_, cache, roots, root_positions, shape_, *rest, **kw):
                    state["level"] = 0
                    tree = expand(beagle_, cache, roots, root_positions, shape_, *rest, **kw)
                    counted.append(tree[0].shape[1])
                    return tree

                decoding._expand_tree = counting
                decoding.draft_topk = calibrated if name == "calibrated" else original
                out = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                decoding._expand_tree, decoding.draft_topk = expand, original
                stats = beagle.generation_stats
                rounds = len(stats.accepted)
                new = out.shape[1] - ids.shape[1]
                per_prompt[name].append({"id": prompt_id, "identical": out[0].tolist() == plain[0].tolist(),
                                         "tokens": new, "rounds": rounds, "tau": (new - 1) / max(rounds, 1),
                                         "draft_nodes": sum(counted)})
            print(f"{i + 1}/{len(prompts)} {prompt_id}: tau q {per_prompt['q'][-1]['tau']:.2f}, calibrated "
                  f"{per_prompt['calibrated'][-1]['tau']:.2f}", flush=True)
    finally:
        decoding._expand_tree, decoding.draft_topk = expand, original
    summary = {}
    for name in ("q", "calibrated"):
        rows = per_prompt[name]
        rounds = sum(r["rounds"] for r in rows)
        summary[name] = {"tau": sum(r["tokens"] - 1 for r in rows) / rounds,
                         "draft_nodes_per_round": sum(r["draft_nodes"] for r in rows) / rounds,
                         "identical": sum(r["identical"] for r in rows) / len(rows)}
    differences = [c["tau"] - q["tau"] for c, q in zip(per_prompt["calibrated"], per_prompt["q"])]
    summary["paired_tau"] = {"mean": statistics.mean(differences),
                             "standard_error": statistics.stdev(differences) / len(differences) ** 0.5,
                             "calibrated_higher": sum(d > 0 for d in differences)}
    del per_prompt["plain"]
    report = {"machine": machine_info(torch.device("cpu")), "settings": settings, "summary": summary,
              "per_prompt": per_prompt}
    lines = [f"# Greedy draft trees: node values q against calibrated ({dtype})", "",
             f"{len(prompts)} bench first turns ({args.prompt_sets}, {args.num_prompts} spread per set), "
             f"{args.max_new_tokens} new tokens, tree {args.tree_shape}, lookup {args.lookup}; calibration "
             f"{args.calibration}. τ = tokens per round after the first token.", "",
             "| node values | τ | draft nodes per round | identical to plain greedy |", "|---|---|---|---|"]
    lines += [f"| {name} | {summary[name]['tau']:.3f} | {summary[name]['draft_nodes_per_round']:.2f} | "
              f"{summary[name]['identical']:.2f} |" for name in ("q", "calibrated")]
    paired = summary["paired_tau"]
    lines += ["", f"Paired per prompt, τ calibrated − q: {paired['mean']:+.3f} ± {paired['standard_error']:.3f} "
              f"(higher on {paired['calibrated_higher']}/{len(prompts)})."]
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
