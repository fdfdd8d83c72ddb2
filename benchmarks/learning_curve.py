"""Learning curves at equal budget: Beagle against the EAGLE-2-style draft, τ on held-out prompts vs training time.

Both drafts are trained from scratch by the same trainer (`beagle train` and `python benchmarks/eagle2_draft.py
train`) with the same target, data, draft vocabulary, optimizer steps, batch, sequence length and learning-rate
schedule, from one shared offline cache (built once, by the first run). Each evaluation decodes MT-bench first turns
greedily with the draft through `target.generate(assistant_model=draft)` (checked token for token against plain
greedy) and records τ and the training wall time so far (evaluations excluded): `--tau_eval_prompts`.

    python benchmarks/learning_curve.py --records 2000:2600 --max-steps 600 --eval-steps 100

Each run is a child process, so its peak resident memory is its own (`os.wait4`). Writes `learning_curve.json`,
`learning_curve.md` and `learning_curve.png` into `--output-dir`.

Runs trained elsewhere (a recipe run that spanned sessions, say) are compared without training anything:

    python benchmarks/learning_curve.py --from-run beagle=runs/smollm2-135m-instruct \
        --from-run eagle2=runs/eagle2-recipe --output-dir benchmarks/results/learning_curve_recipe

Each folder is a `beagle train` (or `eagle2_draft.py train`) output folder: its `tau_curve.jsonl` and its saved
draft's `training_record` (every process of the run: wall time, steps, token-updates); peak memory is not known there.
A draft trained in parts (each continuing the last with `--init_from`) is `LABEL=PART1_DIR+PART2_DIR`; an earlier part
may be a committed copy of its curve (a folder holding `tau_curve.jsonl`, or that file), as long as the last part is
a run folder with its saved draft (whose training record holds every part).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
DRAFTS = {  # name: (the command that trains it, the folder its checkpoint is saved under)
    "beagle": ([sys.executable, "-m", "trainer.cli", "train"], "beagle"),
    "eagle2": ([sys.executable, os.path.join(ROOT, "benchmarks", "eagle2_draft.py"), "train"], "eagle2"),
}


def train_argv(args, source: str, output_dir: str, name: str) -> list[str]:
    return ["--target_model", TARGET, "--target_dtype", args.target_dtype, "--dataset", source,
            "--max_length", str(args.max_length), "--eval_records", str(args.eval_records),
            "--draft_vocab_size", str(args.draft_vocab_size),
            "--offline_cache_dir", args.cache_dir or os.path.join(args.work_dir, "cache"),
            "--offline_topk", "32", "--output_dir", output_dir, "--max_steps", str(args.max_steps),
            "--stage1_ratio", str(args.stage1_ratio), "--stage1_window", str(args.stage1_window),
            "--stage2_steps", "4",
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--lr_scheduler_type", "cosine", "--warmup_steps", str(args.warmup_steps), "--logging_steps", "25",
            "--save_strategy", "no", "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps),
            "--per_device_eval_batch_size", str(args.batch_size), "--tau_eval_prompts", str(args.tau_prompts),
            "--tau_eval_new_tokens", str(args.tau_new_tokens), "--report_to", "none", "--seed", "0",
            "--target_layer_ids", *[str(i) for i in args.target_layer_ids]] + (
            beagle_argv(args) if name == "beagle" else [])


def beagle_argv(args) -> list[str]:
    """Options of the Beagle variant under test (the EAGLE-2-style draft has none of them)."""
    argv = ["--recency_bias", "true"] if args.recency_bias else []
    if args.query_newest_state:
        argv += ["--query_newest_state", "true"]
    if args.context_next_token:
        argv += ["--context_next_token", "true"]
    if args.num_key_value_heads:
        argv += ["--num_key_value_heads", str(args.num_key_value_heads)]
    if args.stage1_offset_weights != "uniform":
        argv += ["--stage1_offset_weights", args.stage1_offset_weights]
    return argv


def run_child(command: list[str], log_path: str) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak resident set in bytes) of one training run, its output into `log_path`."""
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - started, usage.ru_maxrss * 1024


