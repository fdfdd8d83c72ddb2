"""Training on the target's own replies against ShareGPT's original replies, at equal budget, on the real target.

Both arms continue the same Beagle checkpoint with `beagle train` for the same optimizer steps, batch and sequence
length, on the same prompts; only the assistant replies differ: ShareGPT's original (ChatGPT) replies, or the target's
own greedy replies (`trainer.regenerate`). Each arm, and the starting checkpoint, is then measured the way users run it:
greedy speculative decoding through `target.generate(assistant_model=beagle)` on MT-bench first turns in float32, where
every output must equal plain greedy token for token (else the run is invalid). Reported: τ per arm, the data each arm
saw, and wall time.

    python benchmarks/regeneration_effect.py --init-from checkpoints/beagle-smollm2-135m-instruct \\
        --records 2000:2300 --max-steps 40 --output-dir benchmarks/results/regeneration_effect

Records are taken from a ShareGPT slice that the starting checkpoint did not train on (it saw the first 2,000).
Writes `regeneration_effect.json` and `regeneration_effect.md` into `--output-dir`.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from modeling_beagle import BeagleGenerationStats, BeagleModel  # noqa: E402
from trainer.assets import load_prompts, load_target, resolve_data  # noqa: E402
from trainer.data import read_records, render_chat, to_messages  # noqa: E402
from trainer.precision import resolve_dtype  # noqa: E402
from trainer.regenerate import first_reply_index, regenerate  # noqa: E402
from trainer.train import run_training  # noqa: E402

TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"


def first_turn(record) -> tuple[list[dict], dict] | None:
    """(the prompt before the first assistant turn, that turn), or None: the split `regenerate` makes."""
    messages = to_messages(record)
    first = first_reply_index(messages) if isinstance(messages, list) else None
    return None if first is None else (messages[:first], messages[first])


def write_arms(source_records: list, regenerated_path: str, original_path: str) -> int:
    """The original-reply arm: the regenerated file's prompts, each with ShareGPT's own first reply."""
    originals = {}
    for record in source_records:
        turn = first_turn(record)
        if turn:
            originals.setdefault(json.dumps(turn[0], sort_keys=True), turn[1])
    written = 0
    with open(regenerated_path, encoding="utf-8") as regenerated, open(original_path, "w", encoding="utf-8") as out:
        for line in regenerated:
            row = json.loads(line)
            if row.get("skipped"):
                continue
            prompt = row["messages"][:-1]
            reply = originals[json.dumps(prompt, sort_keys=True)]
            out.write(json.dumps({"messages": prompt + [reply]}, ensure_ascii=False) + "\n")
            written += 1
    return written


@torch.no_grad()
def measure_tau(target, tokenizer, beagle_path: str, prompts: int, new_tokens: int) -> dict:
    """Mean τ of greedy assisted-chain decoding on MT-bench first turns; every output checked against plain greedy."""
    import modeling_beagle  # noqa: F401  (installs the generate hook)

    beagle = BeagleModel.from_pretrained(beagle_path, dtype=target.dtype).to(target.device).eval()
    beagle.bind_target(target)
    taus, identical, pooled = [], 0, BeagleGenerationStats()
    for row in load_prompts("mt-bench")[:prompts]:
        ids = torch.tensor([render_chat(tokenizer, [{"role": "user", "content": row["turns"][0]}],
                                        add_generation_prompt=True)], device=target.device)
        plain = target.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        spec = target.generate(ids, assistant_model=beagle, prompt_lookup_num_tokens=0, max_new_tokens=new_tokens,
                               do_sample=False)
        identical += int(torch.equal(plain, spec))
        taus.append(beagle.generation_stats.tau)
        pooled.drafted += beagle.generation_stats.drafted
        pooled.accepted += beagle.generation_stats.accepted
    return {"tau_mean": statistics.fmean(taus), "taus": taus, "identical": identical, "prompts": len(taus),
            "tau_pooled": pooled.tau, "acceptance_per_position": pooled.acceptance_per_position()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", required=True, help="the Beagle checkpoint both arms continue")
    parser.add_argument("--records", default="2000:2300", help="ShareGPT slice A:B whose prompts both arms use")
    parser.add_argument("--source", default="sharegpt", help="the records file the slice is taken from (default: the "
                        "ShareGPT asset)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-dtype", default="auto", help="the target's dtype while the arms train (regeneration "
                        "and τ always run it in float32, where greedy verification is exact)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--regenerate-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="length limit of a regenerated reply")
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=5, help="MT-bench first turns for τ")
    parser.add_argument("--eval-new-tokens", type=int, default=64)
    parser.add_argument("--work-dir", default="runs/regeneration_effect")
    parser.add_argument("--output-dir", default="benchmarks/results/regeneration_effect")
    args = parser.parse_args(argv)
    started = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    dtype = resolve_dtype(args.train_dtype, args.device)
    target, tokenizer = load_target(TARGET, torch.float32, device=args.device, attn_implementation="auto")

    start, stop = (int(x) for x in args.records.split(":"))
    source_records = read_records(resolve_data("sharegpt") if args.source == "sharegpt" else args.source)[start:stop]
    source = os.path.join(args.work_dir, "source.json")
    with open(source, "w", encoding="utf-8") as handle:
        json.dump(source_records, handle, ensure_ascii=False)
    regenerated = os.path.join(args.work_dir, "regenerated.jsonl")
    t0 = time.time()
    regen_report = regenerate(target, tokenizer, source, regenerated, args.regenerate_batch_size, args.max_new_tokens,
                              args.max_prompt_tokens)
    regen_s = time.time() - t0
    original = os.path.join(args.work_dir, "original.jsonl")
    conversations = write_arms(source_records, regenerated, original)
    if conversations == 0:
        raise SystemExit(f"records {args.records} gave no conversation to train on ({regen_report.summary()}): take a "
                         "wider slice or a larger --max-prompt-tokens.")

    results = {"init_from": measure_tau(target, tokenizer, args.init_from, args.eval_prompts, args.eval_new_tokens)}
    print(f"[regeneration_effect] init_from: tau {results['init_from']['tau_mean']:.3f}", flush=True)
    arms = {}
    for arm, data in (("original", original), ("regenerated", regenerated)):
        out = os.path.join(args.work_dir, arm)
        argv_arm = ["--target_model", TARGET, "--target_dtype", str(dtype).removeprefix("torch."),
                    "--init_from", args.init_from, "--dataset", data, "--max_length", str(args.max_length),
                    "--eval_records", "8", "--offline_cache_dir", os.path.join(out, "cache"), "--output_dir", out,
                    "--max_steps", str(args.max_steps), "--stage1_ratio", "0.5", "--stage1_window", "4",
                    "--stage2_steps", "4", "--per_device_train_batch_size", str(args.batch_size),
                    "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant_with_warmup",
                    "--warmup_steps", "5", "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
                    "--seed", "0"] + (["--use_cpu"] if args.device == "cpu" else [])
        t0 = time.time()
        saved = run_training(argv_arm)
        train_s = time.time() - t0
        run = BeagleModel.from_pretrained(saved).config.training_record["runs"][-1]
        arms[arm] = {"train_s": round(train_s, 1), "data": run["data"], "token_updates": run["token_updates"],
                     "steps": run["steps"]}
        results[arm] = measure_tau(target, tokenizer, saved, args.eval_prompts, args.eval_new_tokens)
        print(f"[regeneration_effect] {arm}: tau {results[arm]['tau_mean']:.3f} {json.dumps(arms[arm])} "
              f"{json.dumps(results[arm])}", flush=True)

    valid = all(r["identical"] == r["prompts"] for r in results.values())
    report = {
        "valid": valid,
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "train_dtype": str(dtype), "measure_dtype": "torch.float32"},
        "settings": vars(args), "conversations_per_arm": conversations, "regenerate": regen_report.summary(),
        "regenerate_s": round(regen_s, 1), "arms": arms, "results": results,
        "wall_s": round(time.time() - started, 1),
    }
    with open(os.path.join(args.output_dir, "regeneration_effect.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    lines = ["# Training on the target's own replies vs ShareGPT's original replies (equal budget)", "",
             f"**{'VALID' if valid else 'INVALID: a speculative output differed from plain greedy'}**", "",
             f"Machine: {report['machine']}", "", f"Settings: {vars(args)}", "",
             f"Both arms: {conversations} conversations with the same prompts (ShareGPT records {args.records}), "
             f"continuing `{args.init_from}` for {args.max_steps} steps. Regeneration: {regen_report.summary()} "
             f"({regen_s:.0f} s).", "",
             "| draft | training data | token-updates | train s | τ (MT-bench, greedy chain, fp32) | acceptance per "
             "position (all prompts' rounds) | identical |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        arm = arms.get(name, {})
        accept = " ".join(f"{a:.2f}" for a in result["acceptance_per_position"])
        lines.append(f"| {name} | {arm.get('data', '(starting checkpoint)')} | {arm.get('token_updates', '–')} | "
                     f"{arm.get('train_s', '–')} | {result['tau_mean']:.3f} | {accept} | "
                     f"{result['identical']}/{result['prompts']} |")
    with open(os.path.join(args.output_dir, "regeneration_effect.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
