"""`beagle bench`: speculative decoding measured honestly, against the baselines a user would pick instead.

For every setting (prompt set x target dtype x temperature) each method generates the same prompts; the runs of one
prompt are interleaved in a rotating order (A B C D, B C D A, ...) and repeated, and every ratio is taken between runs
of the same invocation. Reported per method and setting:

- `tau`: tokens per target forward, the bonus token included. Counted the same way for every method, by a hook on the
  target's decoder: tau = (new tokens - 1) / (target forwards - 1). The prefill forward and the one token it yields
  are left out of both counts (a plain decode step then scores exactly 1.0).
- `tokens_per_s` (median over prompts of new tokens / generate wall time, each prompt's time the median of its
  repeats), `speedup` (median over prompts of the method's tokens/s over plain's on the same prompt; it equals the
  ratio of plain time to method time whenever the two produce the same number of tokens, as greedy runs do) and
  `speedup_total` (ratio of total tokens / total time).
- `peak_memory_mb`: peak process memory while the method ran (see `PeakMemory`; `peak_memory_kind` says what was
  measured), and `peak_memory_delta_mb`, its rise over the memory in use when the run started.
- `acceptance_per_position`: share of draft rounds that proposed position i whose token i was accepted (methods
  that report it), pooled over prompts weighted by the number of such rounds.
- `identical_share` (temperature 0): share of prompts whose output is token-identical to plain greedy in every
  repeat. In float32 any mismatch makes the result `invalid` (and `beagle bench` exits non-zero): lossless
  speculative decoding must reproduce plain greedy exactly there. In bfloat16, verifying k tokens in one forward
  rounds differently from decoding them one by one, so near-ties may flip: every divergence is examined (`divergences`:
  the target's logits recomputed at the first differing position on the plain prefix) and the result is `valid` if each
  divergence sits on a tie within bf16 rounding, `suspect` otherwise. Sampled runs (temperature > 0) use a fixed seed
  per prompt; identity is not expected there (`unchecked`).

Methods are `Method(name, run)` objects; the built-in ones are `plain`, `prompt-lookup`, `beagle-chain`,
`beagle-chain-lookup`, `beagle-tree` and `beagle-tree-lookup`. Others come from plugin files
(`--plugin path/to/file.py[:ARG]`), see `load_plugin`.
Outputs (`write_outputs`): bench.json, bench.md, acceptance.png and speedup.png.
"""

import datetime
import functools
import gc
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .allocator import heap_allocator
from .precision import DTYPES, bf16_is_native, warn_if_slow_bf16

logger = logging.getLogger(__name__)

BUILTIN_METHODS = ("plain", "prompt-lookup", "beagle-chain", "beagle-chain-lookup", "beagle-tree",
                   "beagle-tree-lookup")
REFERENCE_METHODS = ("plain-unpacked",)  # with --prepack: the same target through unpacked kernels
BASELINE = "plain"
# Relative spacing of bfloat16 numbers: 8 significant bits, so neighbours of magnitude m lie 2^-8·m to 2^-7·m apart.
BF16_RELATIVE_SPACING = 2.0**-7
VERIFY_CHUNKS = 16  # verification-forward widths tried by reproduce_in_chunks


class BeagleBenchError(ValueError):
    """A bench setting that cannot run (unknown method, missing checkpoint, bad plugin), with what to change."""


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class MethodRun:
    """What one generation returned.

    output_ids: the prompt followed by the new tokens, as `generate` returns them (`(1, length)` or `(length,)`).
    target_forwards: the number of target forwards, prefill included. None: the bench's own count (a forward hook on
        the target's decoder) is used, which is right for anything that calls the target model or its decoder.
    accepted_per_position: for draft methods, the share of rounds that drafted position i (1, 2, ...) whose token i
        was accepted; `drafted_per_position` (optional) the number of such rounds, used to pool prompts.
    draft_time_s: time spent drafting, when the method measures it.
    """

    output_ids: torch.Tensor
    target_forwards: int | None = None
    accepted_per_position: list[float] | None = None
    draft_time_s: float | None = None
    drafted_per_position: list[int] | None = None


@dataclass
class Method:
    """A named way to generate: `run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed)`.

    `input_ids` / `attention_mask` are `(1, prompt)` on the target's device. `do_sample=False` means greedy (then
    `temperature` is 0); with `do_sample=True` the method samples at `temperature` with no top-k / top-p truncation.
    The bench seeds torch (`torch.manual_seed(seed)`) right before each call; `seed` is passed for methods that keep
    their own generators. Returns a `MethodRun`.
    """

    name: str
    run: Callable[..., MethodRun]
    description: str = ""
    reference: bool = False  # another computation of the target (e.g. unpacked kernels): a greedy mismatch is shown,
    #                          not a lossless failure (status "reference")


def generation_kwargs(target, max_new_tokens: int, do_sample: bool, temperature: float) -> dict:
    """The generate settings every method shares: greedy, or pure temperature sampling (no top-k / top-p)."""
    config = target.generation_config
    pad = config.pad_token_id
    if pad is None:
        eos = config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
    if do_sample:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    return kwargs


def _beagle_run(output_ids, beagle) -> MethodRun:
    stats = beagle.generation_stats
    drafted = [sum(1 for d in stats.drafted if d > i) for i in range(max(stats.drafted, default=0))]
    return MethodRun(output_ids, accepted_per_position=stats.acceptance_per_position(), draft_time_s=stats.draft_time_s,
                     drafted_per_position=drafted)


def parse_tree_shape(value):
    """`auto`, `chain`, or `D,K,N[,P]` (depth, top_k, total_tokens, optional min_prob) for Beagle's own loop."""
    if value in (None, "auto", "chain"):
        return value or "auto"
    from modeling_beagle import TreeShape

    parts = [p.strip() for p in str(value).split(",")]
    try:
        if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts[:3]):
            raise ValueError
        min_prob = float(parts[3]) if len(parts) == 4 else 0.0
    except ValueError:
        raise BeagleBenchError(f"`--tree-shape` expected auto, chain or D,K,N[,P] (three integers, then optionally "
                               f"the pruning probability min_prob), found {value!r}.") from None
    return TreeShape(*(int(p) for p in parts[:3]), min_prob=min_prob)


