"""`beagle train`: data preparation and both training stages, end to end, for a target and a dataset."""

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from modeling_beagle import BeagleModel

from .assets import load_target, resolve_dataset_arg
from .beagle_trainer import BeagleTrainer, BeagleTrainingArguments
from .data import build_dataset

logger = logging.getLogger("beagle.train")


@dataclass
class BeagleModelArguments:
    target_model: str = field(metadata={"help": "target model: a local folder or a Hub id"})
    gguf_file: str | None = field(default=None, metadata={"help": "a GGUF file inside `target_model` to load"})
    target_dtype: str = field(default="float32", metadata={"help": "dtype of the frozen target: float32 or bfloat16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Beagle's attention kernel"})
    target_layer_ids: list[int] = field(default_factory=lambda: [-1], metadata={"help": "target layers feeding keys"})
    draft_vocab_size: int | None = field(default=None, metadata={
        "help": "reduced draft vocabulary: the most frequent assistant tokens of the training data"})
    init_from: str | None = field(default=None, metadata={"help": "continue from this Beagle checkpoint"})


@dataclass
class BeagleDataArguments:
    dataset: str = field(metadata={"help": "JSON/JSONL file: ShareGPT conversations, chat messages or text"})
    max_length: int = field(default=1024, metadata={"help": "truncate tokenized conversations to this length"})
    max_records: int | None = field(default=None, metadata={"help": "use at most this many records"})
    eval_records: int = field(default=32, metadata={"help": "held-out records for the α-per-position evaluation"})


def parse(argv: list[str]):
    parser = HfArgumentParser((BeagleModelArguments, BeagleDataArguments, BeagleTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


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


def main(argv: list[str] | None = None) -> str:
    model_args, data_args, training_args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model_args.target_dtype]
    target, tokenizer = load_target(model_args.target_model, dtype, gguf_file=model_args.gguf_file)

    dataset, report = build_dataset(resolve_dataset_arg(data_args.dataset), tokenizer, data_args.max_length, data_args.max_records)
    print(f"[beagle train] data: {report.summary()}")
    eval_size = min(data_args.eval_records, max(len(dataset) // 10, 1)) if len(dataset) > 1 else 0
    split = dataset.train_test_split(test_size=eval_size, seed=training_args.seed) if eval_size else None
    train_data, eval_data = (split["train"], split["test"]) if split else (dataset, None)

    if model_args.init_from:
        beagle = BeagleModel.from_pretrained(model_args.init_from, attn_implementation=model_args.attn_implementation)
    else:
        beagle = BeagleModel.from_target(target, attn_implementation=model_args.attn_implementation,
                                         target_layer_ids=model_args.target_layer_ids,
                                         draft_vocab_size=model_args.draft_vocab_size,
                                         target_model_name_or_path=model_args.target_model)
        if model_args.draft_vocab_size:
            beagle.set_draft_vocabulary(frequent_tokens(train_data, model_args.draft_vocab_size,
                                                        beagle.config.vocab_size))
    trainer = BeagleTrainer(model=beagle, args=training_args, target_model=target, train_dataset=train_data,
                            eval_dataset=eval_data)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if eval_data is not None:
        metrics = trainer.evaluate()
        alphas = [f"{metrics[k]:.3f}" for k in sorted(metrics) if k.startswith("eval_alpha_step_")]
        print(f"[beagle train] held-out alpha per draft step: {' / '.join(alphas)}")
    final = os.path.join(training_args.output_dir, "beagle")
    trainer.save_model(final)
    print(f"[beagle train] saved the Beagle checkpoint to {final}")
    return final
