"""Which prompt-lookup rule proposes the target's own text best: an offline replay, no timing.

Beagle's own loop adds one prompt-lookup branch to every draft tree (`prompt_lookup_num_tokens`). On MT-bench that
branch carries a third of τ (20 first turns: tree 1.93, tree + branch 2.89), so what it proposes matters. This
script takes the target's greedy replies (generated once, cached in `--replies`) and replays, for each rule, a
lookup-only speculative walk over every reply: at each round the rule proposes up to N tokens from the prompt and
the text so far, the walk takes the proposal's prefix that matches the reply, plus one token (the target's own).
Per rule it reports τ of that walk, proposed tokens per round (what verification pays for) and how many proposed
tokens the walk took per proposed token.

Rules (`lookup(sequence, num_tokens) -> list[int]`):
- `ngram2-earliest`: transformers' prompt lookup (`max_matching_ngram_size=2`: the last 2-gram, else the last token;
  the continuation after its earliest earlier occurrence): `decoding_beagle.prompt_lookup`;
- `suffix-latest` / `suffix-earliest`: the longest suffix of the text (up to 32 tokens) that occurred before, the
  continuation after its latest / earliest occurrence (`decoding_beagle.suffix_lookup`);
- `-min2`: no proposal where only the last token matches.

    python benchmarks/lookup_rules.py --prompt-sets mt-bench,humaneval --num-prompts 20 \
        --replies runs/lookup_rules/replies.json --out benchmarks/results/lookup_rules

writes `<out>.json` and `<out>.md`; with `--by-match-length N` (10 by default) also a table of how many of the
suffix rule's N proposed tokens the replies take, by the length of the match each continues (what
`lookup_tokens_per_match` reads: `benchmarks/results/lookup_match_lengths.md`).

It is also a `beagle bench` plugin (ARG: the Beagle checkpoint folder) whose methods run Beagle's own loop with the
bench's tree and lookup length but another lookup rule than the loop's default ("suffix", which `beagle-tree-lookup`
runs):

    beagle bench --beagle CKPT --methods plain,beagle-tree-lookup --plugin benchmarks/lookup_rules.py:CKPT ...

adds `tree-lookup-ngram` (`prompt_lookup_rule="ngram"`: transformers' rule, the loop's default before session 26),
`tree-lookup-suffix-3x6` (the continuations after the three best earlier occurrences, 6 tokens each, merged into
the tree as three branches: swapped in for the run) and `tree-lookup-nocopy` (copy mode off: the tree and a branch of
the bench's lookup length in every round, the default before session 27); `CKPT@ngram,nocopy` selects some of them.
`copyMxN` adds copy mode with other settings (`lookup_copy_match=M`, `lookup_copy_tokens=N`): `CKPT@nocopy,copy6x32`.
`permatchK` shortens the branch of rounds that do not copy to K tokens per matched token
(`lookup_tokens_per_match=K`; 3, the default since session 38, is what `beagle-tree-lookup` does): `CKPT@permatch0`
gives the uncapped branch of the bench's lookup length (the default before session 38), `CKPT@permatch2,permatch4`. `minmatchM` proposes the branch only from a match of M
tokens or more (`lookup_min_match=M`). `chainmatchM` runs the assisted chain path with copy rounds
(`target.generate(assistant_model=beagle, prompt_lookup_num_tokens=N)`, `beagle-chain-lookup`) from an M-token match
instead of the package's `CHAIN_LOOKUP_MATCH`: `CKPT@chainmatch2,chainmatch3,chainmatch4`.
`chainpermatchK` runs that path with copy rounds of at most K tokens per matched token (a 2-token match K * 2, ...,
up to N; the package's rounds propose N whatever the match's length): `CKPT@chainpermatch3`. `chaincopyMxN` runs that
path with copy rounds of up to N tokens from an M-token match (the own loop's copy mode, `lookup_copy_match=M`,
`lookup_copy_tokens=N`; shorter matches keep N = the bench's lookup length): `CKPT@chaincopy4x32`.
"""