def tree_shape_label(spec) -> str:
    """How a tree-shape spec is named in method names and descriptions: auto, chain, or D,K,N[,P]."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        from modeling_beagle import TreeShape

        spec = TreeShape(**spec)
    label = f"{spec.depth},{spec.top_k},{spec.total_tokens}"
    return label + (f",{spec.min_prob:g}" if spec.min_prob else "")


def check_method_names(names) -> None:
    """Refuse a method name that is not built-in (`--methods` names built-in methods only)."""
    for name in names:
        if name not in BUILTIN_METHODS + REFERENCE_METHODS:
            raise BeagleBenchError(f"method expected one of {list(BUILTIN_METHODS + REFERENCE_METHODS)}, found "
                                   f"{name!r}. A plugin's methods are not named in `--methods`: every method of a "
                                   f"`--plugin FILE.py[:ARG]` always runs.")


def builtin_methods(names, target, beagle=None, tree_shape="auto", prompt_lookup_num_tokens: int = 10) -> list[Method]:
    """The built-in methods named in `names` (see BUILTIN_METHODS), for `target` and an optional bound `beagle`.

    `tree_shape` is one spec (auto, chain, a TreeShape or a dict) or a list of them: with several, `beagle-tree` and
    `beagle-tree-lookup` are measured once per shape, named `beagle-tree[LABEL]` (a tree-size sweep in one run).
    """
    from modeling_beagle.decoding_beagle import (
        CHAIN_LOOKUP_MATCH,
        CHAIN_LOOKUP_MATCH_SAMPLING,
        LOOKUP_COPY_MATCH,
        LOOKUP_COPY_TOKENS,
        LOOKUP_TOKENS_PER_MATCH,
        resolve_tree_shape,
    )

    check_method_names(names)  # before "auto" tree shapes time this machine
    specs = list(tree_shape) if isinstance(tree_shape, (list, tuple)) else [tree_shape]
    labels = [tree_shape_label(spec) for spec in specs]
    if not specs or len(set(labels)) != len(labels):
        raise BeagleBenchError(f"tree shapes expected at least one, each once, found {labels}.")

    def plain(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed):
        out = target.generate(input_ids, attention_mask=attention_mask,
                              **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return MethodRun(out)

    def plain_unpacked(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed):
        from modeling_beagle import packed_path

        with packed_path(target, enabled=False):
            return plain(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed)

    def prompt_lookup(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed):
        out = target.generate(input_ids, attention_mask=attention_mask, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                              **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return MethodRun(out)

    def beagle_chain(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, lookup_tokens=0):
        """transformers' assisted loop with Beagle; `lookup_tokens` (prompt_lookup_num_tokens; 0: off, whatever the
        checkpoint's default) adds copy rounds."""
        out = target.generate(input_ids, attention_mask=attention_mask, assistant_model=beagle,
                              prompt_lookup_num_tokens=lookup_tokens,
                              **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(out, beagle)

    def beagle_tree(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed, shape, lookup_tokens=0):
        """Beagle's own loop with the resolved `shape`; `lookup_tokens` (prompt_lookup_num_tokens; 0: off, whatever
        the checkpoint's default) adds the lookup branch."""
        from modeling_beagle import beagle_generate

        out = target.generate(input_ids, attention_mask=attention_mask, custom_generate=beagle_generate, beagle=beagle,
                              tree_shape=shape, prompt_lookup_num_tokens=lookup_tokens,
                              **generation_kwargs(target, max_new_tokens, do_sample, temperature))
        return _beagle_run(out, beagle)

    chain = "chain"
    if beagle is not None:
        c = beagle.config
        chain = (f"{c.draft_schedule} chain (num_draft_tokens={c.num_draft_tokens}, max_draft_tokens="
                 f"{c.max_draft_tokens}, draft_confidence_threshold={c.draft_confidence_threshold})")
    table = {
        "plain": [Method("plain", plain, "target.generate")],
        "plain-unpacked": [Method("plain-unpacked", plain_unpacked, "target.generate with the target's linear layers "
                                  "unpacked (F.linear): what --prepack alone gains", reference=True)],
        "prompt-lookup": [Method("prompt-lookup", prompt_lookup,
                                 f"target.generate(prompt_lookup_num_tokens={prompt_lookup_num_tokens})")],
        "beagle-chain": [Method("beagle-chain", beagle_chain,
                                f"target.generate(assistant_model=beagle, prompt_lookup_num_tokens=0): {chain}")],
        "beagle-chain-lookup": [Method(
            "beagle-chain-lookup", functools.partial(beagle_chain, lookup_tokens=prompt_lookup_num_tokens),
            f"target.generate(assistant_model=beagle, prompt_lookup_num_tokens={prompt_lookup_num_tokens}): {chain}; a "
            f"round whose last {CHAIN_LOOKUP_MATCH} or more tokens ({CHAIN_LOOKUP_MATCH_SAMPLING} when sampling) "
            f"repeat an earlier passage verifies the {prompt_lookup_num_tokens} tokens that followed it instead (copy "
            "round, no draft)")],
        "beagle-tree": [],
        "beagle-tree-lookup": [],
    }
    if beagle is not None and {"beagle-tree", "beagle-tree-lookup"} & set(names):
        for spec, label in zip(specs, labels):
            shape = resolve_tree_shape(target, beagle, spec)  # "auto" measures this machine now, not in a timed run
            suffix = f"[{label}]" if len(specs) > 1 else ""
            tree = (f"tree_shape={label}: depth={shape.depth}, top_k={shape.top_k}, total_tokens={shape.total_tokens}, "
                    f"min_prob={shape.min_prob}")
            table["beagle-tree"].append(Method(f"beagle-tree{suffix}", functools.partial(beagle_tree, shape=shape),
                                               f"target.generate(custom_generate=beagle_generate, "
                                               f"prompt_lookup_num_tokens=0): {tree}"))
            table["beagle-tree-lookup"].append(Method(
                f"beagle-tree-lookup{suffix}",
                functools.partial(beagle_tree, shape=shape, lookup_tokens=prompt_lookup_num_tokens),
                f"target.generate(custom_generate=beagle_generate, prompt_lookup_num_tokens={prompt_lookup_num_tokens}): "
                f"{tree}, plus the prompt-lookup branch (its default rule: the longest repeated suffix, at most "
                f"{LOOKUP_TOKENS_PER_MATCH} tokens per matched token; in greedy decoding, copy mode from a "
                f"{LOOKUP_COPY_MATCH}-token match: {LOOKUP_COPY_TOKENS} lookup tokens, no draft)"))
    from modeling_beagle import is_prepacked

    methods = []
    for name in names:
        if name == "plain-unpacked" and not is_prepacked(target):
            raise BeagleBenchError("method 'plain-unpacked' compares against a prepacked target: pass `--prepack`, or "
                                   "leave it out of `--methods`.")
        if name.startswith("beagle") and beagle is None:
            raise BeagleBenchError(f"method {name!r} needs a Beagle checkpoint: pass `--beagle PATH`, or leave "
                                   f"{name!r} out of `--methods`.")
        methods.extend(table[name])
    return methods


def load_plugin(spec: str) -> tuple[Callable, str | None]:
    """Load a plugin given as `path/to/file.py[:ARG]`; return its `bench_methods` function and ARG (or None).

    The contract: the file (loaded by path, so it needs no package) defines

        def bench_methods(target, tokenizer, arg: str | None[, tree_shape=..., prompt_lookup_num_tokens=...])
            -> list[Method]

    which the bench calls once per target dtype, after loading the target (in eval mode, on its device) and its
    tokenizer, with ARG from the command line (e.g. a checkpoint folder). Each `Method(name, run)` must have a name not
    used by another method; its `run(input_ids, attention_mask, max_new_tokens, do_sample, temperature, seed)` must
    generate exactly as `target.generate` with the same settings would (greedy: token-identical in float32; sampling:
    the target's distribution at `temperature`, no top-k / top-p) and return a `MethodRun` (import both classes from
    `trainer.bench`). A factory that takes the keywords `tree_shape` / `prompt_lookup_num_tokens` also gets the bench's
    first `--tree-shape` spec and `--prompt-lookup-tokens` (`call_plugin`), to draft what `beagle-tree` and
    `beagle-tree-lookup` get. The bench counts the target's forwards itself (a hook on `target.get_decoder()`), so a
    plugin that runs the target through `target(...)` or its decoder needs to report nothing but `output_ids`; draft
    methods should also return `accepted_per_position` (and `drafted_per_position`, `draft_time_s`). With `--prepack`
    the target arrives packed (`modeling_beagle.is_prepacked(target)`): pack the plugin's draft too
    (`prepack_linear_weights`), as the bench packs Beagle's, so that drafts are compared alike.
    """
    match = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec)
    if match is None:
        raise BeagleBenchError(f"`--plugin` expected path/to/file.py[:ARG], found {spec!r}.")
    path, arg = Path(match.group(1)), match.group(2)
    if not path.is_file():
        raise BeagleBenchError(f"`--plugin` {spec!r}: expected a Python file, found no file at {path}.")
    module_name = f"beagle_bench_plugin_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    factory = getattr(module, "bench_methods", None)
    if not callable(factory):
        raise BeagleBenchError(f"`--plugin` {path}: expected a function `bench_methods(target, tokenizer, arg)`, found "
                               "none.")
    return factory, arg


