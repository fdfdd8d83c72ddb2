"""`beagle train`: data preparation and both training stages, end to end, for a target and a dataset."""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, field

import torch
import yaml
from transformers import HfArgumentParser, IntervalStrategy
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from modeling_beagle import BeagleModel

from .allocator import heap_allocator, warn_if_page_faulting_allocator
from .assets import load_prompts, load_target, resolve_dataset_arg
from .beagle_trainer import BeagleTrainer, BeagleTrainingArguments
from .callbacks import ComputeLedger, SpeculativeEvalCallback
from .data import build_dataset, render_chat, require_counts
from .offline_cache import build_offline_cache
from .precision import resolve_dtype
from .regenerate import regenerate

logger = logging.getLogger("beagle.train")


@dataclass
class BeagleModelArguments:
    target_model: str = field(metadata={"help": "target model: a local folder or a Hub id"})
    gguf_file: str | None = field(default=None, metadata={"help": "a GGUF file inside `target_model` to load"})
    target_dtype: str = field(default="auto", metadata={
        "help": "dtype of the frozen target: auto (bfloat16 where the device computes it natively, else float32), "
                "float32 or bfloat16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Beagle's attention kernel"})
    target_layer_ids: list[int] = field(default_factory=lambda: [-1], metadata={"help": "target layers feeding keys"})
    draft_vocab_size: int | None = field(default=None, metadata={
        "help": "reduced draft vocabulary: the most frequent assistant tokens of the training data"})
    init_from: str | None = field(default=None, metadata={"help": "continue from this Beagle checkpoint"})
    num_attention_heads: int | None = field(default=None, metadata={
        "help": "a fresh Beagle's query heads (default: the target's; head_dim follows hidden_size / heads)"})
    num_key_value_heads: int | None = field(default=None, metadata={
        "help": "a fresh Beagle's key/value heads (default: the target's). More than a GQA target's lets the values "
                "carry more of each target state"})
    intermediate_size: int | None = field(default=None, metadata={
        "help": "a fresh Beagle's MLP width (default: the target's)"})
    recency_bias: bool = field(default=False, metadata={
        "help": "a fresh Beagle adds a learned per-head distance penalty to its attention scores (ALiBi-style), so "
                "heads can favour the most recent target states (BeagleConfig.recency_bias)"})
    query_newest_state: bool = field(default=False, metadata={
        "help": "a fresh Beagle adds a projection of the newest state each query may read to its token embedding "
                "(EAGLE-style fusion; a departure from the paper's pure cross-attention: "
                "BeagleConfig.query_newest_state)"})
    context_next_token: bool = field(default=False, metadata={
        "help": "a fresh Beagle reads every context state together with the token that followed it (EAGLE-style "
                "fusion; a departure from the paper's keys: BeagleConfig.context_next_token)"})


@dataclass
class BeagleDataArguments:
    dataset: str = field(metadata={"help": "JSON/JSONL file: ShareGPT conversations, chat messages or text"})
    max_length: int = field(default=1024, metadata={"help": "truncate tokenized conversations to this length"})
    max_records: int | None = field(default=None, metadata={"help": "use at most this many records"})
    skip_records: int = field(default=0, metadata={
        "help": "leave out the source's first records (a continuation with `--init_from` trains on records the "
                "draft has not seen, and holds out some of them)"})
    eval_records: int = field(default=32, metadata={"help": "held-out records for the α-per-position evaluation"})
    regenerate: bool = field(default=False, metadata={
        "help": "first rewrite the first assistant turn of each conversation with the target itself (greedy, "
                "batched, resumable) into <output_dir>/regenerated.jsonl, and train on that"})
    regenerate_records: int | None = field(default=None, metadata={"help": "conversations to regenerate"})
    regenerate_batch_size: int = field(default=32, metadata={"help": "prompts generated together"})
    regenerate_max_new_tokens: int = field(default=256, metadata={"help": "length limit of a regenerated reply"})
    regenerate_max_prompt_tokens: int = field(default=256, metadata={"help": "longer prompts are skipped"})
    offline_cache_dir: str | None = field(default=None, metadata={
        "help": "run the target once over the data into this folder (states + top-k soft labels over the draft "
                "vocabulary; resumable) and train from it instead of running the target at every step"})
    offline_topk: int = field(default=32, metadata={"help": "soft-label probabilities kept per supervised token"})
    tau_eval_prompts: int = field(default=0, metadata={
        "help": "at each evaluation also decode this many MT-bench first turns greedily with the draft and log τ and "
                "the training wall time (the learning curve, also appended to <output_dir>/tau_curve.jsonl); needs "
                "--eval_strategy steps"})
    tau_eval_new_tokens: int = field(default=48, metadata={"help": "new tokens per τ-evaluation prompt"})

    def __post_init__(self):
        require_counts(self, {"max_length": 2, "max_records": 1, "skip_records": 0, "eval_records": 0,
                              "regenerate_records": 1, "regenerate_batch_size": 1, "regenerate_max_new_tokens": 1,
                              "regenerate_max_prompt_tokens": 1, "offline_topk": 1, "tau_eval_prompts": 0,
                              "tau_eval_new_tokens": 1}, optional=("max_records", "regenerate_records"))