import argparse
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import modeling_beagle.decoding_beagle as decoding  # noqa: E402
from modeling_beagle.decoding_beagle import prompt_lookup, suffix_lookup  # noqa: E402
from trainer.assets import load_prompts, load_target  # noqa: E402
from trainer.bench import first_turn_ids, machine_info, spread  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402

RULES = {
    "ngram2-earliest": lambda seq, n: prompt_lookup(seq, n, 2),
    "suffix-earliest": partial(suffix_lookup, max_ngram=32, latest=False),
    "suffix-latest": partial(suffix_lookup, max_ngram=32, latest=True),
    "suffix-latest-min2": partial(suffix_lookup, max_ngram=32, latest=True, min_ngram=2),
    "suffix-latest-min3": partial(suffix_lookup, max_ngram=32, latest=True, min_ngram=3),
}


def suffix_lookups(sequence: torch.Tensor, num_tokens: int, branches: int, max_ngram: int = 32) -> list[list[int]]:
    """Up to `branches` distinct continuations: `suffix_lookup`'s, then those after the next-best earlier occurrences
    of the sequence's end (by match length, then recency), each repeating with its period at the sequence's end."""
    if num_tokens < 1 or sequence.shape[0] < 2:
        return []
    ends, matched = decoding.suffix_matches(sequence, max_ngram)
    proposals = []
    for _, end in sorted(zip(matched.tolist(), ends.tolist()), reverse=True):
        proposal = decoding.periodic_continuation(sequence, end, num_tokens)
        if proposal not in proposals:
            proposals.append(proposal)
        if len(proposals) == branches:
            break
    return proposals


def merge_branches(tokens, parents, depths, proposals):
    """`decoding_beagle.add_lookup_branch` for several proposals per row (each row's list of continuations)."""
    from_lookup = torch.zeros(tokens.shape, dtype=torch.bool)
    for i in range(max((len(p) for p in proposals), default=0)):
        tokens, parents, depths, added = ADD_LOOKUP_BRANCH(tokens, parents, depths,
                                                           [p[i] if i < len(p) else [] for p in proposals])
        from_lookup = torch.cat([from_lookup, torch.zeros(added.shape[0], added.shape[1] - from_lookup.shape[1],
                                                          dtype=torch.bool)], dim=1) | added
    return tokens, parents, depths, from_lookup


ADD_LOOKUP_BRANCH, LOOKUP_RULES = decoding.add_lookup_branch, decoding.LOOKUP_RULES


@contextmanager
def lookup_branches(branches: int | None):
    """Beagle's loop with up to `branches` suffix-rule continuations merged into each tree (None: the loop as is):
    the "suffix" rule's continuation (the loop's `LOOKUP_RULES`) and its branch merging are swapped for the run."""
    if branches is not None:
        several = lambda sequence, end, num_tokens: suffix_lookups(sequence, num_tokens, branches)  # noqa: E731
        decoding.LOOKUP_RULES = {**LOOKUP_RULES, "suffix": replace(LOOKUP_RULES["suffix"], continuation=several)}
        decoding.add_lookup_branch = merge_branches
    try:
        yield
    finally:
        decoding.LOOKUP_RULES, decoding.add_lookup_branch = LOOKUP_RULES, ADD_LOOKUP_BRANCH


@contextmanager
def chain_lookup_replaced(beagle, **changes):
    """Within the block, the assisted path's copy rounds (the `ChainLookup` it builds) take `changes` to its fields:
    `copy_match=M` starts them at an M-token match, `tokens_per_match=K` caps them at K tokens per matched token,
    `extend_match=M, extend_tokens=N` lets an M-token match propose up to N tokens."""
    build = beagle.beagle_candidate_generator

    def generator(*args, **kwargs):
        candidate_generator = build(*args, **kwargs)
        if candidate_generator.lookup is not None:
            candidate_generator.lookup = replace(candidate_generator.lookup, **changes)
        return candidate_generator

    beagle.beagle_candidate_generator = generator
    try:
        yield
    finally:
        del beagle.beagle_candidate_generator


