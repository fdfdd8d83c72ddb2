"""`beagle demo`: fetch the target, load the shipped Beagle, answer an MT-bench question with and without it, and print
the speedup and τ measured on this machine (and whether the two answers are token-identical)."""

import argparse
import statistics
import time
from pathlib import Path

import torch

DEFAULT_TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_BEAGLE = "checkpoints/beagle-smollm2-135m-instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="target model (Hub id or folder)")
    parser.add_argument("--beagle", default=DEFAULT_BEAGLE, help="Beagle checkpoint folder (or Hub id)")
    parser.add_argument("--question", type=int, default=0, help="MT-bench question index (0..79)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="target dtype; float32 gives exact token identity (bf16 can flip near-ties)")
    parser.add_argument("--mode", choices=["tree-lookup", "tree", "chain-lookup", "chain"], default="tree-lookup",
                        help="tree-lookup: Beagle's own loop with draft trees plus a prompt-lookup branch "
                             "(prompt_lookup_num_tokens=10; the fastest on a 2-core CPU, README Results); tree: the "
                             "same without the branch (prompt_lookup_num_tokens=0); chain-lookup: "
                             "target.generate(assistant_model=beagle, prompt_lookup_num_tokens=10), chain drafts and "
                             "copy rounds; chain: the same without copy rounds (prompt_lookup_num_tokens=0)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (interleaved); medians reported")
    parser.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                        help="pack the target's and the draft's linear weights for oneDNN (beagle.prepack_for_cpu) "
                             "for both runs; default: pack where this CPU can pack the target's dtype, run Beagle "
                             "packed (several-token verification is where packing pays) and run plain decoding "
                             "packed or unpacked, whichever a short timed decode shows is faster here")


def packing_pays(target, ids: torch.Tensor, new_tokens: int = 16, repeats: int = 2) -> bool:
    """Whether plain greedy decoding of `new_tokens` after `ids` is faster with the target's linear weights packed
    than unpacked on this machine: the two are timed interleaved (`repeats` each after a warm-up; fastest taken) and
    the result printed."""
    from modeling_beagle import packed_path

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    best = {True: float("inf"), False: float("inf")}
    for run_index in range(repeats + 1):
        for packed in (True, False):
            with packed_path(target, packed):
                start = time.perf_counter()
                target.generate(ids, **settings)
                if run_index:  # the first round warms both paths up
                    best[packed] = min(best[packed], time.perf_counter() - start)
    print(f"[beagle demo] {new_tokens} plain tokens: packed target {best[True]:.2f} s, unpacked {best[False]:.2f} s: "
          f"plain decoding runs {'packed' if best[True] < best[False] else 'unpacked'}, Beagle packed")
    return best[True] < best[False]


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    from modeling_beagle import beagle_generate, packed_path, prepacking_available  # (+ the generate hook)

    from .assets import load_prompts, load_target
    from .bench import first_turn_ids
    from .data import BeagleDataError

    if args.max_new_tokens < 1 or args.repeats < 1:
        raise BeagleDataError(f"`--max-new-tokens` and `--repeats` expected integers >= 1, found {args.max_new_tokens} "
                              f"and {args.repeats}.")
    dtype = getattr(torch, args.dtype)
    print(f"[beagle demo] target {args.target} ({args.dtype}), draft {args.beagle}")
    target, tokenizer = load_target(args.target, dtype=dtype)
    questions = load_prompts("mt-bench")
    if not 0 <= args.question < len(questions):
        raise BeagleDataError(f"`--question` expected an MT-bench question index in 0..{len(questions) - 1}, found "
                              f"{args.question}.")
    question = questions[args.question]
    ids = torch.tensor([first_turn_ids(tokenizer, question["turns"][0])])  # the bench's prompt for this question
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if Path(args.beagle).is_dir() or "/" in args.beagle:
        beagle = AutoModel.from_pretrained(args.beagle, trust_remote_code=True)
    else:
        raise SystemExit(f"beagle demo: --beagle expected a checkpoint folder or Hub id, found {args.beagle!r}")
    prepack = prepacking_available(dtype) if args.prepack is None else args.prepack
    if prepack:  # the target's and the draft's layers, then binds (the draft's reduced head is packed too)
        beagle.prepack_for_cpu(target)
    else:
        beagle.bind_target(target)
    # Plain decoding runs as it is fastest here, so the speedup is over the best plain decoding: packing slows the
    # one-token fp32 forward on some CPUs (the AMX Xeon of README Results) while it speeds up verification everywhere.
    plain_packed = prepack and (args.prepack is True or packing_pays(target, ids))

    def plain(packed: bool):
        with packed_path(target, packed):
            return target.generate(ids, **settings)

    def speculative():
        lookup = {"prompt_lookup_num_tokens": 10 if args.mode.endswith("-lookup") else 0}
        if args.mode.startswith("chain"):
            return target.generate(ids, assistant_model=beagle, **lookup, **settings)
        return target.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=beagle_generate,
                               beagle=beagle, tree_shape="auto", **lookup, **settings)

    target.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up (and the auto tree's cost curve below)
    speculative()
    times = {"plain": [], "beagle": []}
    outputs = {}
    for _ in range(max(args.repeats, 1)):
        for name, fn in (("plain", lambda: plain(plain_packed)), ("beagle", speculative)):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    stats = beagle.generation_stats
    # Lossless means: Beagle's output is the target's own greedy text with the arithmetic Beagle ran (packed or not).
    reference = outputs["plain"] if plain_packed == prepack else plain(prepack)
    identical = torch.equal(reference, outputs["beagle"])
    plain_s, beagle_s = statistics.median(times["plain"]), statistics.median(times["beagle"])
    new_tokens = outputs["plain"].shape[1] - ids.shape[1]
    print(f"\nMT-bench question {question['id']} ({question['category']}):\n{question['turns'][0]}\n")
    print(tokenizer.decode(outputs["beagle"][0, ids.shape[1]:], skip_special_tokens=True))
    print(f"\n[beagle demo] {new_tokens} new tokens; plain {plain_s:.2f} s ({new_tokens / plain_s:.1f} tok/s"
          f"{', target packed' if plain_packed else ''}), Beagle {args.mode} {beagle_s:.2f} s "
          f"({(outputs['beagle'].shape[1] - ids.shape[1]) / beagle_s:.1f} tok/s{', target packed' if prepack else ''})")
    print(f"[beagle demo] speedup {plain_s / beagle_s:.2f}x, tau {stats.tau:.2f} tokens per target forward, "
          f"acceptance per draft position {[round(a, 2) for a in stats.acceptance_per_position()[:6]]}")
    if plain_packed != prepack:  # the timed plain runs used the other arithmetic
        same = torch.equal(outputs["plain"], outputs["beagle"])
        print(f"[beagle demo] the unpacked target's own greedy text is {'the same' if same else 'another'} (packed "
              "and unpacked kernels round differently, which can flip a near-tie)")
    print(f"[beagle demo] output identical to plain greedy: {'yes' if identical else 'NO'} ({args.dtype}"
          f"{', prepacked target' if prepack else ''}; medians of {len(times['plain'])} interleaved runs, "
          f"{torch.get_num_threads()} threads)")
    if not identical and args.dtype == "float32":
        print("[beagle demo] error: in float32 the outputs must be identical; please report this.")
        return 1
    return 0