def call_plugin(factory, target, tokenizer, arg, **options) -> list:
    """`factory(target, tokenizer, arg)`, plus each of the bench's `options` the factory takes by keyword
    (`tree_shape`: the first `--tree-shape` spec, unresolved; `prompt_lookup_num_tokens`): a plugin's own tree and
    lookup methods then draft what `beagle-tree` and `beagle-tree-lookup` get."""
    accepted = inspect.signature(factory).parameters
    return factory(target, tokenizer, arg, **{name: value for name, value in options.items() if name in accepted})


def load_beagle_for(target, path):
    """The Beagle checkpoint at `path` in the target's dtype and on its device, in eval mode, bound to it; its linear
    weights packed when the target's are (after `--prepack`), as a plugin's drafts are."""
    from modeling_beagle import BeagleModel, is_prepacked, prepack_linear_weights

    weight = next(target.parameters())
    beagle = BeagleModel.from_pretrained(path, dtype=weight.dtype).to(weight.device).eval()
    if is_prepacked(target):
        prepack_linear_weights(beagle)
    beagle.bind_target(target)
    return beagle


def load_methods(target, tokenizer, names, beagle_path=None, tree_shapes=("auto",), prompt_lookup_num_tokens: int = 10,
                 plugins=()) -> list[Method]:
    """The methods `beagle bench` measures on a loaded (and, with `--prepack`, packed) target: the built-in `names`,
    with the Beagle checkpoint at `beagle_path` loaded by `load_beagle_for`, then every plugin's (`(factory, arg)`
    pairs from `load_plugin`), given the bench's tree shape and lookup length."""
    beagle = load_beagle_for(target, beagle_path) if beagle_path else None
    methods = builtin_methods(names, target, beagle, list(tree_shapes), prompt_lookup_num_tokens)
    for factory, arg in plugins:
        methods += list(call_plugin(factory, target, tokenizer, arg, tree_shape=tree_shapes[0],
                                    prompt_lookup_num_tokens=prompt_lookup_num_tokens))
    return methods


# ----------------------------------------------------------------------------------------------- measuring
class ForwardCounter:
    """Counts forward calls of the target's decoder (`target.get_decoder()`, else the target itself) while active."""

    def __init__(self, target):
        getter = getattr(target, "get_decoder", None)
        decoder = getter() if callable(getter) else None
        self.module = decoder if isinstance(decoder, torch.nn.Module) else target
        self.count = 0
        self._handle = None

    def _hook(self, module, args):
        self.count += 1

    def __enter__(self):
        self.count = 0
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def _read_proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _read_proc_status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU; else the process's peak RSS.

    On Linux the kernel's own high-water mark (VmHWM) is reset before the block and read after it (exact, no
    sampling); elsewhere a thread samples RSS with psutil every 5 ms. `kind` says which was measured. The process
    also holds every model loaded for the bench (all methods share it), so `delta_mb` (the rise over the memory in use
    when the block started) is the method's own working memory.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.kind = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.kind = "process peak RSS (Linux VmHWM, reset per run)"
        else:
            self.kind = "process peak RSS (psutil, sampled every 5 ms)"
        self.peak_mb = self.start_mb = 0.0
        self._stop = None

    @staticmethod
    def _rss_mb() -> float:
        kb = _read_proc_status_kb("VmRSS")
        if kb is not None:
            return kb / 1024
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        elif self.kind.startswith("process peak RSS (Linux"):
            _reset_peak_rss()
            self.start_mb = self._rss_mb()
        else:
            self.start_mb = self.peak_mb = self._rss_mb()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._stop is None:
            self.peak_mb = _read_proc_status_kb("VmHWM") / 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())
        return False

    @property
    def delta_mb(self) -> float:
        return max(self.peak_mb - self.start_mb, 0.0)


def machine_info(device: torch.device) -> dict:
    """Where and with what the bench ran (flat, scalar values)."""
    import transformers

    import modeling_beagle

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": heap_allocator(),
        # jemalloc's MALLOC_CONF: with dirty_decay_ms:-1 (training's setting) freed pages stay in the process, so its
        # peak RSS climbs over a long bench (benchmarks/results/README.md, v8: +0.7 GB over 54 runs, +0.1 GB with
        # the default decay)
        "malloc_conf": os.environ.get("MALLOC_CONF", ""),
        # transformers' switch for grouped-query sdpa with a mask (README, Generation: faster verification on CPU)
        "transformers_sdpa_force_gqa": os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", ""),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "beagle": modeling_beagle.__version__,
    }
    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ------------------------------------------------------------------------------------------------- prompts
@dataclass
class Case:
    """One prompt to generate from: a chat (`turns` of user messages; answers to earlier turns are the target's own
    plain greedy replies), or pre-tokenized `input_ids`."""

    prompt_set: str
    id: str
    turn: int  # 1-based user turn that is answered
    turns: list[str] = field(default_factory=list)
    input_ids: list[int] | None = None


