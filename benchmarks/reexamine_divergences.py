"""Re-examine a finished `beagle bench` run's unexplained bf16 divergences with the bench's current checks.

A bf16 row is SUSPECT when one of its outputs leaves plain greedy at a position the bench could not show to be a
rounding tie of the target's own arithmetic (`trainer.bench.examine_divergence`). When those checks grow (session 23
added `reproduce_reading_in_chunks`: the whole reply read in forwards of c tokens), this replays each unexplained
divergence of a committed run without rerunning the bench: it loads the run's target as the run did (name, dtype,
`--prepack`), rebuilds the prompt as the bench does (first or second turn), regenerates plain greedy up to the
divergence (it must give the recorded plain token, or the replay is refused), and examines the method's recorded
token again.

    python benchmarks/reexamine_divergences.py benchmarks/results/bench-amx-v12-equal-budget-80-bfloat16

writes `reexamined.json` and `reexamined.md` into that folder (the run's own files are left as they are).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_beagle import prepack_linear_weights  # noqa: E402
from trainer.assets import load_prompts, load_target  # noqa: E402
from trainer.bench import (  # noqa: E402
    BenchSettings,
    Case,
    _reproduced_label,
    _Setting,
    examine_divergence,
    generation_kwargs,
)
from trainer.precision import DTYPES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a beagle bench output folder (with bench.json)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.run)
    report = json.loads((folder / "bench.json").read_text())
    settings = report["settings"]
    pending = [(r, d) for r in report["results"] for d in r["divergences"] if not d["within_rounding"]]
    if not pending:
        print(f"{folder}: no unexplained divergence")
        return 0
    rows, targets = [], {}
    for result, old in pending:
        dtype = result["dtype"]
        if dtype not in targets:
            target, tokenizer = load_target(settings["target"], DTYPES[dtype])
            if settings.get("prepack"):
                prepack_linear_weights(target)
            targets[dtype] = target, tokenizer, {}  # the target's first-turn answers, per dtype as in the bench
        target, tokenizer, answers = targets[dtype]
        questions = load_prompts(result["prompt_set"].split("/")[0])
        question = next(q for q in questions if str(q["id"]) == old["prompt_id"])
        turn = 2 if result["prompt_set"].endswith("/turn-2") else 1
        # the bench's own prompt (a second turn holds the target's greedy answer to the first, as in the run)
        setting = _Setting(target, tokenizer, [], dtype, 0.0,
                           BenchSettings(max_new_tokens=settings["max_new_tokens"]), answers)
        prompt = setting.prompt_ids(Case(result["prompt_set"], old["prompt_id"], turn, turns=question["turns"][:turn]))
        index = old["position"]
        if old["method_token"] == old["plain_token"]:
            raise SystemExit(f"{old['prompt_id']}: the recorded divergence at {index} has the same token "
                             f"{old['plain_token']} for plain greedy and the method: not a divergence")
        ids = torch.tensor([prompt])
        plain = target.generate(ids, attention_mask=torch.ones_like(ids),
                                **generation_kwargs(target, index + 1, False, 0.0))[0, len(prompt):].tolist()
        if len(plain) <= index or plain[index] != old["plain_token"]:
            raise SystemExit(f"{old['prompt_id']}: plain greedy here does not give the recorded token "
                             f"{old['plain_token']} at {index}: this machine or version does not replay the run")
        new = examine_divergence(target, prompt, plain[: index + 1], plain[:index] + [old["method_token"]])
        rows.append({"prompt_set": result["prompt_set"], "dtype": dtype, "method": result["method"],
                     "prompt_id": old["prompt_id"], "before": old, "now": new})
        print(f"{old['prompt_id']} {result['method']}: within rounding {new['within_rounding']} "
              f"(reproduced {_reproduced_label(new)})", flush=True)
    out = {"run": str(folder), "settings": settings, "divergences": rows,
           "all_explained": all(row["now"]["within_rounding"] for row in rows)}
    (folder / "reexamined.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Re-examined divergences of `{folder}`", "",
             "Each bf16 divergence the run left unexplained, examined again by the bench's current checks "
             "(`benchmarks/reexamine_divergences.py`): the gap on the plain prefix, the last j tokens re-read in one "
             "forward (j = 1..16), and the whole reply read in forwards of c tokens (c = 2..16).", "",
             "| prompt set | dtype | method | prompt | position | tokens (plain / method) | gap (bf16 spacings) | "
             "reproduced | within rounding |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        now = row["now"]
        lines.append(f"| {row['prompt_set']} | {row['dtype']} | {row['method']} | {row['prompt_id']} | "
                     f"{now['position']} | {now['plain_token']} / {now['method_token']} | {now['gap']:.4f} "
                     f"({now['gap_bf16_spacings']:.1f}) | {_reproduced_label(now)} | {now['within_rounding']} |")
    lines += ["", f"All explained: {out['all_explained']}."]
    (folder / "reexamined.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if out["all_explained"] else 1


if __name__ == "__main__":
    sys.exit(main())
