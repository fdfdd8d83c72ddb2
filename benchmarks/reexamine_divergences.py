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

`--replay-fp32` adds, for each divergence these checks still leave unexplained, the exact-arithmetic test: the run's
method rebuilt as the bench built it (its `--beagle` checkpoint, `--tree-shape`, `--plugin`s and packing) generates
on the same prompt with the float32 target, and its whole reply is compared with float32 plain greedy. Identical
means the method is lossless on that prompt where rounding cannot interfere, so the bf16 divergence is the bf16
arithmetic's (verifying several tokens in one forward); a biased method would leave plain greedy in float32 too.
It is evidence, not a proof for the bf16 position: the row stays "not within rounding" and the report says both.
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
    BUILTIN_METHODS,
    BenchSettings,
    Case,
    _reproduced_label,
    _Setting,
    examine_divergence,
    generation_kwargs,
    load_methods,
    load_plugin,
    parse_tree_shape,
)
from trainer.precision import DTYPES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a beagle bench output folder (with bench.json)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--replay-fp32", action="store_true",
                        help="also regenerate each still unexplained method's reply with the float32 target and compare "
                        "it with float32 plain greedy")
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
        row = {"prompt_set": result["prompt_set"], "dtype": dtype, "method": result["method"],
               "prompt_id": old["prompt_id"], "before": old, "now": new}
        if args.replay_fp32 and not new["within_rounding"]:
            row["fp32_replay_identical"] = replay_in_fp32(settings, result["method"], prompt, targets)
        rows.append(row)
        print(f"{old['prompt_id']} {result['method']}: within rounding {new['within_rounding']} "
              f"(reproduced {_reproduced_label(new)})"
              + (f"; float32 replay identical to plain greedy: {row['fp32_replay_identical']}"
                 if "fp32_replay_identical" in row else ""), flush=True)
    out = {"run": str(folder), "settings": settings, "divergences": rows,
           "all_explained": all(row["now"]["within_rounding"] for row in rows)}
    (folder / "reexamined.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Re-examined divergences of `{folder}`", "",
             "Each bf16 divergence the run left unexplained, examined again by the bench's current checks "
             "(`benchmarks/reexamine_divergences.py`): the gap on the plain prefix, the last j tokens re-read in one "
             "forward (j = 1..16), and the whole reply read in forwards of c tokens (c = 2..16).", "",
             "| prompt set | dtype | method | prompt | position | tokens (plain / method) | gap (bf16 spacings) | "
             "reproduced | within rounding | float32 replay identical to plain greedy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        now = row["now"]
        lines.append(f"| {row['prompt_set']} | {row['dtype']} | {row['method']} | {row['prompt_id']} | "
                     f"{now['position']} | {now['plain_token']} / {now['method_token']} | {now['gap']:.4f} "
                     f"({now['gap_bf16_spacings']:.1f}) | {_reproduced_label(now)} | {now['within_rounding']} | "
                     f"{row.get('fp32_replay_identical', '–')} |")
    lines += ["", f"All explained: {out['all_explained']}."]
    if any("fp32_replay_identical" in row for row in rows):
        lines += [f"Every unexplained one replays identically in float32: "
                  f"{all(row.get('fp32_replay_identical', True) for row in rows)} (evidence that the method is "
                  "lossless on those prompts in exact arithmetic, not a proof for the bf16 position)."]
    (folder / "reexamined.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if out["all_explained"] else 1


def replay_in_fp32(settings: dict, method_name: str, prompt: list[int], cache: dict) -> bool:
    """The run's method `method_name`, rebuilt for the float32 target as `beagle bench` builds it, on `prompt`:
    whether its reply (the run's `max_new_tokens`, greedy) equals float32 plain greedy's token for token."""
    if "replay" not in cache:
        target, tokenizer = load_target(settings["target"], DTYPES["float32"])
        if settings.get("prepack"):
            prepack_linear_weights(target)
        names = [n for n in BUILTIN_METHODS if n != "plain" and (settings.get("beagle") or not n.startswith("beagle"))]
        methods = load_methods(target, tokenizer, names, settings.get("beagle"),
                               [parse_tree_shape(shape)  # every shape of a sweep: its methods are named by shape
                                for shape in str(settings.get("tree_shape") or "auto").split(", ")],
                               settings.get("prompt_lookup_num_tokens", 10),
                               [load_plugin(spec) for spec in settings.get("plugins") or []])
        cache["replay"] = target, {m.name: m for m in methods}
    target, methods = cache["replay"]
    if method_name not in methods:
        raise SystemExit(f"--replay-fp32: the run's method {method_name!r} cannot be rebuilt here (found "
                         f"{sorted(methods)}).")
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    new_tokens = settings["max_new_tokens"]
    plain = target.generate(ids, attention_mask=mask, **generation_kwargs(target, new_tokens, False, 0.0))
    replayed = methods[method_name].run(ids, mask, new_tokens, False, 0.0, 0).output_ids
    return bool(torch.equal(replayed, plain))


if __name__ == "__main__":
    sys.exit(main())
