"""Training cost of one optimizer step: wall time and peak memory of Beagle stage 1, Beagle stage 2 at S = 1..6 and
the EAGLE-2-style baseline draft (benchmarks/eagle2_draft.py), on the same batch, through the trainers' own code.

Every configuration runs in a fresh subprocess. The worker builds the target (a SmolLM2-135M-shaped Llama with
`--layers` layers and random weights, as in benchmarks/stage2_memory.py; or the real SmolLM2-135M-Instruct with
`--real`), one batch of `--batch` x `--seq-len` random tokens (the first eighth of each row unsupervised, like a
prompt) and the draft, then builds the draft's trainer (`BeagleTrainer` or `Eagle2Trainer`, `BeagleTrainingArguments`
with the method defaults) and times its optimizer step exactly as `Trainer.train` runs it:
`trainer.training_step(model, batch)` (forward(s) and backward(s); stage 2 backs up each of its S steps), gradient
clipping, `optimizer.step()`, `zero_grad`.

- `--features offline` (default): the batch is what `OfflineCollator` yields from an offline cache (target states in
  `--state-dtype`, top-`--topk` soft labels over the draft vocabulary), so the step is the draft's cost alone;
  `online`: the frozen target runs inside every step (and the full soft labels come from its head), as without a cache.
- Both drafts get the same draft vocabulary (`--draft-vocab`, a random subset of the target's, or the full head) and
  the same batch and labels.
- Wall time: `--warmup` untimed steps (the optimizer state is allocated then), then the median of `--repeats` steps.
  Run it as training runs, with jemalloc preloaded (`LD_PRELOAD=libjemalloc.so.2`); the workers keep freed memory
  (`MALLOC_CONF` unless set) and the results record the allocator.
- Memory: on CPU, `peak_mb` is the torch profiler's allocator peak over one step above the resident baseline (models,
  batch, optimizer state), `rss_peak_mb` a sampled-RSS cross-check (both helpers from benchmarks/stage2_memory.py);
  on CUDA, `torch.cuda.max_memory_allocated()` over one step minus the allocation before it. `resident_mb` is the
  baseline itself (the target, the draft, its gradients' buffers and the optimizer state, the batch).

    python benchmarks/train_cost.py                                      # writes benchmarks/results/train_cost.{json,md}
    python benchmarks/train_cost.py --real --precision bf16 --draft-vocab 8192
    python benchmarks/train_cost.py --batch 1 --seq-len 32 --vocab 2048 --out /tmp/train_cost   # a smoke run
    python benchmarks/train_cost.py --precision bf16 --draft-vocab 8192 --batch 16 --steps 4 \
        --beagle-option recency_bias=true --beagle-option query_newest_state=true \
        --beagle-option context_next_token=true            # the shipped recipe's draft and batch
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ("beagle-stage1", "beagle-stage2", "eagle2")
REAL_TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _load_benchmark(name: str):
    """A sibling benchmark file as a module (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------- worker
def build_target(args, device):
    dtype = torch.bfloat16 if args.target_dtype == "bfloat16" else torch.float32
    if args.real:
        from trainer.assets import load_target

        target, _ = load_target(REAL_TARGET, dtype, device=device)
        return target
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = _load_benchmark("stage2_memory").target_config(args.layers, args.vocab)
    return LlamaForCausalLM(config).eval().to(device=device, dtype=dtype).requires_grad_(False)


def parse_beagle_options(items) -> dict:
    """`KEY=VALUE` pairs (VALUE as JSON: true, 0.5, "x") into BeagleConfig overrides."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--beagle-option expects KEY=VALUE (e.g. recency_bias=true), found {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--beagle-option {key}: VALUE must be JSON (true, 0.5, \"text\"), "
                             f"found {value!r}") from None
    return options


def build_draft(args, target, kind: str, draft_ids):
    overrides = dict(attn_implementation=args.attn_implementation)
    if kind != "eagle2":
        overrides.update(parse_beagle_options(args.beagle_option))
    if draft_ids is not None:
        overrides["draft_vocab_size"] = len(draft_ids)
    torch.manual_seed(args.seed + 1)
    if kind == "eagle2":
        draft = _load_benchmark("eagle2_draft").Eagle2Draft.from_target(target, **overrides)
    else:
        from modeling_beagle import BeagleModel

        draft = BeagleModel.from_target(target, **overrides)
    if draft_ids is not None:
        draft.set_draft_vocabulary(draft_ids)
    return draft


def build_batch(args, target, draft, device) -> dict:
    """One batch, identical for every configuration (same seed, same draft vocabulary, same target)."""
    from trainer.offline_cache import _forward_states, _topk_labels

    generator = torch.Generator().manual_seed(args.seed + 2)
    vocab = target.config.vocab_size
    input_ids = torch.randint(1, vocab, (args.batch, args.seq_len), generator=generator)
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    loss_mask[:, : args.seq_len // 8] = False
    batch = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": torch.ones_like(input_ids)}
    if args.features == "online":
        return batch
    state_dtype = getattr(torch, args.state_dtype)
    with torch.no_grad():
        context, top = _forward_states(target, input_ids.to(device), batch["attention_mask"].to(device), [-1])
        draft.bind_target(target)
        probs, ids = _topk_labels(draft, top[loss_mask.to(device)], min(args.topk, draft.config.draft_vocab_size or vocab))
    batch.update(context_states=context.to(state_dtype).cpu(), target_states=top.to(state_dtype).cpu(),
                 topk_ids=ids.cpu(), topk_probs=probs.cpu())
    return batch


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    from trainer import BeagleTrainer, BeagleTrainingArguments
    from trainer.allocator import heap_allocator

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    target = build_target(args, device)
    vocab = target.config.vocab_size
    draft_ids = None
    if args.draft_vocab:
        draft_ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(args.seed))[: args.draft_vocab].sort().values
    kind = "eagle2" if args.config == "eagle2" else "beagle"
    draft = build_draft(args, target, kind, draft_ids)
    batch = build_batch(args, target, draft, device)

    trainer_class = _load_benchmark("eagle2_draft").Eagle2Trainer if kind == "eagle2" else BeagleTrainer
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = BeagleTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=1000,
            stage1_ratio=0.0 if args.config == "beagle-stage2" else 1.0, stage1_window=args.window,
            stage2_steps=args.S, report_to=[], save_strategy="no", logging_strategy="no",
            bf16=args.precision == "bf16", use_cpu=device.type == "cpu", seed=args.seed, learning_rate=1e-4,
            disable_tqdm=True)
        trainer = trainer_class(model=draft, args=training_args, target_model=target)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.max_steps, trainer.state.global_step = 1000, 0
    expected_stage = 2 if args.config == "beagle-stage2" else 1
    if trainer.current_stage() != expected_stage:
        raise RuntimeError(f"{args.config}: the trainer is in stage {trainer.current_stage()}, expected {expected_stage}")
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        trainer.training_step(model, dict(batch))
        torch.nn.utils.clip_grad_norm_(params, training_args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(args.seed + 3)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    optimizer_state = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    resident = (_tensor_mb(target.parameters()) + _tensor_mb(draft.parameters()) + _tensor_mb(optimizer_state)
                + _tensor_mb(v for v in batch.values()))
    row = {"config": args.config, "method": "eagle2" if kind == "eagle2" else "beagle",
           "stage": None if kind == "eagle2" else expected_stage,
           "S": args.S if args.config == "beagle-stage2" else None,
           "window": args.window if args.config == "beagle-stage1" else None,
           "step_s": statistics.median(times), "step_s_all": times,
           "supervised_tokens": int(batch["loss_mask"].sum()),
           "trainable_params": sum(p.numel() for p in params), "resident_mb": resident, "device": device.type,
           "allocator": heap_allocator(), "malloc_conf": os.environ.get("MALLOC_CONF")}
    row["supervised_tokens_per_s"] = row["supervised_tokens"] / row["step_s"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["memory_kind"] = "cuda max_memory_allocated - allocated before the step"
    else:
        helpers = _load_benchmark("stage2_memory")
        with helpers.RSSSampler() as rss:
            step()
        row["rss_peak_mb"] = (rss.peak - rss.start) / 2**20
        row["peak_mb"] = helpers.profiled_peak_bytes(step) / 2**20
        row["memory_kind"] = "torch.profiler CPU allocator peak above the baseline (rss_peak_mb: sampled RSS growth)"
    return row


# ------------------------------------------------------------------------------------------------------- driver
WORKER_OPTIONS = ("batch", "seq_len", "layers", "vocab", "draft_vocab", "precision", "target_dtype", "features",
                  "state_dtype", "topk", "window", "warmup", "repeats", "threads", "seed", "attn_implementation")


def run_config(args, config: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", config, "--S", str(steps)]
    for name in WORKER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    cmd += ["--real"] if args.real else []
    cmd += ["--cpu"] if args.cpu else []
    for item in args.beagle_option or []:
        cmd += ["--beagle-option", item]
    # Freed memory stays with the process, as the training recipe runs (jemalloc: README, Training; glibc: the two
    # thresholds): otherwise a step's large fresh tensors page-fault in and the timings measure the kernel.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} S={steps} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(row: dict) -> str:
    if row["config"] == "beagle-stage1":
        return f"Beagle stage 1 (k={row['window']})"
    if row["config"] == "beagle-stage2":
        return f"Beagle stage 2, S={row['S']}"
    return "EAGLE-2-style draft"


def markdown(result: dict) -> str:
    rows, settings, machine = result["rows"], result["settings"], result["machine"]
    cpu = all(r["device"] == "cpu" for r in rows)
    head = "| configuration | step s (median) | supervised tok/s | peak MiB | " + ("RSS peak MiB | " if cpu else "") + \
        "resident MiB | trainable params |"
    lines = [head, "|" + "---|" * (7 if cpu else 6)]
    for r in rows:
        rss = f"{r['rss_peak_mb']:.0f} | " if cpu else ""
        lines.append(f"| {label(r)} | {r['step_s']:.3f} | {r['supervised_tokens_per_s']:.0f} | {r['peak_mb']:.0f} | "
                     f"{rss}{r['resident_mb']:.0f} | {r['trainable_params']:,} |")
    summary = []
    eagle = next((r for r in rows if r["config"] == "eagle2"), None)
    for r in rows:
        if eagle is not None and r is not eagle:
            summary.append(f"- {label(r)} / EAGLE-2-style: peak memory x{r['peak_mb'] / max(eagle['peak_mb'], 1e-9):.2f},"
                           f" step time x{r['step_s'] / eagle['step_s']:.2f}")
    return "\n".join([
        "# Training cost per optimizer step: Beagle (stage 1, stage 2 at S) against the EAGLE-2-style draft", "",
        f"Machine: {machine['platform']}, {machine['processor'] or 'cpu'}, {machine['threads']} threads, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, allocator "
        f"{machine.get('allocator', 'not recorded')} (MALLOC_CONF {machine.get('malloc_conf')}).", "",
        "Settings: " + json.dumps(settings), "", *lines, "", *summary, "",
        "One optimizer step = the trainer's `training_step` (forward(s) + backward(s)), gradient clipping, AdamW step. "
        "Peak memory is the growth above the resident models, batch and optimizer state during one step. Step times "
        "are medians of a few steps on a possibly shared machine: compare ratios from the same run.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/train_cost")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="stage-2 S values")
    parser.add_argument("--window", type=int, default=4, help="stage-1 window k")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2, help="layers of the random target (ignored with --real)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary of the random target")
    parser.add_argument("--draft-vocab", type=int, default=None, help="reduced draft vocabulary (both drafts)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the trainer's bf16 mixed precision (TrainingArguments.bf16)")
    parser.add_argument("--target-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--features", choices=["offline", "online"], default="offline")
    parser.add_argument("--state-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--topk", type=int, default=64, help="top-k soft labels of the offline batch")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--beagle-option", action="append", metavar="KEY=VALUE",
                        help="a BeagleConfig override for the Beagle drafts, VALUE in JSON (repeatable), e.g. "
                             "recency_bias=true query_newest_state=true context_next_token=true: the shipped recipe")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first allocates the optimizer "
                        "state; with one, the timed steps still page-faulted in fresh memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help=f"the real target ({REAL_TARGET}) instead of a random one")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--S", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    beagle_options = parse_beagle_options(args.beagle_option)  # a malformed option stops the run before any worker

    jobs = []
    for config in args.configs:
        for steps in (args.steps if config == "beagle-stage2" else [max(args.steps)]):
            jobs.append((config, steps))
    rows = []
    for config, steps in jobs:
        row = run_config(args, config, steps)
        rows.append(row)
        print(f"{label(row):>28}: step {row['step_s']:.3f} s, peak {row['peak_mb']:.1f} MiB", flush=True)

    import transformers

    settings = {name: getattr(args, name) for name in WORKER_OPTIONS + ("real", "steps")}
    settings["beagle_options"] = beagle_options
    settings["target"] = REAL_TARGET if args.real else (f"Llama {args.layers} layers, hidden 576, 9/3 heads, ffn 1536, "
                                                         f"vocab {args.vocab} (random weights)")
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version(),
                          "allocator": rows[0]["allocator"], "malloc_conf": rows[0]["malloc_conf"]},
              "settings": settings, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