class BeagleArgumentError(ValueError):
    """A `beagle train` / `regenerate` option that is unknown or out of range, with what was expected."""


@contextlib.contextmanager
def argument_errors():
    """Report HfArgumentParser's unknown options and the argument classes' checks (ValueError) as
    `BeagleArgumentError`."""
    try:
        yield
    except ValueError as error:
        raise BeagleArgumentError(str(error)) from error


@argument_errors()
def parse(argv: list[str]):
    """`beagle train --option value ...`, or `beagle train options.yaml|.json [--option value ...]`: the file's
    options, each overridable on the command line (`beagle train recipe.yaml --resume_from_checkpoint true`). An
    unknown option or a value out of range raises `BeagleArgumentError`."""
    parser = HfArgumentParser((BeagleModelArguments, BeagleDataArguments, BeagleTrainingArguments))
    for action in parser._actions:
        if action.dest == "bf16":  # HfArgumentParser reads `bool | str` as a bool: `--bf16 auto` is the default's name
            action.type = _bool_or_auto
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        with open(argv[0], encoding="utf-8") as handle:
            values = json.load(handle) if argv[0].endswith(".json") else yaml.safe_load(handle)
        if not isinstance(values, dict):
            raise ValueError(f"{argv[0]}: expected a mapping of `beagle train` options, found {type(values).__name__}.")
        for action in parser._actions:  # the command line: only the options it names, to override the file's
            action.default, action.required = argparse.SUPPRESS, False
        overrides = vars(parser.parse_args(argv[1:]))
        values = file_values_typed(values, argv[0])
        return parser.parse_dict({**values, **overrides})  # an unknown option in the file is an error here
    return parser.parse_args_into_dataclasses(args=argv)


def _bool_or_auto(value: str) -> bool | str:
    """`--bf16`'s value: true / false words, or auto."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return _typed(bool, value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, found {value!r}") from None


def _option_types() -> dict[str, tuple[type, bool, bool]]:
    """Each option's scalar type (bool, int or float), whether it is a list of them, and whether None is allowed; only
    options of exactly those types (not `bf16: bool | str`, not strings or dicts)."""
    kinds = {}
    for options in (BeagleModelArguments, BeagleDataArguments, BeagleTrainingArguments):
        hints = typing.get_type_hints(options)
        for option in dataclasses.fields(options):
            hint = hints.get(option.name)
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = type(None) in typing.get_args(hint)
            if typing.get_origin(hint) is list and len(args) == 1 and args[0] in (bool, int, float):
                kinds[option.name] = (args[0], True, False)
            elif hint in (bool, int, float):
                kinds[option.name] = (hint, False, False)
            elif optional and len(args) == 1 and args[0] in (bool, int, float):
                kinds[option.name] = (args[0], False, True)
    return kinds


def _typed(kind: type, value):
    """`value` (from a YAML or JSON file) as `kind`, read as the command line reads it: YAML reads 1e-4 as the string
    "1e-4", and a quoted "false" would be a true string."""
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    if kind is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
    elif isinstance(value, str):
        return kind(value.strip())  # ValueError when it does not read as one
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ValueError


def file_values_typed(values: dict, path: str) -> dict:
    """A YAML/JSON file's options with the types the command line would give them, or a ValueError naming the option,
    the expected type and the value found."""
    kinds = _option_types()
    typed = dict(values)
    for name, value in values.items():
        if name not in kinds:
            continue  # an unknown option is refused by the parser; strings and dicts are checked by the options
        kind, is_list, optional = kinds[name]
        if value is None and optional:
            continue
        try:
            typed[name] = [_typed(kind, v) for v in (value if isinstance(value, list) else [value])] if is_list \
                else _typed(kind, value)
        except (ValueError, TypeError):
            expected = f"a list of {kind.__name__}" if is_list else kind.__name__ + (" or null" if optional else "")
            raise ValueError(f"{path}: option `{name}` expected {expected}, found {value!r}.") from None
    return typed


def frequent_tokens(dataset, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent supervised tokens (ties and shortfall filled with the lowest unused ids), sorted."""
    counts = Counter()
    for row in dataset:
        counts.update(t for t, m in zip(row["input_ids"], row["loss_mask"]) if m)
    chosen = [t for t, _ in counts.most_common(size)]
    if len(chosen) < size:
        used = set(chosen)
        chosen += [t for t in range(vocab_size) if t not in used][: size - len(chosen)]
    return torch.tensor(sorted(chosen))