def plot(curves: dict, path: str, target_dtypes: set[str]) -> None:
    """τ against training time for each draft; the y label names the target dtype(s) the evaluations ran in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        points = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
        ax.plot([r["train_wall_s"] / 60 for r in points], [r["eval_tau"] for r in points], marker="o", label=name)
    ax.set_xlabel("training wall time (min, evaluations excluded)")
    names = {"bfloat16": "bf16", "float32": "fp32"}
    ax.set_ylabel(f"τ (MT-bench, greedy chain, {' / '.join(sorted(names.get(d, d) for d in target_dtypes))} target)")
    ax.set_title("Learning curves at equal steps, data and batch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="2000:2600", help="ShareGPT slice A:B both drafts train on")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--eval-records", type=int, default=16, help="held-out conversations for α")
    parser.add_argument("--tau-prompts", type=int, default=3, help="MT-bench first turns decoded at each evaluation")
    parser.add_argument("--tau-new-tokens", type=int, default=48)
    parser.add_argument("--target-dtype", default="auto")
    parser.add_argument("--drafts", default="beagle,eagle2", help="which drafts to train, in order")
    parser.add_argument("--target-layer-ids", type=int, nargs="+", default=[-1],
                        help="target layers whose states the drafts read (Beagle fuses several with an FC; the "
                             "EAGLE-2-style draft takes only [-1])")
    parser.add_argument("--recency-bias", action="store_true", help="Beagle with BeagleConfig.recency_bias")
    parser.add_argument("--query-newest-state", action="store_true",
                        help="Beagle with BeagleConfig.query_newest_state")
    parser.add_argument("--context-next-token", action="store_true",
                        help="Beagle with BeagleConfig.context_next_token")
    parser.add_argument("--num-key-value-heads", type=int,
                        help="Beagle with its own key/value head count (default: the target's, 3 for SmolLM2-135M)")
    parser.add_argument("--stage1-ratio", type=float, default=0.5,
                        help="share of the steps in Beagle's stage 1 (the EAGLE-2-style draft has one stage)")
    parser.add_argument("--stage1-window", type=int, default=4,
                        help="Beagle's stage-1 window k (1: plain next-token training, as the EAGLE-2-style draft)")
    parser.add_argument("--stage1-offset-weights", default="uniform", choices=("uniform", "decay"),
                        help="Beagle's stage-1 loss weights by window offset (BeagleConfig.stage1_offset_weights)")
    parser.add_argument("--suffix", default="", help="appended to each draft's name in the results (a variant)")
    parser.add_argument("--include", action="append", default=[],
                        help="another run's learning_curve.json whose curves join this table and plot")
    parser.add_argument("--work-dir", default="runs/learning_curve")
    parser.add_argument("--cache-dir", help="the offline cache (default <work-dir>/cache); another run's cache of the "
                        "same data, vocabulary and target layers is reused as it is")
    parser.add_argument("--output-dir", default="benchmarks/results/learning_curve")
    parser.add_argument("--from-run", action="append", default=[], metavar="LABEL=OUTPUT_DIR",
                        help="compare a finished training run's curve instead of training (repeatable)")
    args = parser.parse_args(argv)
    if args.from_run:
        runs, curves = finished_runs(args.from_run)
        return report(args, runs, curves, os.path.abspath(args.output_dir))
    from trainer.assets import resolve_data
    from trainer.data import read_records

    work, out = os.path.abspath(args.work_dir), os.path.abspath(args.output_dir)
    args.work_dir, args.cache_dir = work, args.cache_dir and os.path.abspath(args.cache_dir)  # children run in ROOT
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    start, stop = (int(x) for x in args.records.split(":"))
    source = os.path.join(work, "source.json")
    with open(source, "w", encoding="utf-8") as handle:
        json.dump(read_records(resolve_data("sharegpt"))[start:stop], handle, ensure_ascii=False)

    runs, curves = {}, {}
    for name in args.drafts.split(","):
        command, folder = DRAFTS[name]
        run_dir = os.path.join(work, name)
        curve_path = os.path.join(run_dir, "tau_curve.jsonl")
        if os.path.exists(curve_path):
            os.remove(curve_path)  # a rerun starts a fresh curve
        status, wall_s, peak = run_child(command + train_argv(args, source, run_dir, name),
                                         os.path.join(work, f"{name}.log"))
        if status != 0:
            raise SystemExit(f"{name}: training exited with {status}; see {os.path.join(work, name + '.log')}")
        label = name + args.suffix
        with open(curve_path, encoding="utf-8") as handle:
            curves[label] = [json.loads(line) for line in handle]
        with open(os.path.join(run_dir, folder, "config.json"), encoding="utf-8") as handle:
            record = json.load(handle)["training_record"]["runs"][-1]
        runs[label] = {"wall_s_with_cache_and_evals": round(wall_s, 1), "peak_rss_bytes": peak,
                       "token_updates": record["token_updates"], "steps": record["steps"], "data": record["data"],
                       "final": curves[label][-1], "target_dtype": record.get("target_dtype")}
        print(f"[learning_curve] {label}: {json.dumps(runs[label])}", flush=True)

    return report(args, runs, curves, out)


def _read_curve(part: str, spec: str, need_draft: bool) -> tuple[list[dict], str | None]:
    """A part's τ curve, and the path of its saved draft's config.json (None where `need_draft` is False and there is
    none). A part is a finished run's folder, or, for an earlier part of a draft trained in parts, a committed copy of
    its curve: a folder holding `tau_curve.jsonl` or the `.jsonl` file itself (e.g. `benchmarks/results/
    recipe-smollm2-amx-part4`, `benchmarks/eagle2-smollm2-135m-instruct/training/eagle2-recipe-part4.tau_curve.jsonl`).
    The totals come from the last part's draft, which records every part's processes."""
    is_file = part.endswith(".jsonl")
    curve_path = part if is_file else os.path.join(part, "tau_curve.jsonl")
    saved = [] if is_file else [os.path.join(part, name, "config.json") for _, name in DRAFTS.values()]
    config_path = next((path for path in saved if os.path.isfile(path)), None)
    if not os.path.isfile(curve_path) or (need_draft and config_path is None):
        if need_draft:
            expected = ("a finished training run's folder, with tau_curve.jsonl and a saved draft"
                        + (f" ({' or '.join(saved)})" if saved else "")
                        + (" (the last part: its draft's training record holds every part)" if "+" in spec else ""))
        else:
            expected = "a tau_curve.jsonl file or a folder holding one"
        found = "no tau_curve.jsonl" if not os.path.isfile(curve_path) else "no saved draft"
        raise SystemExit(f"--from-run {spec}: {part}: expected {expected}; found {found}.")
    with open(curve_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()], config_path


def finished_runs(specs: list[str]) -> tuple[dict, dict]:
    """`--from-run LABEL=OUTPUT_DIR`: each run's τ curve and the totals of its saved draft's `training_record`.

    `LABEL=DIR1+DIR2`: a draft trained in parts, each part continuing the previous part's draft (`--init_from`). The
    curves join end to end (a later part's steps and training time count on from the previous part's last point), and
    the totals are the last part's draft's `training_record`, which holds every part's processes. A part's α is on
    its own held-out records. Earlier parts may be committed copies of their curves (`_read_curve`), so a plot can be
    re-made on a machine that holds only the last part's run folder."""
    runs, curves = {}, {}
    for spec in specs:
        label, sep, folders = spec.partition("=")
        if not sep or not label or not folders:
            raise SystemExit(f"--from-run {spec!r}: expected LABEL=OUTPUT_DIR (e.g. beagle=runs/smollm2-135m-instruct).")
        curve, parts = [], folders.split("+")
        for number, folder in enumerate(parts, start=1):
            rows, config_path = _read_curve(folder, spec, need_draft=number == len(parts))
            if len(parts) > 1:
                last = curve[-1] if curve else {"step": 0, "train_wall_s": 0.0}
                rows = [{**row, "step": row["step"] + last["step"], "part": number,
                         "train_wall_s": row["train_wall_s"] + last["train_wall_s"]} for row in rows]
            curve += rows
        with open(config_path, encoding="utf-8") as handle:  # the last part's draft: it records every part
            record = json.load(handle)["training_record"]
        if len(parts) > 1 and len(record["runs"]) < len(parts):
            raise SystemExit(f"--from-run {spec}: {parts[-1]}'s draft records {len(record['runs'])} training "
                             f"process(es), expected at least one per part ({len(parts)}): is it a continuation "
                             f"(--init_from) of the earlier parts?")
        curves[label] = curve
        runs[label] = {"wall_s_with_cache_and_evals": record["total_wall_s"], "peak_rss_bytes": None,
                       "token_updates": record["total_token_updates"], "steps": record["total_steps"],
                       "data": "; ".join(str(r.get("data")) for r in record["runs"]),
                       "machine": record["runs"][-1].get("machine"),
                       "final": curves[label][-1], "run_dir": "+".join(parts),
                       "target_dtype": record["runs"][-1].get("target_dtype")}
    return runs, curves


