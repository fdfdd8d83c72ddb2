"""Per-round overhead of Beagle's decoding paths against transformers' own loops, on a tiny target.

With a tiny target and draft the model compute per round is small, so the wall time per round is mostly the loop's
own Python/bookkeeping cost. For each path we report the median wall time per round (per token for plain greedy),
the median compute of the same round measured in isolation (target forward over the round's tokens plus the draft
steps), and their difference: the overhead.

    python benchmarks/round_overhead.py --out benchmarks/results/round_overhead

writes `<out>.json` and `<out>.md`. Runs interleave the methods (A B C D A B C D ...) and report medians.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from modeling_beagle import BeagleCache, BeagleModel, TreeShape, beagle_generate
from modeling_beagle.generation_beagle import cache_kwargs


def build(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=None, pad_token_id=0)
    target = LlamaForCausalLM(config).eval()
    beagle = BeagleModel.from_target(target).eval()
    beagle.config.draft_schedule = "fixed"
    beagle.config.draft_confidence_threshold = 0.0
    return target, beagle


@torch.no_grad()
def compute_per_round(target, beagle, prefix_len: int, new_tokens: int, draft_steps: int, draft_width: int,
                      repeats: int = 20) -> float:
    """Median time of one target forward over `new_tokens` plus `draft_steps` Beagle steps of `draft_width` queries."""
    ids = torch.randint(1, 512, (1, prefix_len + new_tokens))
    cache = DynamicCache(config=target.config)
    states = target(ids[:, :prefix_len], **cache_kwargs(target, cache), use_cache=True,
                    output_hidden_states=True).hidden_states[-1]
    bcache = BeagleCache()
    beagle.append_context(bcache, states, torch.arange(prefix_len)[None])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for step in range(draft_steps):
            beagle(input_ids=ids[:, :draft_width], position_ids=torch.full((1, draft_width), prefix_len + step),
                   past_key_values=bcache)
        bcache.discard_drafts()
        target(ids[:, prefix_len:], **cache_kwargs(target, cache), use_cache=True, output_hidden_states=True)
        cache.crop(-new_tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/round_overhead")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target, beagle = build()
    prompt = torch.randint(1, 512, (1, args.prompt_len))
    k = 4
    tree = TreeShape(depth=4, top_k=3, total_tokens=10)
    beagle.config.num_draft_tokens = k

    def plain():
        target.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens)
        return args.new_tokens

    def assisted():
        target.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens, assistant_model=beagle,
                        prompt_lookup_num_tokens=0)
        return beagle.generation_stats.rounds + 1

    def own_chain():
        target.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens, custom_generate=beagle_generate,
                        beagle=beagle, tree_shape="chain", prompt_lookup_num_tokens=0)
        return beagle.generation_stats.rounds + 1

    def own_tree():
        target.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens, custom_generate=beagle_generate,
                        beagle=beagle, tree_shape=tree, prompt_lookup_num_tokens=0)
        return beagle.generation_stats.rounds + 1

    methods = {"plain greedy (per token)": plain, "assisted + Beagle chain k=4": assisted,
               "own loop, chain k=4": own_chain, "own loop, tree 4/3/10": own_tree}
    for fn in methods.values():  # warm-up
        fn()
    per_round = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            rounds = fn()
            per_round[name].append((time.perf_counter() - start) / rounds)
    ctx = args.prompt_len + args.new_tokens // 2
    compute = {
        "plain greedy (per token)": compute_per_round(target, beagle, ctx, 1, 0, 1),
        "assisted + Beagle chain k=4": compute_per_round(target, beagle, ctx, k + 1, k, 1),
        "own loop, chain k=4": compute_per_round(target, beagle, ctx, k + 1, k, 1),
        "own loop, tree 4/3/10": compute_per_round(target, beagle, ctx, tree.total_tokens + 1, tree.depth, tree.top_k),
    }
    rows = []
    for name in methods:
        wall = statistics.median(per_round[name])
        rows.append({"method": name, "wall_ms_per_round": wall * 1e3, "compute_ms_per_round": compute[name] * 1e3,
                     "overhead_ms_per_round": (wall - compute[name]) * 1e3})
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "torch": torch.__version__},
        "settings": {"target": "Llama 2 layers, hidden 64, vocab 512 (random)", "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "dtype": "float32"},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["| method | wall ms/round | compute ms/round | overhead ms/round |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['wall_ms_per_round']:.2f} | {r['compute_ms_per_round']:.2f} | "
              f"{r['overhead_ms_per_round']:.2f} |" for r in rows]
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"# Per-round overhead\n\n{json.dumps(result['settings'])}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