def run_entry(model_args, data_args, args, argv: list[str], program: str = "beagle train") -> dict:
    """What one `beagle train` process is, for its compute-ledger segment and the draft's `training_record`."""
    return {
        "command": program + " " + " ".join(argv),
        "target": model_args.target_model, "target_dtype": model_args.target_dtype,
        "dataset": data_args.dataset, "regenerated": data_args.regenerate, "max_length": data_args.max_length,
        "skip_records": data_args.skip_records, "max_records": data_args.max_records,
        "offline_cache": bool(data_args.offline_cache_dir), "stage1_ratio": args.stage1_ratio,
        "learning_rate": args.learning_rate,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
        "bf16": args.bf16,
        "allocator": heap_allocator(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}"
                                                                     if torch.cuda.is_available() else ""),
    }


def record_training(config, segments: list[dict]) -> dict:
    """Add this run's processes (`ComputeLedger` segments: one, or several for a run stopped and resumed) to the
    draft config's `training_record`, kept across `--init_from` continuations, so the checkpoint and its model card
    state the total compute: wall time, optimizer steps, supervised token-updates (supervised tokens per batch x
    steps, one per position and stage-2 step counted once), data and settings."""
    record = dict(getattr(config, "training_record", None) or {})
    runs = list(record.get("runs", [])) + segments
    record.update(runs=runs, total_wall_s=round(sum(r["wall_s"] for r in runs), 1),
                  total_token_updates=sum(r["token_updates"] for r in runs),
                  total_steps=sum(r["steps"] for r in runs))
    config.training_record = record
    return record


def layout_options(model_args: BeagleModelArguments) -> dict:
    """The draft layer's layout options given on the command line (`--num_attention_heads`, `--num_key_value_heads`,
    `--intermediate_size`); left out: the target's."""
    return {name: getattr(model_args, name) for name in ("num_attention_heads", "num_key_value_heads",
                                                         "intermediate_size") if getattr(model_args, name)}


def check_continuation(config, options: dict, init_from: str) -> None:
    """`--init_from` keeps the checkpoint's architecture: refuse an option (None: left out) that asks for another."""
    for name, value in options.items():
        if value is not None and getattr(config, name) != value:
            raise ValueError(f"--{name} {value}: --init_from {init_from} is a draft with {name}="
                             f"{getattr(config, name)!r}; a continuation keeps the checkpoint's architecture, so "
                             f"expected the same value or the option left out.")


def make_beagle(target, model_args: BeagleModelArguments, train_data) -> BeagleModel:
    """The draft `beagle train` trains: `--init_from` a checkpoint, or fresh from the target (with a reduced draft
    vocabulary: the most frequent assistant tokens of the training data)."""
    layout = layout_options(model_args)
    if model_args.init_from:
        # float32 master weights whatever the checkpoint's storage dtype (shipped drafts are bf16)
        beagle = BeagleModel.from_pretrained(model_args.init_from, attn_implementation=model_args.attn_implementation,
                                             dtype=torch.float32)
        check_continuation(beagle.config, {**layout, "draft_vocab_size": model_args.draft_vocab_size,
                                           "recency_bias": model_args.recency_bias or None,
                                           "query_newest_state": model_args.query_newest_state or None,
                                           "context_next_token": model_args.context_next_token or None,
                                           "target_layer_ids": None if model_args.target_layer_ids == [-1]
                                           else model_args.target_layer_ids}, model_args.init_from)
        return beagle
    beagle = BeagleModel.from_target(target, attn_implementation=model_args.attn_implementation,
                                     target_layer_ids=model_args.target_layer_ids,
                                     draft_vocab_size=model_args.draft_vocab_size,
                                     recency_bias=model_args.recency_bias,
                                     query_newest_state=model_args.query_newest_state,
                                     context_next_token=model_args.context_next_token,
                                     target_model_name_or_path=model_args.target_model, **layout)
    if model_args.draft_vocab_size:
        beagle.set_draft_vocabulary(frequent_tokens(train_data, model_args.draft_vocab_size, beagle.config.vocab_size))
    return beagle