def report(args, runs: dict, curves: dict, out: str) -> int:
    """Write learning_curve.json / .md / .png into `out` (with `--include`d earlier results) and print the table."""
    os.makedirs(out, exist_ok=True)
    for path in args.include:
        with open(path, encoding="utf-8") as handle:
            other = json.load(handle)
        curves.update({k: v for k, v in other["curves"].items() if k not in curves})
        runs.update({k: v for k, v in other["runs"].items() if k not in runs})
    # Greedy identity is exact only in float32: a bf16 target's multi-token verification rounds differently from its
    # one-token decoding and can flip near-ties (README, Benchmarks), so bf16 curves report their identical share
    # instead. A run without a recorded dtype (older ledgers) is held to float32's rule.
    target_dtypes = {name: (runs.get(name) or {}).get("target_dtype") or "float32" for name in curves}
    bf16 = {name for name, dtype in target_dtypes.items() if dtype == "bfloat16"}
    valid = all(r["eval_greedy_identical"] == 1.0 for name, rows in curves.items() if name not in bf16 for r in rows)
    # Compared finished runs: their settings are in their training records, not in this command's defaults.
    settings = {"from_run": args.from_run, "include": args.include} if args.from_run else vars(args)
    report = {"valid": valid, "settings": settings, "runs": runs, "curves": curves,
              "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count()}}
    with open(os.path.join(out, "learning_curve.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    plot(curves, os.path.join(out, "learning_curve.png"), set(target_dtypes.values()) or {"float32"})
    names = list(curves)
    lines = ["# Learning curves at equal budget: Beagle vs the EAGLE-2-style draft", "",
             f"**{'VALID' if valid else 'INVALID: a speculative output differed from plain greedy'}**", "",
             f"Machine: {report['machine']}", "", f"Settings: {settings}", "",
             "τ: greedy chain decoding through `target.generate(assistant_model=draft)` on MT-bench first turns, "
             "target in the training dtype, every float32 output identical to plain greedy. Training wall time "
             "excludes the evaluations and the (shared) offline cache build.", ""]
    if bf16:
        shares = {name: [r["eval_greedy_identical"] for r in curves[name]] for name in sorted(bf16)}
        lines += ["bf16 target (" + ", ".join(sorted(bf16)) + "): verifying several tokens in one forward rounds "
                  "differently from one-token decoding and can flip near-ties, so identity is not required here; "
                  "share of identical outputs per evaluation: " +
                  "; ".join(f"{name} {' / '.join(f'{x:.2f}' for x in xs)}" for name, xs in shares.items()) +
                  " (not checked for ties here: `beagle bench` does that, and float32 identity is tested).", ""]
    lines += ["| step | " + " | ".join(f"{n} train s | {n} τ | {n} α1..4" for n in names) + " |",
              "|---|" + "---|---|---|" * len(names)]
    steps = sorted({r["step"] for rows in curves.values() for r in rows})
    for step in steps:
        cells = []
        for name in names:
            row = next((r for r in reversed(curves[name]) if r["step"] == step), None)
            if row is None:
                cells += ["–", "–", "–"]
                continue
            alphas = " / ".join(f"{row[k]:.2f}" for k in sorted(row) if k.startswith("eval_alpha_step_"))
            cells += [f"{row['train_wall_s']:.0f}", f"{row['eval_tau']:.3f}", alphas]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| draft | token-updates | peak RSS | wall s (cache, training, evaluations) |", "|---|---|---|---|"]
    for name, run in runs.items():
        peak = "–" if run["peak_rss_bytes"] is None else f"{run['peak_rss_bytes'] / 2**30:.2f} GiB"
        lines.append(f"| {name} | {run['token_updates']:,} | {peak} | "
                     f"{run['wall_s_with_cache_and_evals']:.0f} |")
    with open(os.path.join(out, "learning_curve.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
