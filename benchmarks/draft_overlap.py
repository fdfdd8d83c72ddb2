"""How close each draft's first-step distribution is to the target's, on the target's own replies at T = 0 and
T = 1, and what the draft vocabulary alone allows: the measurement behind "T = 1 is limited by acceptance", and the
equal-budget comparison (Beagle against the EAGLE-2-style draft) on exactly the same positions.

For every reply position j the target's distribution p (at the generation temperature) is compared with a draft's
first-step distribution q read in the true context (the target's states of every earlier position, as in the first
draft step of a round; q mapped into the target's vocabulary). Per position:

- `overlap` = Σ min(p, q): the exact probability that one token sampled from the draft is accepted by speculative
  sampling (1 - total variation distance). At T = 1 this is the first draft position's acceptance of a chain;
- `vocab_mass`: p's mass on the draft vocabulary, the ceiling of `overlap` for any draft with this vocabulary;
- `top1`: whether q's and p's most likely tokens agree (greedy acceptance at the first draft position);
- `top_k_mass` of p (k = 1, 8, 32): how spread the target's distribution is (the offline cache's soft labels keep 32).

Replies: plain `generate` on MT-bench first turns (greedy, and pure sampling at T = 1 seeded with seed + prompt index).
No timing, so the machine's load does not matter.

    python benchmarks/draft_overlap.py --beagle checkpoints/beagle-smollm2-135m-instruct \
        --eagle2 benchmarks/eagle2-smollm2-135m-instruct --threads 2 --out benchmarks/results/draft_overlap

writes `<out>.json` and `<out>.md`. `--variant NAME=FOLDER` (repeatable) scores further Beagle checkpoints on the
same positions, each paired per prompt against `--beagle`: the deterministic screen for a training change.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.round_budget import first_turns, load_models, write_report  # noqa: E402
from modeling_beagle import BeagleModel  # noqa: E402
from modeling_beagle.generation_beagle import target_states  # noqa: E402
from trainer.bench import generation_kwargs, machine_info  # noqa: E402
from trainer.precision import DTYPES  # noqa: E402

TOP_KS = (1, 8, 32)


@torch.no_grad()
def beagle_first_step(beagle, sequence: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(n, draft vocab) logits: row j is Beagle's first draft step after position j - 1 (query t_j at position j
    reading the target's states at positions < j, each with the token that followed it), which predicts t_{j+1}."""
    positions = torch.arange(sequence.shape[1])[None]
    next_ids = torch.cat([sequence[:, 1:], sequence[:, -1:]], dim=1)
    return beagle(input_ids=sequence, position_ids=positions, context_states=states, context_position_ids=positions,
                  context_next_ids=next_ids).logits[0]


