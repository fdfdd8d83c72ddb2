"""`beagle bench` plugin: Beagle's own loop with prompt-lookup branches of several lengths.

    beagle bench --beagle CKPT --methods plain,beagle-tree,beagle-tree-lookup \
        --plugin benchmarks/lookup_branch_lengths.py:CKPT[@N,N,...] --prepack ...

adds the methods `tree-lookup-N` (`prompt_lookup_num_tokens` = N; by default 2, 4 and 6) next to the built-in
`beagle-tree-lookup` (`--prompt-lookup-tokens`, 10 by default), so the branch lengths are compared in one interleaved
run. ARG is the Beagle checkpoint folder, optionally followed by `@` and the lengths; the draft is packed when the
target is (`--prepack`). The tree is the bench's first `--tree-shape` (auto by default).
"""

import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import beagle_generate  # noqa: E402
from modeling_beagle.decoding_beagle import resolve_tree_shape  # noqa: E402
from trainer.bench import Method, _beagle_run, generation_kwargs, load_beagle_for  # noqa: E402

LENGTHS = (2, 4, 6)


def bench_methods(target, tokenizer, arg, tree_shape="auto"):
    path, _, lengths = (arg or "").partition("@")
    if not path:
        raise ValueError("lookup_branch_lengths: expected the Beagle checkpoint folder "
                         "(--plugin benchmarks/lookup_branch_lengths.py:PATH[@N,N,...]), found nothing.")
    try:
        lengths = [int(n) for n in lengths.split(",")] if lengths else list(LENGTHS)
    except ValueError:
        lengths = None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lookup_branch_lengths: expected positive integer lengths after '@', found {arg!r}.")
    beagle = load_beagle_for(target, path)
    shape = resolve_tree_shape(target, beagle, tree_shape)  # the bench hands over its parsed first --tree-shape

    def run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, num_tokens):
        out = target.generate(input_ids, attention_mask=attention_mask, custom_generate=beagle_generate,
                              beagle=beagle, tree_shape=shape, prompt_lookup_num_tokens=num_tokens,
                              **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(out, beagle)

    return [Method(f"tree-lookup-{n}", partial(run, num_tokens=n), f"the tree + a prompt-lookup branch of {n}")
            for n in lengths]
