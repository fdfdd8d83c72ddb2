"""`beagle bench` plugin: Beagle's own loop (auto tree) with prompt-lookup branches of several lengths.

    beagle bench --beagle CKPT --methods plain,beagle-tree,beagle-tree-lookup \
        --plugin benchmarks/lookup_branch_lengths.py:CKPT --prepack ...

adds the methods `tree-lookup-2`, `tree-lookup-4` and `tree-lookup-6` (`prompt_lookup_num_tokens` = 2, 4, 6) next to
the built-in `beagle-tree-lookup` (`--prompt-lookup-tokens`, 10 by default), so the branch lengths are compared in
one interleaved run. ARG is the Beagle checkpoint folder; the draft is packed when the target is (`--prepack`).
"""

import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import BeagleModel, beagle_generate, is_prepacked, prepack_linear_weights  # noqa: E402
from modeling_beagle.decoding_beagle import resolve_tree_shape  # noqa: E402
from trainer.bench import Method, _beagle_run, generation_kwargs  # noqa: E402

LENGTHS = (2, 4, 6)


def bench_methods(target, tokenizer, arg):
    if not arg:
        raise ValueError("lookup_branch_lengths: expected the Beagle checkpoint folder "
                         "(--plugin benchmarks/lookup_branch_lengths.py:PATH), found nothing.")
    beagle = BeagleModel.from_pretrained(arg, dtype=next(target.parameters()).dtype).to(target.device).eval()
    if is_prepacked(target):
        prepack_linear_weights(beagle)
    beagle.bind_target(target)
    shape = resolve_tree_shape(target, beagle, "auto")

    def run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, num_tokens):
        out = target.generate(input_ids, attention_mask=attention_mask, custom_generate=beagle_generate,
                              beagle=beagle, tree_shape=shape, prompt_lookup_num_tokens=num_tokens,
                              **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(out, beagle)

    return [Method(f"tree-lookup-{n}", partial(run, num_tokens=n), f"auto tree + prompt-lookup branch of {n}")
            for n in LENGTHS]