def spread(items: list, n: int | None) -> list:
    """`n` items spread evenly over `items` (MT-bench is ordered by category: the first n would be one category)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def prompt_cases(prompt_sets: dict[str, list[dict]], turns: str = "first", num_prompts: int | None = None) -> list[Case]:
    """Cases from prompt sets `{name: [{"id", "turns": [...]} or {"id", "input_ids": [...]}]}`.

    With `turns="both"`, prompts with a second user turn also give a second case, reported as the prompt set
    `<name>/turn-2` (the first-turn numbers stay comparable with `turns="first"`).
    """
    cases = []
    for name, rows in prompt_sets.items():
        chosen = spread(rows, num_prompts)
        for row in chosen:
            if "input_ids" in row:
                cases.append(Case(name, str(row["id"]), 1, input_ids=list(row["input_ids"])))
            else:
                cases.append(Case(name, str(row["id"]), 1, turns=list(row["turns"][:1])))
        if turns == "both":
            for row in chosen:
                if len(row.get("turns") or []) >= 2:
                    cases.append(Case(f"{name}/turn-2", str(row["id"]), 2, turns=list(row["turns"][:2])))
    return cases


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat through the tokenizer's chat template, ending with the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_turn_ids(tokenizer, text: str) -> list[int]:
    """A first user turn as prompt ids: through the chat template when the tokenizer has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text)["input_ids"]


# ------------------------------------------------------------------------------------------------ the bench
@dataclass
class BenchSettings:
    max_new_tokens: int = 256
    temperatures: tuple = (0.0, 1.0)
    dtypes: tuple = ("bfloat16", "float32")
    repeats: int = 3
    seed: int = 0
    turns: str = "first"
    num_prompts: int | None = None
    warmup: bool = True
    progress: bool = True