def tau_callback(trainer, tokenizer, data_args, training_args, wall_offset_s: float = 0.0) -> SpeculativeEvalCallback:
    """`--tau_eval_prompts`: τ of real greedy speculative decoding on MT-bench first turns at each evaluation."""
    if training_args.eval_strategy == IntervalStrategy.NO:
        raise ValueError("--tau_eval_prompts expected evaluations to hook into: pass --eval_strategy steps (and "
                         "--eval_steps), found --eval_strategy no.")
    prompts = [torch.tensor(render_chat(tokenizer, [{"role": "user", "content": row["turns"][0]}],
                                        add_generation_prompt=True))
               for row in load_prompts("mt-bench")[: data_args.tau_eval_prompts]]
    return SpeculativeEvalCallback(trainer, prompts, data_args.tau_eval_new_tokens,
                                   curve_path=os.path.join(training_args.output_dir, "tau_curve.jsonl"),
                                   wall_offset_s=wall_offset_s)


def resume_requested(training_args) -> bool:
    """Whether this process continues a stopped run (`--resume_from_checkpoint` set, and not to false)."""
    value = training_args.resume_from_checkpoint
    return value not in (None, False) and str(value).lower() not in ("false", "no", "0", "")


def resume_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder as given, or for `true` the latest `checkpoint-N` in
    `--output_dir`; None when there is none yet (a run stopped before its first save: the regeneration and the
    offline cache resume on their own, training starts at step 0)."""
    value = training_args.resume_from_checkpoint
    if not resume_requested(training_args):
        return None
    if value is True or str(value).lower() in ("true", "yes", "1"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            print(f"[beagle train] --resume_from_checkpoint: no checkpoint in {training_args.output_dir} yet; "
                  f"training starts at step 0 (data preparation and the offline cache resume where they stopped)")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value}: expected a checkpoint folder or true, found no such "
                         f"folder.")
    return value


EARLIER_RUN_FILES = ("compute_ledger.json", "regenerated.jsonl", "tau_curve.jsonl")


def earlier_run(output_dir: str, name: str) -> list[str]:
    """What an earlier `beagle train` into `output_dir` left there: checkpoints, ledger, regenerated data, τ curve and
    the final draft folder `name`."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(entry for entry in os.listdir(output_dir)
                  if entry in EARLIER_RUN_FILES or entry == name
                  or (entry.startswith(PREFIX_CHECKPOINT_DIR + "-") and os.path.isdir(os.path.join(output_dir, entry))))


