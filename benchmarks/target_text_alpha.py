"""Draft agreement on the target's own greedy replies: Beagle against the EAGLE-2-style draft, on the same text.

`beagle bench` compares the two drafts by τ while each generates. With a bf16 target every method writes its own
text (near-ties flip differently), so on a few prompts the two drafts are scored on different replies. This script
fixes the text: it generates the target's plain greedy reply to each prompt once, then scores both drafts on those
tokens with their trainers' own held-out evaluation (`BeagleTrainer.evaluate`, `Eagle2Trainer.evaluate`): top-1
agreement α with the target at draft steps 1..S (step 1: teacher forcing; later steps: each draft unrolled on its own
states with the true tokens, exactly chain drafting). Only reply tokens are scored, the prompt is context.

    python benchmarks/target_text_alpha.py --beagle checkpoints/beagle-smollm2-135m-instruct \
        --eagle2 benchmarks/eagle2-smollm2-135m-instruct --out benchmarks/results/target_text_alpha

writes `<out>.json` and `<out>.md`. α does not depend on the machine's speed: no quiet machine needed.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from datasets import Dataset  # noqa: E402

from eagle2_draft import Eagle2Trainer, load_draft  # noqa: E402
from modeling_beagle import BeagleModel  # noqa: E402
from trainer.assets import load_prompts, load_target  # noqa: E402
from trainer.beagle_trainer import BeagleTrainer, BeagleTrainingArguments  # noqa: E402
from trainer.bench import DTYPES, first_turn_ids, generation_kwargs, machine_info, prompt_cases  # noqa: E402


def greedy_replies(target, tokenizer, cases, max_new_tokens: int) -> list[dict]:
    """One training-format row per case: the prompt and the target's greedy reply, the reply's tokens supervised."""
    rows = []
    for case in cases:
        prompt = case.input_ids or first_turn_ids(tokenizer, case.turns[0])
        with torch.no_grad():
            output = target.generate(torch.tensor([prompt], device=target.device),
                                     **generation_kwargs(target, max_new_tokens, False, 1.0))
        ids = output[0].tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    return rows


def evaluate(trainer_class, draft, target, rows: list[dict], steps: int, batch_size: int) -> dict:
    """The draft's own trainer's evaluation over `rows`: α per draft step 1..`steps` (`alpha`) and, where the
    trainer reports it (Beagle's stage-1 metric with k = 1), step 1 through the stage-1 mask (`alpha_step1_all`).
    Both trainers score every reply token at every step (Beagle's since session 24: its stage-2 steps each scored
    the positions of one window offset, about 1/S of them, before)."""
    with tempfile.TemporaryDirectory() as output_dir:
        args = BeagleTrainingArguments(output_dir=output_dir, stage1_window=1, stage2_steps=steps, bf16=False,
                                       per_device_eval_batch_size=batch_size, report_to="none", seed=0)
        trainer = trainer_class(model=draft, args=args, target_model=target, eval_dataset=Dataset.from_list(rows))
        metrics = trainer.evaluate()
    return {"alpha": [metrics[f"eval_alpha_step_{i}"] for i in range(1, steps + 1)],
            "alpha_step1_all": metrics.get("eval_alpha_offset_1", metrics["eval_alpha_step_1"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", required=True, help="Beagle checkpoint folder")
    parser.add_argument("--eagle2", required=True, help="EAGLE-2-style draft folder (benchmarks/eagle2_draft.py)")
    parser.add_argument("--prompt-sets", default="mt-bench,humaneval")
    parser.add_argument("--num-prompts", type=int, default=20, help="prompts per set (first turns), spread over it")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtypes", default="bfloat16,float32", help="target (and draft) dtypes")
    parser.add_argument("--steps", type=int, default=4, help="draft steps S scored")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise SystemExit(f"--dtypes expected names among {sorted(DTYPES)}, found {dtype!r}.")
    sets = {name: load_prompts(name) for name in (s.strip() for s in args.prompt_sets.split(",")) if name}

    results = []
    for dtype in dtypes:
        target, tokenizer = load_target(args.target, DTYPES[dtype])
        beagle = BeagleModel.from_pretrained(args.beagle, dtype=DTYPES[dtype]).eval()
        eagle2 = load_draft(args.eagle2, target)
        for name, prompts in sets.items():
            started = time.perf_counter()
            rows = greedy_replies(target, tokenizer, prompt_cases({name: prompts}, num_prompts=args.num_prompts),
                                  args.max_new_tokens)
            row = {"prompt_set": name, "dtype": dtype, "prompts": len(rows),
                   "reply_tokens": sum(sum(r["loss_mask"]) for r in rows),
                   "beagle": evaluate(BeagleTrainer, beagle, target, rows, args.steps, args.batch_size),
                   "eagle2": evaluate(Eagle2Trainer, eagle2, target, rows, args.steps, args.batch_size),
                   "wall_s": round(time.perf_counter() - started, 1)}
            results.append(row)
            print(f"[target_text_alpha] {json.dumps(row)}", flush=True)

    report = {"benchmark": "target_text_alpha", "machine": machine_info(target.device), "settings": vars(args),
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = ["# Draft agreement on the target's own greedy replies", "",
             f"Target {args.target}; Beagle `{args.beagle}`; EAGLE-2-style draft `{args.eagle2}`; {args.num_prompts} "
             f"first turns per set × up to {args.max_new_tokens} reply tokens, both drafts scored on the same tokens "
             "by their trainers' evaluation (α = top-1 agreement with the target; step 1 teacher-forced, later steps "
             "unrolled on the draft's own states with the true tokens).", "",
             "| prompt set | dtype | reply tokens | Beagle α per step | EAGLE-2-style α per step | step 1 over every "
             "reply token: Beagle / EAGLE-2-style |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['prompt_set']} | {r['dtype']} | {r['reply_tokens']} | "
                     f"{' / '.join(f'{a:.3f}' for a in r['beagle']['alpha'])} | "
                     f"{' / '.join(f'{a:.3f}' for a in r['eagle2']['alpha'])} | "
                     f"{r['beagle']['alpha_step1_all']:.3f} / {r['eagle2']['alpha_step1_all']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