@torch.no_grad()
def eagle2_first_step(draft, sequence: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The same rows for the EAGLE-2-style draft (`benchmarks/eagle2_draft.py`): its row r reads (t_{r+1}, f_r) and
    every earlier row and predicts t_{r+2}, so row j - 1 is its first step after position j - 1 (row 0 is unused)."""
    logits = draft(input_ids=sequence[:, 1:], features=states[:, :-1]).logits[0]
    return torch.cat([logits[:1], logits], dim=0)


@torch.no_grad()
def position_metrics(target, drafts: dict, sequence: torch.Tensor, prompt_len: int, temperature: float) -> dict:
    """Per reply position of `sequence` (1, n), for each draft of `drafts` (name -> (model, first-step function)):
    overlap, vocab_mass, top1; and the target's top-k masses (lists, one value per position)."""
    out = target(sequence, output_hidden_states=True)
    n = sequence.shape[1]
    rows = slice(prompt_len - 1, n - 1)  # predictions of the reply tokens
    scale = temperature if temperature > 0 else 1.0
    p = (out.logits[0, rows].float() / scale).softmax(-1)
    top = p.sort(-1, descending=True).values
    metrics = {f"top{k}_mass": top[:, :k].sum(-1).tolist() for k in TOP_KS}
    for name, (draft, first_step) in drafts.items():
        states = target_states(out, list(draft.config.target_layer_ids))
        q_draft = (first_step(draft, sequence, states)[rows].float() / scale).softmax(-1)
        to_target = draft.draft_to_target
        if to_target is not None:
            q = q_draft.new_zeros(p.shape).index_copy_(1, to_target, q_draft)
            vocab_mass = p[:, to_target].sum(-1)
        else:
            q, vocab_mass = q_draft, p.sum(-1)
        metrics.update({f"{name}_overlap": torch.minimum(p, q).sum(-1).tolist(),
                        f"{name}_vocab_mass": vocab_mass.tolist(),
                        f"{name}_top1": (p.argmax(-1) == q.argmax(-1)).float().tolist()})
    return metrics


def paired(a: list[float], b: list[float], higher: str) -> dict:
    """Mean and standard error of the per-prompt differences a - b, and on how many prompts a is higher."""
    differences = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.mean(differences),
            "standard_error": statistics.stdev(differences) / len(differences) ** 0.5,
            higher: sum(d > 0 for d in differences)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--beagle", default="checkpoints/beagle-smollm2-135m-instruct")
    parser.add_argument("--eagle2", default=None, help="also score this EAGLE-2-style draft folder "
                                                       "(benchmarks/eagle2_draft.py) on the same positions")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FOLDER",
                        help="also score this Beagle checkpoint on the same positions, paired against --beagle "
                             "(repeatable)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/draft_overlap")
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variant:
        name, _, folder = spec.partition("=")
        if not name or not folder or name in ("beagle", "eagle2") or name in variants:
            parser.error(f"--variant expected NAME=FOLDER with a new NAME other than beagle / eagle2, found {spec!r}")
        variants[name] = folder
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer, beagle = load_models(args.target, args.beagle, DTYPES[args.dtype], prepack=False)
    drafts = {"beagle": (beagle, beagle_first_step)}
    if args.eagle2:
        if str(ROOT / "benchmarks") not in sys.path:
            sys.path.insert(0, str(ROOT / "benchmarks"))
        from eagle2_draft import load_draft

        drafts["eagle2"] = (load_draft(args.eagle2, target), eagle2_first_step)
    for name, folder in variants.items():
        variant = BeagleModel.from_pretrained(folder, dtype=DTYPES[args.dtype]).eval()
        variant.bind_target(target)
        drafts[name] = (variant, beagle_first_step)
    prompts, inputs = first_turns(tokenizer, "mt-bench", args.num_prompts)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rows = []
    for temperature in temperatures:
        pooled, per_prompt = {}, {name: [] for name in drafts}
        for i, ids in enumerate(inputs):
            torch.manual_seed(args.seed + i)
            sequence = target.generate(ids, attention_mask=torch.ones_like(ids),
                                       **generation_kwargs(target, args.max_new_tokens, temperature > 0, temperature))
            metrics = position_metrics(target, drafts, sequence, ids.shape[1], temperature)
            for key, values in metrics.items():
                pooled.setdefault(key, []).extend(values)
            for name in drafts:
                per_prompt[name].append(statistics.mean(metrics[f"{name}_overlap"]))
            print(f"T={temperature:g} prompt {prompts[i]['id']}: {len(metrics['top1_mass'])} positions, overlap "
                  + ", ".join(f"{name} {per_prompt[name][-1]:.3f}" for name in drafts), flush=True)
        row = {"temperature": temperature, "positions": len(pooled["top1_mass"]),
               **{key: statistics.mean(values) for key, values in pooled.items()},
               "overlap_per_prompt": per_prompt}
        if "eagle2" in drafts:
            row["paired_overlap_difference"] = paired(per_prompt["beagle"], per_prompt["eagle2"], "beagle_higher")
        row["variant_overlap_difference"] = {name: paired(per_prompt[name], per_prompt["beagle"], "variant_higher")
                                             for name in variants}
        rows.append(row)
    report = {"machine": machine_info(torch.device("cpu")),
              "settings": {"target": args.target, "drafts": {"beagle": args.beagle, "eagle2": args.eagle2, **variants},
                           "dtype": args.dtype, "prompts": [p["id"] for p in prompts],
                           "max_new_tokens": args.max_new_tokens, "seed": args.seed},
              "rows": rows}
    lines = [f"# The drafts' first-step distributions against the target's ({args.dtype})", "",
             f"{len(prompts)} MT-bench first turns × {args.max_new_tokens} new tokens of the target's own replies "
             f"(greedy; T = 1 seeded {args.seed} + prompt index); each draft read in the true context (its first draft "
             f"step at every reply position). Means over reply positions. overlap = Σ min(p, q) with both at the "
             "generation temperature (at T = 0: at temperature 1 on the greedy text), the chance that one token drawn "
             "from the draft is accepted; vocab mass = p on the draft vocabulary, the ceiling of overlap for that "
             "vocabulary; top-1 = the two distributions' most likely tokens agree (greedy acceptance at the first "
             "draft position). The target's spread: p's mass on its 1 / 8 / 32 most likely tokens.", "",
             "| T | positions | draft | overlap Σ min(p, q) | vocab mass (ceiling) | top-1 agree |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for name in drafts:
            lines.append(f"| {row['temperature']:g} | {row['positions']} | {name} | {row[name + '_overlap']:.3f} | "
                         f"{row[name + '_vocab_mass']:.3f} | {row[name + '_top1']:.3f} |")
    lines += ["", "| T | target top-1 mass | top-8 mass | top-32 mass |", "|---|---|---|---|"]
    lines += [f"| {row['temperature']:g} | {row['top1_mass']:.3f} | {row['top8_mass']:.3f} | {row['top32_mass']:.3f} |"
              for row in rows]
    if "eagle2" in drafts:
        lines += ["", "Paired per prompt, overlap Beagle − EAGLE-2-style (mean ± standard error; prompts where Beagle is "
                  "higher): " + "; ".join(
                      f"T = {row['temperature']:g}: {row['paired_overlap_difference']['mean']:+.3f} ± "
                      f"{row['paired_overlap_difference']['standard_error']:.3f} "
                      f"({row['paired_overlap_difference']['beagle_higher']}/{len(prompts)})" for row in rows) + "."]
    for name in variants:
        lines += ["", f"Paired per prompt, overlap {name} ({variants[name]}) − beagle ({args.beagle}) (mean ± standard "
                  "error; prompts where it is higher): " + "; ".join(
                      f"T = {row['temperature']:g}: {row['variant_overlap_difference'][name]['mean']:+.3f} ± "
                      f"{row['variant_overlap_difference'][name]['standard_error']:.3f} "
                      f"({row['variant_overlap_difference'][name]['variant_higher']}/{len(prompts)})" for row in rows)
                  + "."]
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