def _new_tokens(output_ids: torch.Tensor, prompt_len: int) -> list[int]:
    ids = output_ids[0] if output_ids.dim() == 2 else output_ids
    return ids[prompt_len:].tolist()


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def reproduce_in_chunks(target, ids: list[int], token: int, max_chunk: int = VERIFY_CHUNKS) -> int | None:
    """The smallest chunk size j (1..max_chunk) for which the target picks `token` after `ids` when it reads
    `ids[:-j]` in one forward and the last j tokens in a second forward over that cache, as a verification forward
    reads a draft; None when no such chunk gives `token`. The same weights and dtype on another summation order: a
    token found this way is one the target itself computes as its greedy choice."""
    from modeling_beagle.generation_beagle import cache_kwargs

    device = next(target.parameters()).device
    full = torch.tensor([ids], device=device)
    for j in range(1, min(max_chunk, len(ids) - 1) + 1):
        cache = cache_kwargs(target, DynamicCache(config=target.config))
        target(full[:, :-j], **cache, use_cache=True, logits_to_keep=1)
        logits = target(full[:, -j:], **cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        if int(logits.argmax()) == token:
            return j
    return None


@torch.no_grad()
def reproduce_reading_in_chunks(target, prompt_ids: list[int], reply_ids: list[int], token: int,
                                max_chunk: int = VERIFY_CHUNKS) -> int | None:
    """The smallest chunk size c (2..max_chunk) for which the target picks `token` after `prompt_ids + reply_ids`
    when it reads the prompt in one forward and the reply in consecutive forwards of c tokens over the cache (the
    last one shorter), as verification forwards read a speculative reply; None when no such c gives `token`.
    `reproduce_in_chunks` re-reads only the last j tokens, so the cached states of the rest keep one-token decoding's
    rounding; here every state of the reply carries a c-token forward's, as in the speculative run. (c = 1 is plain
    decoding itself.)"""
    from modeling_beagle.generation_beagle import cache_kwargs

    device = next(target.parameters()).device
    full = torch.tensor([prompt_ids + reply_ids], device=device)
    start = len(prompt_ids)
    cache = DynamicCache(config=target.config)
    prompt_out = target(full[:, :start], **cache_kwargs(target, cache), use_cache=True, logits_to_keep=1)  # once
    for c in range(2, max_chunk + 1):
        out = prompt_out
        for pos in range(start, full.shape[1], c):
            out = target(full[:, pos : pos + c], **cache_kwargs(target, cache), use_cache=True, logits_to_keep=1)
        if int(out.logits[0, -1].argmax()) == token:
            return c
        cache.crop(start - cache.get_seq_length())  # back to the prompt's states for the next chunk size
    return None


def _reproduced_label(divergence: dict) -> str:
    """How a divergence was reproduced: the j of `reproduce_in_chunks`, "c=" the chunk of `reproduce_reading_in_chunks`,
    or a dash."""
    if divergence.get("reproduced_chunk"):
        return str(divergence["reproduced_chunk"])
    if divergence.get("reproduced_reading_chunk"):
        return f"c={divergence['reproduced_reading_chunk']}"
    return "–"


@torch.no_grad()
def examine_divergence(target, prompt_ids: list[int], plain_new: list[int], other_new: list[int]) -> dict:
    """The target's logits at the first position where `other_new` leaves plain greedy, recomputed by one forward
    over the plain prefix (prompt + plain tokens before it), and whether the target itself picks the method's token.

    `within_rounding` holds when either:
    - the gap between the two chosen tokens' logits is at most 2^-7 · m, m the larger magnitude. bf16 keeps 8
      significant bits, so neighbouring bf16 numbers of magnitude m lie s = 2^(floor(log2 m) - 7) apart, between
      2^-8·m and 2^-7·m: the logits (the lm_head's bf16 output) are known only to that spacing. 2^-7 · m is one
      spacing (just under two when m sits just below a power of two); `gap_bf16_spacings` is the gap in units of s;
    - or `reproduced_chunk` is set: reading the same prefix with its last j tokens in one forward over the cache
      (`reproduce_in_chunks`, j = 1..16, the shape of a verification forward), the target's own greedy choice is the
      method's token. Rounding differences accumulated over the layers can exceed one spacing of the output; this
      shows the flip is the target's own arithmetic, not the method's choice;
    - or, when neither holds, `reproduced_reading_chunk` is set: reading the whole reply before that position in
      forwards of c tokens (`reproduce_reading_in_chunks`, c = 2..16), the target's own greedy choice is the
      method's token (the rounding of every cached state of the reply, not only the last few, then changes).
    A token the target never prefers on any of these forwards stays unexplained.
    """
    index = _first_difference(plain_new, other_new)
    record = {"position": index, "plain_token": None, "method_token": None}
    if index is None:
        return {**record, "within_rounding": True}
    plain_token = plain_new[index] if index < len(plain_new) else None
    method_token = other_new[index] if index < len(other_new) else None
    record.update(plain_token=plain_token, method_token=method_token)
    if plain_token is None or method_token is None:  # one output stopped earlier with the same prefix
        return {**record, "within_rounding": False, "note": "same prefix, different length"}
    device = next(target.parameters()).device
    prefix = prompt_ids + plain_new[:index]
    logits = target(torch.tensor([prefix], device=device), logits_to_keep=1).logits[0, -1].float()
    top2 = logits.topk(2).values
    a, b = float(logits[plain_token]), float(logits[method_token])
    magnitude = max(abs(a), abs(b), 1e-30)
    spacing = 2.0 ** (math.floor(math.log2(magnitude)) - 7)
    gap = abs(a - b)
    within_spacing = gap <= BF16_RELATIVE_SPACING * magnitude
    reproduced = None if within_spacing else reproduce_in_chunks(target, prefix, method_token)
    read = None
    if not within_spacing and reproduced is None and index > 0:
        read = reproduce_reading_in_chunks(target, prompt_ids, plain_new[:index], method_token)
    return {**record, "plain_logit": a, "method_logit": b, "gap": gap, "top2_gap": float(top2[0] - top2[1]),
            "gap_bf16_spacings": gap / spacing, "reproduced_chunk": reproduced, "reproduced_reading_chunk": read,
            "within_rounding": within_spacing or reproduced is not None or read is not None}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _pool_acceptance(runs: list[dict]) -> list[float] | None:
    rates = [r for r in runs if r.get("accepted_per_position") is not None]
    if not rates:
        return None
    width = max(len(r["accepted_per_position"]) for r in rates)
    pooled = []
    for i in range(width):
        num = den = 0.0
        for r in rates:
            if i < len(r["accepted_per_position"]):
                weights = r.get("drafted_per_position")
                w = weights[i] if weights is not None and i < len(weights) else 1.0
                num += r["accepted_per_position"][i] * w
                den += w
        pooled.append(num / den if den else None)
    return pooled


class _Setting:
    """One (prompt set, dtype, temperature) measurement over a list of cases with a fixed set of methods."""

    def __init__(self, target, tokenizer, methods: list[Method], dtype: str, temperature: float,
                 settings: BenchSettings, answers: dict):
        self.target, self.tokenizer, self.methods = target, tokenizer, methods
        self.dtype, self.temperature, self.settings = dtype, float(temperature), settings
        self.answers = answers  # (prompt set, id) -> the target's plain greedy first-turn answer, per dtype
        self.device = next(target.parameters()).device

    def prompt_ids(self, case: Case) -> list[int] | None:
        if case.input_ids is not None:
            return case.input_ids
        if case.turn > 1 and not getattr(self.tokenizer, "chat_template", None):
            return None  # no chat template: no faithful multi-turn prompt
        if self.tokenizer is None:
            raise BeagleBenchError(f"case {case.id}: text prompts need a tokenizer.")
        if case.turn == 1:
            return first_turn_ids(self.tokenizer, case.turns[0])
        key = (case.prompt_set.split("/")[0], case.id)
        if key not in self.answers:
            first = torch.tensor([first_turn_ids(self.tokenizer, case.turns[0])], device=self.device)
            out = self.target.generate(first, attention_mask=torch.ones_like(first),
                                       **generation_kwargs(self.target, self.settings.max_new_tokens, False, 0.0))
            self.answers[key] = self.tokenizer.decode(out[0, first.shape[1]:], skip_special_tokens=True)
        return encode_chat(self.tokenizer, [{"role": "user", "content": case.turns[0]},
                                            {"role": "assistant", "content": self.answers[key]},
                                            {"role": "user", "content": case.turns[1]}])

    def _timed(self, method: Method, ids: torch.Tensor, max_new_tokens: int, seed: int):
        """One timed generation: (MethodRun, raw record, new tokens, memory kind)."""
        do_sample = self.temperature > 0
        counter = ForwardCounter(self.target)
        memory = PeakMemory(self.device)
        gc.collect()
        torch.manual_seed(seed)
        with memory, counter, torch.no_grad():
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = method.run(ids, torch.ones_like(ids), max_new_tokens, do_sample, self.temperature, seed)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        forwards = result.target_forwards if result.target_forwards is not None else counter.count
        new = _new_tokens(result.output_ids, ids.shape[1])
        raw = {"time_s": elapsed, "new_tokens": len(new), "target_forwards": forwards,
               "tau": (len(new) - 1) / (forwards - 1) if forwards > 1 and len(new) > 1 else None,
               "peak_memory_mb": memory.peak_mb, "peak_memory_delta_mb": memory.delta_mb,
               "accepted_per_position": result.accepted_per_position,
               "drafted_per_position": result.drafted_per_position, "draft_time_s": result.draft_time_s}
        return result, raw, new, memory.kind

    def run(self, cases: list[Case], bar) -> tuple[list[dict], list[dict]]:
        settings = self.settings
        prompts = []
        for case in cases:
            ids = self.prompt_ids(case)
            if ids is None:
                logger.warning("%s %s: the tokenizer has no chat template; second turns are skipped", case.prompt_set,
                               case.id)
                continue
            prompts.append((case, ids))
        if settings.warmup and prompts:
            ids = torch.tensor([prompts[0][1]], device=self.device)
            for method in self.methods:  # first-call costs: lazy init, kernels, Beagle's verification-cost curve
                self._timed(method, ids, min(settings.max_new_tokens, 32), settings.seed)
        runs, memory_kind = [], None
        names = [m.name for m in self.methods]
        for p, (case, ids_list) in enumerate(prompts):
            ids = torch.tensor([ids_list], device=self.device)
            seed = settings.seed + p
            outputs = {name: [] for name in names}
            for r in range(settings.repeats):
                shift = (p * settings.repeats + r) % len(self.methods)
                order = self.methods[shift:] + self.methods[:shift]
                for slot, method in enumerate(order):
                    _, raw, new, memory_kind = self._timed(method, ids, settings.max_new_tokens, seed)
                    outputs[method.name].append(new)
                    runs.append({"prompt_set": case.prompt_set, "dtype": self.dtype, "temperature": self.temperature,
                                 "method": method.name, "prompt_id": case.id, "turn": case.turn,
                                 "prompt_tokens": len(ids_list), "repeat": r, "order": slot, "seed": seed, **raw})
                    bar.update(1)
            if self.temperature == 0:
                reference = outputs[BASELINE][0]
                for name in names:
                    same = all(o == reference for o in outputs[name])
                    divergence = None
                    if not same:
                        other = next(o for o in outputs[name] if o != reference)
                        divergence = examine_divergence(self.target, ids_list, reference, other)
                        divergence.update(prompt_id=case.id, method=name)
                    for run in runs[-len(names) * settings.repeats:]:
                        if run["method"] == name:
                            run["identical"] = same
                            run["divergence"] = divergence
        return runs, memory_kind

    def summarize(self, prompt_set: str, runs: list[dict], memory_kind: str) -> list[dict]:
        by_method: dict[str, dict[str, list[dict]]] = {}
        for run in runs:
            by_method.setdefault(run["method"], {}).setdefault(run["prompt_id"], []).append(run)

        def per_prompt(name):  # prompt id -> (median time, new tokens of the first repeat)
            return {pid: (statistics.median(r["time_s"] for r in rs), rs[0]["new_tokens"])
                    for pid, rs in by_method.get(name, {}).items()}

        plain = per_prompt(BASELINE)
        plain_total = sum(n for _, n in plain.values()) / max(sum(t for t, _ in plain.values()), 1e-12)
        # With the unpacked reference measured too: per prompt, the faster of the two plain layouts (packing can slow
        # a target down, fp32 on some CPUs), so a speedup never rests on the slower baseline.
        unpacked = per_prompt(REFERENCE_METHODS[0])
        fastest_plain = {pid: max(n / t, unpacked[pid][1] / unpacked[pid][0]) if pid in unpacked else None
                         for pid, (t, n) in plain.items()} if unpacked else {}
        results = []
        for method in self.methods:
            mine = per_prompt(method.name)
            flat = [r for rs in by_method.get(method.name, {}).values() for r in rs]
            if not flat:
                continue
            tps = {pid: n / t for pid, (t, n) in mine.items() if t > 0}
            ratios = [tps[pid] / (plain[pid][1] / plain[pid][0]) for pid in tps
                      if pid in plain and plain[pid][1] > 0 and tps[pid] > 0]
            total_tps = sum(n for _, n in mine.values()) / max(sum(t for t, _ in mine.values()), 1e-12)
            over_fastest = [tps[pid] / fastest_plain[pid] for pid in tps if fastest_plain.get(pid)]
            tokens = sum(r["new_tokens"] - 1 for r in flat if r["tau"] is not None)
            forwards = sum(r["target_forwards"] - 1 for r in flat if r["tau"] is not None)
            draft_times = [r["draft_time_s"] for r in flat if r["draft_time_s"] is not None]
            result = {
                "prompt_set": prompt_set, "temperature": self.temperature, "dtype": self.dtype, "method": method.name,
                "description": method.description,
                "tau": tokens / forwards if forwards else None,
                "tokens_per_s": _median(tps.values()),
                "speedup": _median(ratios),
                "speedup_total": total_tps / plain_total if plain_total else None,
                "speedup_over_fastest_plain": _median(over_fastest) if over_fastest else None,
                "tokens_per_s_total": total_tps,
                "peak_memory_mb": max(r["peak_memory_mb"] for r in flat),
                "peak_memory_delta_mb": max(r["peak_memory_delta_mb"] for r in flat),
                "peak_memory_kind": memory_kind,
                "acceptance_per_position": _pool_acceptance(flat),
                "draft_time_share": (sum(draft_times) / sum(r["time_s"] for r in flat) if draft_times else None),
                "num_prompts": len(mine),
                "mean_new_tokens": statistics.mean(n for _, n in mine.values()),
                "identical_share": None, "status": "unchecked", "divergences": [],
            }
            if self.temperature == 0:
                identical = {pid: all(r["identical"] for r in rs) for pid, rs in by_method[method.name].items()}
                result["identical_share"] = sum(identical.values()) / len(identical)
                result["divergences"] = [rs[0]["divergence"] for pid, rs in by_method[method.name].items()
                                         if not identical[pid]]
                if method.reference:
                    result["status"] = "reference"
                elif self.dtype == "float32":
                    result["status"] = "valid" if all(identical.values()) else "invalid"
                else:
                    explained = all(d["within_rounding"] for d in result["divergences"])
                    result["status"] = "valid" if explained else "suspect"
            results.append(result)
        return results


def bench(load: Callable[[str], tuple], prompt_sets: dict[str, list[dict]], settings: BenchSettings) -> dict:
    """Run the whole bench and return the report (the dict written to bench.json).

    `load(dtype_name)` returns `(target, tokenizer, methods)` for one target dtype: the target in eval mode on its
    device, its tokenizer (None when every prompt carries `input_ids`), and the `Method`s to measure (`plain` is
    required: it is the baseline and the greedy reference). `prompt_sets` maps a prompt-set name to its prompts
    (`[{"id", "turns": [...]}]` as `trainer.assets.load_prompts` returns them, or `[{"id", "input_ids": [...]}]`).
    """
    cases = prompt_cases(prompt_sets, settings.turns, settings.num_prompts)
    set_names = list(dict.fromkeys(c.prompt_set for c in cases))
    results, runs, machine, memory_kinds, methods_seen = [], [], None, set(), {}
    for dtype in settings.dtypes:
        target, tokenizer, methods = load(dtype)
        names = [m.name for m in methods]
        if BASELINE not in names:
            raise BeagleBenchError(f"methods expected to include {BASELINE!r} (the baseline), found {names}.")
        if len(set(names)) != len(names):
            raise BeagleBenchError(f"method names expected unique, found {names}.")
        methods_seen.update({m.name: m.description for m in methods})
        device = next(target.parameters()).device
        machine = machine or machine_info(device)
        answers: dict = {}
        for temperature in settings.temperatures:
            for set_name in set_names:
                chosen = [c for c in cases if c.prompt_set == set_name]
                setting = _Setting(target, tokenizer, methods, dtype, temperature, settings, answers)
                total = len(chosen) * settings.repeats * len(methods)
                with tqdm(total=total, desc=f"{set_name} {dtype} T={temperature:g}", unit="run",
                          disable=not settings.progress, leave=True) as bar:
                    set_runs, kind = setting.run(chosen, bar)
                memory_kinds.add(kind)
                runs += set_runs
                results += setting.summarize(set_name, set_runs, kind)
        del target, methods
        gc.collect()
    invalid = [f"{r['prompt_set']} {r['dtype']} T={r['temperature']:g} {r['method']}" for r in results
               if r["status"] == "invalid"]
    suspect = [f"{r['prompt_set']} {r['dtype']} T={r['temperature']:g} {r['method']}" for r in results
               if r["status"] == "suspect"]
    return {
        "benchmark": "beagle bench",
        "valid": not invalid,
        "invalid": invalid,
        "suspect": suspect,
        "machine": machine,
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
                        if k != "progress"},
                     "prompt_sets": set_names, "methods": list(methods_seen),
                     "method_descriptions": methods_seen, "peak_memory_kind": sorted(k for k in memory_kinds if k),
                     "timing": "per prompt: median wall time of `repeats` runs; methods interleaved in a rotating "
                               "order; tau = (new tokens - 1) / (target forwards - 1), prefill excluded",
                     "sampling": "temperature > 0: pure temperature sampling (top_k=0, top_p=1), torch seeded with "
                                 "seed + prompt index before every run"},
        "results": results,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------------ outputs
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(report: dict) -> str:
    fastest = any(r.get("speedup_over_fastest_plain") is not None for r in report["results"])
    header = ["prompt set", "dtype", "T", "method", "τ", "tokens/s", "speedup (median / total)",
              *(["speedup over faster plain"] if fastest else []), "peak memory MB (Δ)",
              "identical", "acceptance per position", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report["results"]:
        acceptance = r["acceptance_per_position"]
        acceptance = " ".join(_fmt(a) for a in acceptance[:8]) if acceptance else "–"
        status = r["status"].upper() if r["status"] in ("invalid", "suspect") else r["status"]
        lines.append("| " + " | ".join([
            r["prompt_set"], r["dtype"], f"{r['temperature']:g}", r["method"], _fmt(r["tau"]), _fmt(r["tokens_per_s"], 1),
            f"{_fmt(r['speedup'])} / {_fmt(r['speedup_total'])}",
            *([_fmt(r.get("speedup_over_fastest_plain"))] if fastest else []),
            f"{_fmt(r['peak_memory_mb'], 0)} ({_fmt(r['peak_memory_delta_mb'], 0)})",
            _fmt(r["identical_share"]), acceptance, status]) + " |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    machine, settings = report["machine"] or {}, report["settings"]
    verdict = "VALID" if report["valid"] else "INVALID (float32 greedy output differs from plain greedy: " + \
        ", ".join(report["invalid"]) + ")"
    parts = [
        "# beagle bench", "",
        f"**{verdict}**" + (f"; bf16 divergences not explained by a rounding tie: {', '.join(report['suspect'])}"
                            if report["suspect"] else ""), "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in machine.items() if v not in ("", None)) + ".", "",
        "Settings: " + ", ".join(f"{k}: {v}" for k, v in settings.items()
                                 if k not in ("method_descriptions", "timing", "sampling")) + ".", "",
        f"Timing: {settings['timing']}. Sampling: {settings['sampling']}. Speedup: the method's tokens/s over plain "
        "`generate`'s on the same prompt, median over prompts / ratio of totals, measured in this run (with --prepack, "
        "speedup over faster plain: over the faster of plain and plain-unpacked on each prompt, median). Peak memory: "
        f"{', '.join(settings['peak_memory_kind'])}; in parentheses its rise during the run (all models of the bench "
        "share one process). Identical: share of prompts whose greedy output equals plain greedy in every repeat.", "",
        markdown_table(report), "",
        "Methods: " + "; ".join(f"`{k}`: {v}" for k, v in settings["method_descriptions"].items()) + ".",
    ]
    divergences = [(r, d) for r in report["results"] for d in r["divergences"]]
    if divergences:
        parts += ["", "## Divergences from plain greedy", "",
                  "The target's logits recomputed at the first differing position on the plain prefix. Within rounding: "
                  "the two tokens' logits differ by at most 2^-7 of their magnitude (about one bf16 spacing), or the "
                  "target itself picks the method's token when it reads the prefix's last j tokens in one forward over "
                  "the cache (j = 1..16, a verification forward's shape; the reproducing j is given), or when it "
                  "reads the whole reply before that position in forwards of c tokens (c = 2..16; given as c=).", "",
                  "| prompt set | dtype | method | prompt | position | tokens (plain / method) | logits | gap (bf16 "
                  "spacings) | reproduced at j | within rounding |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r, d in divergences:
            parts.append(f"| {r['prompt_set']} | {r['dtype']} | {r['method']} | {d.get('prompt_id')} | "
                         f"{d.get('position')} | {d.get('plain_token')} / {d.get('method_token')} | "
                         f"{_fmt(d.get('plain_logit'), 4)} / {_fmt(d.get('method_logit'), 4)} | "
                         f"{_fmt(d.get('gap'), 4)} ({_fmt(d.get('gap_bf16_spacings'), 1)}) | "
                         f"{_reproduced_label(d)} | {d['within_rounding']} |")
    return "\n".join(parts) + "\n"


def _setting_label(r: dict) -> str:
    return f"{r['prompt_set']}\n{r['dtype']} T={r['temperature']:g}"


def write_plots(report: dict, output_dir: Path) -> list[str]:
    """acceptance.png (acceptance per draft position, one panel per setting) and speedup.png (speedup per method,
    grouped by setting). Returns the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'beagle-spec[bench]'): no plots written")
        return []
    results = report["results"]
    labels = list(dict.fromkeys(_setting_label(r) for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    written = []

    cols = min(len(labels), 3) or 1
    rows = max(1, math.ceil(len(labels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for r in results:
            if _setting_label(r) == label and r["acceptance_per_position"]:
                rates = r["acceptance_per_position"]
                ax.plot(range(1, len(rates) + 1), rates, marker="o", label=r["method"], color=colors[r["method"]])
        ax.set_title(label.replace("\n", ", "), fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle("Acceptance per draft position (rounds that drafted position i)", fontsize=10)
    fig.tight_layout()
    fig.savefig(output_dir / "acceptance.png", dpi=120)
    plt.close(fig)
    written.append("acceptance.png")

    methods = [m for m in methods if m != BASELINE]  # 1.0 by definition: the dashed line
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 3), 3.8))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        for i, label in enumerate(labels):
            row = next((r for r in results if r["method"] == method and _setting_label(r) == label), None)
            if row is None or row["speedup"] is None:
                continue
            bad = row["status"] in ("invalid", "suspect")
            ax.bar(i + (j - (len(methods) - 1) / 2) * width, row["speedup"], width, color=colors[method],
                   hatch="//" if bad else None, edgecolor="black" if bad else None, label=method)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("speedup over plain generate")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_title("Speedup (median over prompts; hatched: invalid / suspect)", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / "speedup.png", dpi=120)
    plt.close(fig)
    written.append("speedup.png")
    return written


def write_outputs(report: dict, output_dir) -> dict:
    """Write bench.json, bench.md, acceptance.png and speedup.png into `output_dir`; returns the report as written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report["plots"] = write_plots(report, output_dir)
    report["markdown_table"] = markdown_table(report)
    (output_dir / "bench.md").write_text(render_markdown(report))
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


# ------------------------------------------------------------------------------------------------ the command
def run_from_args(args) -> int:
    """`beagle bench` (argparse namespace from `trainer.cli`): load, measure, write; exit code 1 if invalid."""
    from .assets import is_folder_or_hub_id, load_prompts, load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise BeagleBenchError(f"`--device` expected cpu, cuda or cuda:N, found {args.device!r}.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BeagleBenchError(f"`--device {args.device}` expected a CUDA GPU, found none (torch "
                               f"{torch.__version__}); leave it out or pass `--device cpu`.")
    split = lambda value: [v.strip() for v in value.split(",") if v.strip()]  # noqa: E731
    if not split(args.prompt_sets):
        raise BeagleBenchError(f"`--prompt-sets` expected at least one of mt-bench, humaneval, found "
                               f"{args.prompt_sets!r}.")
    try:
        temperatures = tuple(float(t) for t in split(args.temperatures))
    except ValueError:
        temperatures = ()
    if not temperatures or any(not t >= 0 for t in temperatures):
        raise BeagleBenchError(f"`--temperatures` expected comma-separated numbers >= 0 (0 = greedy), found "
                               f"{args.temperatures!r}.")
    # Default: bf16 and fp32 where bf16 is native, fp32 alone where torch only emulates bf16 (it would take hours).
    dtypes = split(args.dtypes) if args.dtypes else (["bfloat16", "float32"] if bf16_is_native(device) else ["float32"])
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise BeagleBenchError(f"`--dtypes` expected names among {list(DTYPES)}, found {dtype!r}.")
        if dtype == "bfloat16":
            warn_if_slow_bf16("`beagle bench --dtypes bfloat16` runs the target", device)
    names = split(args.methods)
    check_method_names(names)  # before any download or model load
    if args.beagle and not is_folder_or_hub_id(args.beagle):
        raise BeagleBenchError(f"`--beagle` expected a Beagle checkpoint folder or a Hub id (org/name), found no folder "
                               f"at {args.beagle!r}.")
    if args.prepack:
        if device.type != "cpu":
            raise BeagleBenchError(f"`--prepack` packs the target's linear layers for CPU inference; the device is "
                                   f"{device.type}. Leave it out, or pass `--device cpu`.")
        if "plain-unpacked" not in names:
            names.append("plain-unpacked")  # what packing alone gains, measured in the same run
    if BASELINE not in names:
        names = [BASELINE] + names  # the baseline and greedy reference is always measured
    if any(n.startswith("beagle") for n in names) and not args.beagle:
        raise BeagleBenchError("methods beagle-chain / beagle-tree (and their -lookup forms) need `--beagle PATH` (a "
                               "Beagle checkpoint folder); pass it or choose `--methods plain,prompt-lookup`.")
    tree_shapes = [parse_tree_shape(spec) for spec in (args.tree_shape or ["auto"])]
    plugins = [load_plugin(spec) for spec in (args.plugin or [])]
    prompt_sets = {name: load_prompts(name, turns="both" if args.turns == "both" and name == "mt-bench" else "first")
                   for name in split(args.prompt_sets)}

    def load(dtype_name: str):
        import modeling_beagle  # noqa: F401  (installs the generate hook)
        from modeling_beagle import prepack_linear_weights

        target, tokenizer = load_target(args.target, DTYPES[dtype_name], device=device)
        if args.prepack:
            prepack_linear_weights(target)
        methods = load_methods(target, tokenizer, names, args.beagle, tree_shapes, args.prompt_lookup_tokens, plugins)
        return target, tokenizer, methods

    settings = BenchSettings(max_new_tokens=args.max_new_tokens, temperatures=temperatures, dtypes=tuple(dtypes),
                             repeats=args.repeats, seed=args.seed, turns=args.turns, num_prompts=args.num_prompts,
                             progress=not args.no_progress)
    report = bench(load, prompt_sets, settings)
    report["settings"].update(target=args.target, beagle=args.beagle, tree_shape=", ".join(map(tree_shape_label, tree_shapes)),
                              prompt_lookup_num_tokens=args.prompt_lookup_tokens, plugins=list(args.plugin or []),
                              prepack=bool(args.prepack))
    report = write_outputs(report, args.output_dir)
    print(report["markdown_table"])
    out = Path(args.output_dir)
    print(f"[beagle bench] written: {out / 'bench.json'}, {out / 'bench.md'}"
          + "".join(f", {out / p}" for p in report["plots"]))
    if report["suspect"]:
        print("[beagle bench] bf16 divergences not within rounding of a tie: " + ", ".join(report["suspect"]))
    if not report["valid"]:
        print("[beagle bench] INVALID: float32 greedy output differs from plain greedy for " + ", ".join(report["invalid"])
              + ("" if not args.allow_mismatch else " (ignored: --allow-mismatch)"))
        return 0 if args.allow_mismatch else 1
    return 0


def _count(least: int):
    """An argparse type: an integer of at least `least`, refused with what was expected otherwise."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, found {text!r}")
        return value

    return parse


def add_arguments(parser) -> None:
    """The options of `beagle bench` (used by `trainer.cli`)."""
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="target model (Hub id or folder)")
    parser.add_argument("--beagle", default=None, help="Beagle checkpoint folder (needed by beagle-chain / beagle-tree)")
    parser.add_argument("--prompt-sets", default="mt-bench,humaneval", help="comma-separated: mt-bench, humaneval")
    parser.add_argument("--turns", choices=("first", "both"), default="first",
                        help="MT-bench: first turns, or also second turns (after the target's own greedy answer)")
    parser.add_argument("--num-prompts", type=_count(1), default=None, help="prompts per set, spread over the set (all)")
    parser.add_argument("--max-new-tokens", type=_count(1), default=256)
    parser.add_argument("--temperatures", default="0,1", help="comma-separated; 0 = greedy")
    parser.add_argument("--dtypes", default=None, help="comma-separated target dtypes (default: bfloat16,float32 "
                        "where the device computes bf16 natively, else float32)")
    parser.add_argument("--methods", default=",".join(BUILTIN_METHODS),
                        help=f"comma-separated among {', '.join(BUILTIN_METHODS + REFERENCE_METHODS)} (plain is always "
                             "measured; a --plugin's methods always run and are not named here)")
    parser.add_argument("--prepack", action="store_true",
                        help="CPU: pack the linear weights of the target and of every draft for oneDNN once "
                             "(modeling_beagle.prepack_linear_weights); adds plain-unpacked, the same target unpacked")
    parser.add_argument("--tree-shape", action="append", default=None,
                        help="beagle-tree: auto (default), chain, or D,K,N[,P] (depth, top-k, nodes, and optionally "
                        "min_prob: prune paths the draft gives less than P; auto and chain use the draft's "
                        "draft_confidence_threshold). Repeat it for a tree-size sweep in one run: the tree methods are "
                        "then measured once per shape, named beagle-tree[SHAPE] and beagle-tree-lookup[SHAPE]")
    parser.add_argument("--prompt-lookup-tokens", type=_count(0), default=10,
                        help="tokens proposed per round by prompt-lookup, by beagle-chain-lookup's copy rounds and by "
                             "beagle-tree-lookup's lookup branch")
    parser.add_argument("--repeats", type=_count(1), default=3, help="runs per prompt and method (median taken)")
    parser.add_argument("--threads", type=_count(1), default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (+1 per prompt)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py[:ARG]",
                        help="a Python file defining bench_methods(target, tokenizer, arg) -> list[Method] (repeatable)")
    parser.add_argument("--output-dir", default="bench", help="where bench.json, bench.md and the plots go")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="exit 0 even when a float32 greedy output differs from plain greedy")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


__all__ = ["BUILTIN_METHODS", "REFERENCE_METHODS", "BeagleBenchError", "BenchSettings", "Case", "ForwardCounter",
           "Method", "MethodRun", "PeakMemory", "add_arguments", "bench", "builtin_methods", "check_method_names",
           "examine_divergence", "generation_kwargs", "load_plugin", "markdown_table", "parse_tree_shape",
           "prompt_cases", "render_markdown", "run_from_args", "tree_shape_label", "write_outputs", "write_plots"]