def bench_methods(target, tokenizer, arg, tree_shape="auto", prompt_lookup_num_tokens=10):
    from modeling_beagle import beagle_generate
    from modeling_beagle.decoding_beagle import resolve_tree_shape
    from trainer.bench import Method, _beagle_run, generation_kwargs, load_beagle_for

    path, _, selected = (arg or "").partition("@")
    if not path:
        raise ValueError("lookup_rules: expected the Beagle checkpoint folder (--plugin benchmarks/lookup_rules.py:PATH"
                         "[@ngram,suffix-3x6]), found nothing.")
    beagle = load_beagle_for(target, path)
    shape = resolve_tree_shape(target, beagle, tree_shape)  # the bench hands over its parsed first --tree-shape

    def run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, num_tokens, rule, branches=None,
            **copy_mode):
        with lookup_branches(branches):
            out = target.generate(input_ids, attention_mask=attention_mask, custom_generate=beagle_generate,
                                  beagle=beagle, tree_shape=shape, prompt_lookup_num_tokens=num_tokens,
                                  prompt_lookup_rule=rule, **copy_mode,
                                  **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(out, beagle)

    def run_chain(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, **changes):
        with chain_lookup_replaced(beagle, **changes):
            out = target.generate(input_ids, attention_mask=attention_mask, assistant_model=beagle,
                                  prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                                  **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(out, beagle)

    methods = {"ngram": Method("tree-lookup-ngram", partial(run, num_tokens=prompt_lookup_num_tokens, rule="ngram"),
                               f"the tree + one ngram-rule (transformers') branch of {prompt_lookup_num_tokens}"),
               "suffix-3x6": Method("tree-lookup-suffix-3x6", partial(run, num_tokens=6, rule="suffix", branches=3),
                                    "the tree + up to three suffix-rule branches of 6"),
               "nocopy": Method("tree-lookup-nocopy",
                                partial(run, num_tokens=prompt_lookup_num_tokens, rule="suffix", lookup_copy_match=0),
                                f"the tree + one suffix-rule branch of {prompt_lookup_num_tokens} in every round, copy "
                                "mode off (lookup_copy_match=0: the loop's default before session 27)")}
    names = selected.split(",") if selected else list(methods)
    for name in names:  # parametrised methods: chainmatchM, chainpermatchK, chaincopyMxN, permatchK, minmatchM, copyMxN
        chain = re.fullmatch(r"chainmatch(\d+)", name)
        if chain:
            m = int(chain[1])
            methods[name] = Method(f"chain-lookup-match{m}", partial(run_chain, copy_match=m),
                                   f"target.generate(assistant_model=beagle, prompt_lookup_num_tokens="
                                   f"{prompt_lookup_num_tokens}) with copy rounds from a {m}-token match")
        chain_per_match = re.fullmatch(r"chainpermatch(\d+)", name)
        if chain_per_match:
            k = int(chain_per_match[1])
            methods[name] = Method(f"chain-lookup-{name}", partial(run_chain, tokens_per_match=k),
                                   f"target.generate(assistant_model=beagle, prompt_lookup_num_tokens="
                                   f"{prompt_lookup_num_tokens}) with copy rounds of at most {k} tokens per matched "
                                   "token")
        chain_copy = re.fullmatch(r"chaincopy(\d+)x(\d+)", name)
        if chain_copy:
            m, n = int(chain_copy[1]), int(chain_copy[2])
            methods[name] = Method(f"chain-lookup-{name}", partial(run_chain, extend_match=m, extend_tokens=n),
                                   f"target.generate(assistant_model=beagle, prompt_lookup_num_tokens="
                                   f"{prompt_lookup_num_tokens}) with copy rounds of up to {n} tokens from a {m}-token "
                                   "match")
        per_match = re.fullmatch(r"permatch(\d+)", name)
        if per_match:
            k = int(per_match[1])
            methods[name] = Method(f"tree-lookup-{name}",
                                   partial(run, num_tokens=prompt_lookup_num_tokens, rule="suffix",
                                           lookup_tokens_per_match=k),
                                   (f"the tree + one suffix-rule branch of at most {k} tokens per matched token, up to "
                                    f"{prompt_lookup_num_tokens} (lookup_tokens_per_match={k})") if k else
                                   (f"the tree + one suffix-rule branch of {prompt_lookup_num_tokens} tokens whatever "
                                    "the match's length (lookup_tokens_per_match=0: uncapped, the default before "
                                    "session 38)"))
        min_match = re.fullmatch(r"minmatch(\d+)", name)
        if min_match:
            m = int(min_match[1])
            methods[name] = Method(f"tree-lookup-{name}",
                                   partial(run, num_tokens=prompt_lookup_num_tokens, rule="suffix", lookup_min_match=m),
                                   f"the tree + one suffix-rule branch of {prompt_lookup_num_tokens}, only from a match "
                                   f"of {m} tokens or more (lookup_min_match={m})")
        match = re.fullmatch(r"copy(\d+)x(\d+)", name)
        if match:
            copy_match, copy_tokens = int(match[1]), int(match[2])
            methods[name] = Method(f"tree-lookup-{name}", partial(run, num_tokens=prompt_lookup_num_tokens, rule="suffix",
                                                                  lookup_copy_match=copy_match,
                                                                  lookup_copy_tokens=copy_tokens),
                                   f"the tree + one suffix-rule branch of {prompt_lookup_num_tokens}; from a {copy_match}-"
                                   f"token match, copy mode: a branch of {copy_tokens}, no draft")
    unknown = [name for name in names if name not in methods]
    if unknown:
        raise ValueError(f"lookup_rules: methods expected among {sorted(methods)}, copyMxN, permatchK, minmatchM, "
                         f"chainmatchM, chainpermatchK or chaincopyMxN after '@', found {unknown}.")
    return [methods[name] for name in names]


def target_replies(target_name: str, dtype: str, prompt_sets: list[str], num_prompts: int, max_new_tokens: int,
                   path: Path) -> list[dict]:
    """`[{"id", "prompt": [ids], "reply": [ids]}]`: the target's greedy replies (batch 1), cached in `path`."""
    settings = dict(target=target_name, dtype=dtype, prompt_sets=prompt_sets, num_prompts=num_prompts,
                    max_new_tokens=max_new_tokens)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["settings"] == settings:
            return cached["replies"]
        raise SystemExit(f"{path} holds replies for {cached['settings']}, expected {settings}: pass another --replies.")
    target, tokenizer = load_target(target_name, DTYPES[dtype])
    replies = []
    for name in prompt_sets:
        for prompt in spread(load_prompts(name), num_prompts):
            ids = first_turn_ids(tokenizer, prompt["turns"][0])
            out = target.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
            replies.append({"prompt_set": name, "id": prompt["id"], "prompt": ids, "reply": out[0, len(ids):].tolist()})
            print(f"{prompt['id']}: {len(replies[-1]['reply'])} tokens", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "replies": replies}))
    return replies


