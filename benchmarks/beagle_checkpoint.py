"""A second Beagle checkpoint in one `beagle bench` run, beside the bench's `--beagle`: two drafts compared on the
same prompts, interleaved, with every setting alike (a candidate against the shipped draft).

    beagle bench --beagle checkpoints/beagle-smollm2-135m-instruct --methods plain,beagle-tree,beagle-tree-lookup \
        --plugin benchmarks/beagle_checkpoint.py:part6=runs/part6/export@tree,tree-lookup ...

ARG is `LABEL=PATH[@METHODS]`: the checkpoint folder at PATH, loaded as the bench loads `--beagle` (the target's
dtype and device, packed with `--prepack`), and METHODS among chain, tree, tree-lookup (default: all three), each the
bench's built-in `beagle-<method>` with this checkpoint as the draft, the bench's tree shape (its first
`--tree-shape`) and lookup length, named `LABEL-<method>`. `benchmarks/paired.py --base beagle-tree-lookup` then
compares the two drafts prompt by prompt.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("chain", "tree", "tree-lookup")


def parse_arg(arg) -> tuple[str, str, list[str]]:
    """`LABEL=PATH[@METHODS]` -> (label, path, methods); a clear error for anything else."""
    label, sep, rest = (arg or "").partition("=")
    path, _, selected = rest.partition("@")
    names = [n.strip() for n in selected.split(",")] if selected else list(METHODS)
    if (not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or not path
            or any(n not in METHODS for n in names) or len(set(names)) != len(names)):
        raise ValueError(f"beagle_checkpoint: expected LABEL=PATH[@METHODS] (a label of letters, digits, '.', '_' or "
                         f"'-', a Beagle checkpoint folder, and methods among {list(METHODS)}), found {arg!r}.")
    return label, path, names


def bench_methods(target, tokenizer, arg, tree_shape="auto", prompt_lookup_num_tokens: int = 10) -> list:
    from dataclasses import replace

    from trainer.bench import builtin_methods, load_beagle_for

    label, path, names = parse_arg(arg)
    beagle = load_beagle_for(target, path)
    methods = builtin_methods([f"beagle-{n}" for n in names], target, beagle, [tree_shape], prompt_lookup_num_tokens)
    return [replace(m, name=label + m.name.removeprefix("beagle"), description=f"{path}: {m.description}")
            for m in methods]