def check_fresh_output_dir(training_args, name: str, tag: str) -> None:
    """A run that does not resume starts from nothing: an earlier run's files in its output_dir would be taken for its
    own (a later `--resume_from_checkpoint true` continuing the other run's latest checkpoint, its regenerated data
    reused). Refused, or with `--overwrite_output_dir true` deleted first."""
    if resume_requested(training_args):
        return
    found = earlier_run(training_args.output_dir, name)
    if not found:
        return
    if not training_args.overwrite_output_dir:
        raise BeagleArgumentError(
            f"--output_dir {training_args.output_dir} expected no earlier run without --resume_from_checkpoint, found "
            f"{found}: continue it with --resume_from_checkpoint true, choose a new --output_dir, or pass "
            f"--overwrite_output_dir true to delete those first.")
    for entry in found:
        path = os.path.join(training_args.output_dir, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    print(f"{tag} --overwrite_output_dir: deleted the earlier run's {found} from {training_args.output_dir}")


def run_training(argv: list[str], make_draft=make_beagle, trainer_class=BeagleTrainer, name: str = "beagle",
                 label: str = "Beagle", program: str = "beagle train") -> str:
    """Parse `beagle train`'s arguments, load the target and the data, build the draft with
    `make_draft(target, model_args, train_data)`, train it with `trainer_class` (a `BeagleTrainer`), evaluate and save
    it to `<output_dir>/<name>` (`label` names the draft in messages, `program` the command in the compute ledger).
    `beagle train` and the benchmark baselines (benchmarks/eagle2_draft.py) share this code path."""
    model_args, data_args, training_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    tag = f"[{name} train]"
    dtype = resolve_dtype(model_args.target_dtype, training_args.device, what="`beagle train` runs the target")
    model_args.target_dtype = str(dtype).removeprefix("torch.")  # "auto" resolved: the training record says which
    warn_if_page_faulting_allocator(f"`{name} train`", training_args.device.type)
    # Resolved (and a wrong folder refused) now, not after hours of regeneration and offline cache.
    checkpoint = resume_checkpoint(training_args)
    check_fresh_output_dir(training_args, name, tag)
    # This process's share of the run's compute, on disk from now on (a resumed run adds a segment to the ledger).
    ledger = ComputeLedger(os.path.join(training_args.output_dir, "compute_ledger.json"),
                           run_entry(model_args, data_args, training_args, argv, program),
                           resume=resume_requested(training_args), started=started,
                           main_process=training_args.process_index == 0)
    # Online training and regeneration run the target on padded batches: "auto" takes eager attention on CPU (see
    # load_target). The offline cache runs it unpadded.
    # On the training device from the start: regeneration and the offline cache run the target there too.
    target, tokenizer = load_target(model_args.target_model, dtype, device=training_args.device,
                                    gguf_file=model_args.gguf_file, attn_implementation="auto")

    source = resolve_dataset_arg(data_args.dataset)
    if data_args.regenerate:
        regenerated = os.path.join(training_args.output_dir, "regenerated.jsonl")
        os.makedirs(training_args.output_dir, exist_ok=True)
        regen_report = regenerate(target, tokenizer, source, regenerated, data_args.regenerate_batch_size,
                                  data_args.regenerate_max_new_tokens, data_args.regenerate_max_prompt_tokens,
                                  data_args.regenerate_records)
        print(f"{tag} regenerated replies: {regen_report.summary()} -> {regenerated}")
        source = regenerated
    dataset, report = build_dataset(source, tokenizer, data_args.max_length, data_args.max_records,
                                    skip_records=data_args.skip_records)
    print(f"{tag} data: {report.summary()}")
    supervised_per_step = report.supervised_tokens / max(report.kept, 1) * ledger.segment["batch_size"]
    ledger.describe(supervised_per_step, data=report.summary(), train_records=report.kept,
                    supervised_tokens=report.supervised_tokens)
    eval_size = min(data_args.eval_records, max(len(dataset) // 10, 1)) if len(dataset) > 1 else 0
    split = dataset.train_test_split(test_size=eval_size, seed=training_args.seed) if eval_size else None
    train_data, eval_data = (split["train"], split["test"]) if split else (dataset, None)

    draft = make_draft(target, model_args, train_data).to(training_args.device)
    if data_args.offline_cache_dir:
        # The draft's vocabulary is fixed now: the cache stores soft labels over it (and refuses another one).
        train_data, eval_data = (
            None if part is None else build_offline_cache(target, draft, part,
                                                          os.path.join(data_args.offline_cache_dir, which),
                                                          topk=data_args.offline_topk)
            for which, part in (("train", train_data), ("eval", eval_data)))
    trainer = trainer_class(model=draft, args=training_args, target_model=target, train_dataset=train_data,
                            eval_dataset=eval_data)
    trainer.add_callback(ledger)
    if data_args.tau_eval_prompts:
        tau = tau_callback(trainer, tokenizer, data_args, training_args, ledger.previous_train_wall_s)
        trainer.add_callback(tau)
        ledger.clock = tau.train_wall_s  # the ledger's training time leaves out the τ evaluations too
    trainer.train(resume_from_checkpoint=checkpoint)
    if eval_data is not None:
        # A scheduled evaluation may already have run at the final step: report it rather than evaluate (and add a
        # point to the learning curve) a second time.
        at_end = [h for h in trainer.state.log_history
                  if h.get("step") == trainer.state.global_step and any(k.startswith("eval_alpha_") for k in h)]
        metrics = at_end[-1] if at_end else trainer.evaluate()
        alphas = [f"{metrics[k]:.3f}" for k in sorted(metrics) if k.startswith("eval_alpha_step_")]
        print(f"{tag} held-out alpha per draft step: {' / '.join(alphas)}")
    final = os.path.join(training_args.output_dir, name)
    record_training(trainer.beagle.config, ledger.close(trainer.state.global_step))
    trainer.save_model(final)
    print(f"{tag} saved the {label} checkpoint to {final}")
    return final


def main(argv: list[str] | None = None) -> str:
    return run_training(sys.argv[1:] if argv is None else argv)