def taken_prefix(proposal: list[int], truth: list[int]) -> int:
    """How many of `proposal`'s tokens a greedy walk over `truth` takes: the length of their common prefix."""
    taken = 0
    while taken < min(len(proposal), len(truth)) and proposal[taken] == truth[taken]:
        taken += 1
    return taken


def replay(rule, prompt: list[int], reply: list[int], num_tokens: int) -> dict:
    """A lookup-only speculative walk over `reply`: rounds, proposed tokens, taken proposed tokens."""
    sequence = torch.tensor(prompt + reply)
    start, position, rounds, proposed, taken = len(prompt), 0, 0, 0, 0
    while position < len(reply):
        proposal = rule(sequence[: start + position], min(num_tokens, len(reply) - position - 1))
        matched = taken_prefix(proposal, reply[position:])
        rounds, proposed, taken = rounds + 1, proposed + len(proposal), taken + matched
        position += matched + 1
    return {"rounds": rounds, "proposed": proposed, "taken": taken, "tokens": len(reply)}


def taken_by_match_length(prompt: list[int], reply: list[int], num_tokens: int,
                          longest: int = decoding.LOOKUP_COPY_MATCH, max_ngram: int = 32) -> dict[int, list[int]]:
    """At every position of `reply`, the loop's suffix rule (`LOOKUP_RULES["suffix"]`) proposes `num_tokens` tokens;
    counts `{match length (capped at longest): [positions whose proposal the reply takes exactly j tokens of, j =
    0..N]}` (positions without an earlier occurrence of the last token are left out). This is what
    `lookup_tokens_per_match` reads: how far a continuation stays right, by how long the match it continues is."""
    rule = LOOKUP_RULES["suffix"]
    sequence = torch.tensor(prompt + reply)
    counts = {}
    for position in range(len(reply) - 1):
        text = sequence[: len(prompt) + position]
        end, length = rule.match(text, max_ngram)
        if end < 0:
            continue
        taken = taken_prefix(rule.continuation(text, end, num_tokens), reply[position:])
        counts.setdefault(min(length, longest), [0] * (num_tokens + 1))[taken] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--prompt-sets", default="mt-bench,humaneval")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--lengths", default="10,16", help="comma-separated proposal lengths N")
    parser.add_argument("--by-match-length", type=int, default=10, metavar="N",
                        help="also tabulate how many of the suffix rule's N proposed tokens the reply takes, by "
                             "match length")
    parser.add_argument("--replies", required=True, help="JSON cache of the target's replies (written if absent)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_sets = args.prompt_sets.split(",")
    replies = target_replies(args.target, args.dtype, prompt_sets, args.num_prompts, args.max_new_tokens,
                             Path(args.replies))
    results = []
    for name in prompt_sets:
        rows = [r for r in replies if r["prompt_set"] == name]
        for num_tokens in (int(n) for n in args.lengths.split(",")):
            for rule_name, rule in RULES.items():
                walks = [replay(rule, r["prompt"], r["reply"], num_tokens) for r in rows]
                total = {key: sum(w[key] for w in walks) for key in walks[0]}
                results.append({"prompt_set": name, "rule": rule_name, "num_tokens": num_tokens,
                                "tau": total["tokens"] / total["rounds"],
                                "proposed_per_round": total["proposed"] / total["rounds"],
                                "taken_per_proposed": total["taken"] / max(total["proposed"], 1), **total})
    lines = ["| prompt set | N | rule | τ (lookup only) | proposed per round | taken per proposed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['prompt_set']} | {r['num_tokens']} | {r['rule']} | {r['tau']:.3f} | {r['proposed_per_round']:.2f} | "
              f"{r['taken_per_proposed']:.3f} |" for r in results]
    by_length = []
    for name in prompt_sets:
        counts = {}
        for r in (r for r in replies if r["prompt_set"] == name):
            for length, row in taken_by_match_length(r["prompt"], r["reply"], args.by_match_length).items():
                counts[length] = [a + b for a, b in zip(counts.get(length, [0] * len(row)), row)]
        for length, row in sorted(counts.items()):
            at_least = [sum(row[j:]) / sum(row) for j in range(1, len(row))]
            by_length.append({"prompt_set": name, "match_length": length, "positions": sum(row), "counts": row,
                              "p_taken_at_least": at_least})
    longest = decoding.LOOKUP_COPY_MATCH  # taken_by_match_length's cap: copy mode's match length
    lines += ["", f"Every position of the replies: the suffix rule's proposal of {args.by_match_length} tokens, by the "
              f"length of the match it continues ({longest}: {longest} or more, where copy mode takes over), and the "
              "share of positions whose reply takes at least j of its tokens.", "",
              "| prompt set | match length | positions | "
              + " | ".join(f"j ≥ {j}" for j in range(1, args.by_match_length + 1)) + " |", "|---|---|---|" + "---|" * args.by_match_length]
    lines += [f"| {r['prompt_set']} | {r['match_length']}{'+' if r['match_length'] == longest else ''} | {r['positions']} | "
              + " | ".join(f"{p:.3f}" for p in r["p_taken_at_least"]) + " |" for r in by_length]
    table = "\n".join(lines) + "\n"
    report = {"benchmark": "lookup_rules", "settings": vars(args), "machine": machine_info(torch.device("cpu")),
              "results": results, "taken_by_match_length": by_length}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(report, indent=2))
    out.with_name(out.name + ".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
