"""The `beagle` command: `env`, `inspect`, `train`, `regenerate`."""

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import modeling_beagle

    info = {
        "beagle": modeling_beagle.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from modeling_beagle import BeagleModel

    model = BeagleModel.from_pretrained(args.checkpoint)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "checkpoint": args.checkpoint,
        "target": model.config.target_model_name_or_path,
        "target_model_type": model.config.target_model_type,
        "hidden_size": model.config.hidden_size,
        "heads": [model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim],
        "vocab_size": model.config.vocab_size,
        "draft_vocab_size": model.config.draft_vocab_size,
        "carry_target_embeddings": model.config.carry_target_embeddings,
        "trainable_parameters": n_params,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import main as train_main

    train_main(args.train_args)
    return 0


def _cmd_regenerate(args: argparse.Namespace) -> int:
    import torch
    from transformers import HfArgumentParser

    from .assets import load_target, resolve_dataset_arg
    from .regenerate import RegenerateArguments, regenerate

    (options,) = HfArgumentParser(RegenerateArguments).parse_args_into_dataclasses(args=args.regenerate_args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.target_dtype]
    target, tokenizer = load_target(options.target_model, dtype, gguf_file=options.gguf_file)
    report = regenerate(target, tokenizer, resolve_dataset_arg(options.dataset), options.output, options.batch_size,
                        options.max_new_tokens, options.max_prompt_tokens, options.max_records, options.temperature)
    print(f"[beagle regenerate] {report.summary()}; written to {options.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beagle", description="Beagle speculative decoding: tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="print the versions Beagle runs with")
    p_env.set_defaults(func=_cmd_env)
    p_inspect = sub.add_parser("inspect", help="load a Beagle checkpoint folder and print a summary")
    p_inspect.add_argument("checkpoint", help="path of a saved Beagle checkpoint folder")
    p_inspect.set_defaults(func=_cmd_inspect)
    p_train = sub.add_parser("train", help="prepare data and train both stages (`beagle train --help` for options)",
                             add_help=False)
    p_train.add_argument("train_args", nargs=argparse.REMAINDER,
                         help="BeagleModelArguments, BeagleDataArguments and BeagleTrainingArguments, or one YAML/JSON file")
    p_train.set_defaults(func=_cmd_train)
    p_regen = sub.add_parser("regenerate", help="rewrite the assistant turns of a dataset with the target itself",
                             add_help=False)
    p_regen.add_argument("regenerate_args", nargs=argparse.REMAINDER,
                         help="RegenerateArguments (`beagle regenerate --help`)")
    p_regen.set_defaults(func=_cmd_regenerate)
    return parser


PASS_THROUGH = {"train": "train_args", "regenerate": "regenerate_args"}  # parsed by HfArgumentParser, not argparse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in PASS_THROUGH:
        # argparse's REMAINDER refuses a remainder that starts with an option (`beagle train --target_model ...`).
        args = parser.parse_args(argv[:1])
        setattr(args, PASS_THROUGH[argv[0]], argv[1:])
        return args.func(args)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
