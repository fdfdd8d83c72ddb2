"""Peak training memory of one stage-2 step against S, next to a self-attention test-time-training (TTT) unroll.

Both drafts read the same batch of a SmolLM2-135M-shaped target (hidden 576, 9 / 3 heads, ffn 1536, vocab 49152;
`--layers` layers, random weights, so it builds fast) and are trained with the same loss (soft CE over the draft
vocabulary + λ_v SmoothL1, `trainer.objectives.position_losses`) and the same shared, frozen embedding / lm_head:

- `beagle`: Beagle's stage 2 (method.md §3) exactly as `BeagleTrainer.stage2_step` runs it: S simulation steps of
  `trainer.objectives.stage2_step` over keys [H ; D], each step's β_t-weighted loss back-propagated before the next,
  the draft buffer D detached (the default, constant-memory mode).
- `selfattn-ttt`: an EAGLE-style draft (FC over [token embedding; feature] into one `LlamaDecoderLayer`-shaped
  self-attention block, a final RMSNorm, the shared head) trained with HASS / EAGLE-3 test-time training: step i
  feeds the draft's own outputs of step i-1 back as T new query rows (tokens shifted by one more position) whose
  keys are appended to the attention (causal over the step-0 keys, the diagonal over each later step's keys, as in
  EAGLE-3's `cnets.py`), and the graph of the whole unroll is kept until one backward at the end.

How memory is measured (one fresh subprocess per configuration, `MALLOC_MMAP_THRESHOLD_=65536` so that freed
tensors go back to the OS at once). The worker builds the target, the draft, the batch, the target's states and the
soft labels of the batch (the same for both methods: they are the "batch", not part of the step), runs one warm-up
step and drops the gradients. Then:

1. `peak_mb` (primary): one step under `torch.profiler` with `profile_memory=True`. PyTorch's CPU allocator reports
   every tensor allocation / free made inside the profiled window with the running total of live bytes allocated in
   that window ("Total Allocated"); its maximum is the step's peak tensor memory above the baseline: the CPU analogue
   of `torch.cuda.max_memory_allocated() - memory_allocated()` before the step. Exact and deterministic.
2. `rss_peak_mb` (cross-check): one unprofiled step while a thread samples the process RSS (psutil) every ~1 ms;
   the maximum minus the RSS just before the step. It also counts allocator slack and non-tensor memory, and can
   miss spikes shorter than the sampling period.

    python benchmarks/stage2_memory.py --out benchmarks/results/stage2_memory

writes `<out>.json`, `<out>.md` and (when matplotlib is importable) `<out>.png`.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

METHODS = ("beagle", "selfattn-ttt")
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ models and batch
def target_config(layers: int, vocab: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, eos_token_id=None, pad_token_id=0)


class SelfAttentionTTTDraft(nn.Module):
    """EAGLE-style draft: h' = Block(FC([e(t_{p+1}); f_p])) with one Llama decoder layer of self-attention.

    `unroll` runs HASS / EAGLE-3 test-time training: step i's rows carry the tokens shifted by i + 1 and the features
    the previous step produced; step i's keys/values are appended to a per-step cache that later steps read (causal
    over step 0, the diagonal over steps 1..i), and nothing is detached.
    """

    def __init__(self, config):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(config)
        self.head_dim = d // config.num_attention_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads

    def step(self, embeds, features, position_embeddings, causal, cache):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = self.layer.self_attn
        batch, length = embeds.shape[:2]
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
        residual = x
        x = self.layer.input_layernorm(x)
        shape = (batch, length, -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        cache.append((k, v))
        k0, v0 = cache[0]
        scale = self.head_dim ** -0.5
        scores = [(q @ k0.transpose(2, 3)) * scale + causal]
        scores += [((q * ki).sum(-1) * scale)[..., None] for ki, _ in cache[1:]]  # the diagonal of later steps
        probs = torch.cat(scores, dim=-1).float().softmax(-1).to(q.dtype)
        out = probs[..., :length] @ v0
        for j, (_, vj) in enumerate(cache[1:]):
            out = out + probs[..., length + j, None] * vj
        x = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        x = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
        return x

    def unroll(self, beagle, input_ids, states, probs, steps: int, smooth_l1_weight: float):
        """Loss of an S-step TTT unroll (graph kept). `probs` (batch, T, V): the target's soft labels at every row."""
        from trainer.objectives import SoftLabels, position_losses

        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
        features = states
        position_embeddings = self.rotary(states, positions)
        dtype = position_embeddings[0].dtype
        causal = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
        cache, total = [], 0
        for i in range(steps):
            shift = i + 1
            tokens = torch.cat([input_ids[:, shift:], input_ids.new_zeros(batch, shift)], dim=1)
            embeds = beagle.embed(tokens)
            out = self.norm(self.step(embeds, features, position_embeddings, causal, cache))
            rows = length - shift  # row p predicts t_{p+i+2} from P_{p+i+1}; the last rows have no label
            terms = position_losses(beagle, out[:, :rows], states[:, shift:], SoftLabels(probs[:, shift:]))
            total = total + terms.loss(smooth_l1_weight).mean()
            features = out
        return total


def build(args):
    from modeling_beagle import BeagleModel
    from transformers import LlamaForCausalLM

    from trainer.objectives import soft_labels_from_states

    torch.manual_seed(args.seed)
    weight_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = target_config(args.layers)
    target = LlamaForCausalLM(config).eval().to(weight_dtype).requires_grad_(False)
    overrides = {"dtype": weight_dtype}
    if args.draft_vocab:
        overrides["draft_vocab_size"] = args.draft_vocab
    beagle = BeagleModel.from_target(target, **overrides).train()
    if args.draft_vocab:
        beagle.set_draft_vocabulary(torch.randperm(config.vocab_size)[: args.draft_vocab])
    ttt = SelfAttentionTTTDraft(config).to(weight_dtype).train()
    input_ids = torch.randint(1, config.vocab_size, (args.batch, args.seq_len))
    with torch.no_grad():
        states = target.model(input_ids=input_ids).last_hidden_state  # top layer, post-final-norm
        chunks = [soft_labels_from_states(beagle, s).probs for s in states.split(1)]  # chunked: no transient peak
    labels_probs = torch.cat(chunks).view(-1, chunks[0].shape[-1])  # rows of the supervised (= all) positions
    return target, beagle, ttt, input_ids, states, labels_probs


def beagle_stage2_step(beagle, input_ids, states, probs, steps: int, smooth_l1_weight: float, autocast):
    """`BeagleTrainer.stage2_step` with D detached: S calls of `stage2_step`, one backward per step."""
    from trainer.objectives import SoftLabels, draw_window_offsets, stage2_step

    labels = SoftLabels(probs)
    supervised = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = torch.ones_like(input_ids)
    offsets = draw_window_offsets(input_ids.shape[0], steps, input_ids.device)
    draft = torch.zeros_like(states, dtype=beagle.dtype)
    weights = [steps - t + 1 for t in range(1, steps + 1)]
    num_supervised = supervised.sum().clamp(min=1)
    for t in range(1, steps + 1):
        with autocast():
            loss_sum, _, _, new_states, at_step = stage2_step(beagle, input_ids, states, draft, states, labels,
                                                              supervised, attention_mask, steps, offsets, t,
                                                              smooth_l1_weight)
        loss = weights[t - 1] * loss_sum / num_supervised / (sum(weights) / steps)
        loss.backward()
        draft = torch.where(at_step[..., None], new_states.detach(), draft)


def ttt_step(ttt, beagle, input_ids, states, probs, steps: int, smooth_l1_weight: float, autocast):
    with autocast():
        loss = ttt.unroll(beagle, input_ids, states, probs.view(*input_ids.shape, -1), steps, smooth_l1_weight)
    loss.backward()


class RSSSampler:
    def __init__(self, period: float = 0.001):
        import psutil

        self.process, self.period = psutil.Process(), period
        self.peak, self._stop = 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period)

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def profiled_peak_bytes(fn) -> int:
    """Peak bytes of live tensors allocated inside `fn`, from the profiler's CPU allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    cpu = [e for e in events if e.get("Device Type", 0) == 0]
    if not cpu:
        return 0
    start = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]  # the running total before the first event
    return max(e["Total Allocated"] for e in cpu) - start


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    target, beagle, ttt, input_ids, states, probs = build(args)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "autocast"
                else nullcontext)
    if args.method == "beagle":
        def fn():
            beagle_stage2_step(beagle, input_ids, states, probs, args.steps, beagle.config.smooth_l1_weight, autocast)
        params = [p for p in beagle.parameters() if p.requires_grad]
    else:
        def fn():
            ttt_step(ttt, beagle, input_ids, states, probs, args.steps, beagle.config.smooth_l1_weight, autocast)
        params = [p for p in ttt.parameters() if p.requires_grad]

    def zero_grad():
        for p in params:
            p.grad = None

    torch.manual_seed(args.seed + 1)
    fn()  # warm-up: one-time allocations (kernels, thread pools)
    zero_grad()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(args.seed + 1)
    with RSSSampler() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    zero_grad()
    torch.manual_seed(args.seed + 1)
    peak = profiled_peak_bytes(fn)
    return {"method": args.method, "S": args.steps, "peak_mb": peak / 2**20,
            "rss_peak_mb": (rss.peak - rss.start) / 2**20, "rss_before_mb": rss.start / 2**20,
            "process_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "maxrss_before_mb": maxrss_before / 1024, "step_s": seconds,
            "trainable_params": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------------------- driver
def run_config(args, method: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method, "--steps", str(steps),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--layers", str(args.layers),
           "--precision", args.precision, "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.draft_vocab:
        cmd += ["--draft-vocab", str(args.draft_vocab)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} S={steps} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["S"] for r in mine], [r["peak_mb"] for r in mine], marker="o", label=method)
    ax.set_xlabel("simulation / unroll steps S")
    ax.set_ylabel("peak tensor memory of one step (MiB)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/stage2_memory")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="values of S")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2, help="target layers (the draft's cost does not depend on it)")
    parser.add_argument("--precision", choices=["fp32", "autocast", "bf16"], default="fp32",
                        help="fp32; fp32 weights + bf16 autocast; or bf16 weights (target, states and drafts)")
    parser.add_argument("--draft-vocab", type=int, default=None, help="reduced draft vocabulary size (both drafts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.steps = args.steps[0]
        print(json.dumps(worker(args)))
        return

    rows = []
    for steps in args.steps:
        for method in args.methods:
            row = run_config(args, method, steps)
            rows.append(row)
            print(f"{method:>13} S={steps}: peak {row['peak_mb']:8.1f} MiB  (RSS {row['rss_peak_mb']:8.1f} MiB)  "
                  f"step {row['step_s']:.2f} s", flush=True)
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        for r in mine:
            r["peak_vs_S1"] = r["peak_mb"] / mine[0]["peak_mb"]
    settings = {
        "target": f"Llama {args.layers} layers, hidden 576, 9/3 heads, ffn 1536, vocab 49152, tied (random weights)",
        "batch": args.batch, "seq_len": args.seq_len, "precision": args.precision,
        "draft_vocab": args.draft_vocab or 49152, "loss": "soft CE + 10 * SmoothL1 (both methods)",
        "beagle": "trainer.objectives.stage2_step x S, window k = S, beta_t weights, backward per step, D detached",
        "selfattn-ttt": "FC([emb; feature]) + 1 Llama decoder layer + RMSNorm; EAGLE-3 TTT unroll (causal over "
                        "step-0 keys, diagonal over later steps' keys), one backward at the end",
        "memory": "peak_mb: torch.profiler CPU allocator 'Total Allocated' peak over one step above the baseline "
                  "(models, batch, target states, soft labels resident; after one warm-up step, grads dropped); "
                  "rss_peak_mb: sampled RSS (psutil, 1 ms) peak growth over an unprofiled step; fresh subprocess "
                  "per configuration, MALLOC_MMAP_THRESHOLD_=65536",
        "beagle_attn_implementation": "sdpa", "selfattn_attention": "eager (EAGLE-3 cnets.py style)",
    }
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "settings": settings, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))

    lines = ["| method | S | peak MiB (allocator) | × S=1 | peak MiB (RSS, sampled) | step s |", "|---|---|---|---|---|---|"]
    for method in args.methods:
        for r in (r for r in rows if r["method"] == method):
            lines.append(f"| {method} | {r['S']} | {r['peak_mb']:.0f} | {r['peak_vs_S1']:.2f} | "
                         f"{r['rss_peak_mb']:.0f} | {r['step_s']:.2f} |")
    table = "\n".join(lines)
    summary = []
    for method in args.methods:
        peaks = [r["peak_mb"] for r in rows if r["method"] == method]
        summary.append(f"- {method}: peak from {min(peaks):.0f} to {max(peaks):.0f} MiB over S = "
                       f"{args.steps[0]}..{args.steps[-1]} (max/min = {max(peaks) / min(peaks):.2f}; "
                       f"median {statistics.median(peaks):.0f} MiB)")
    title = (f"stage-2 step peak memory, batch {args.batch}x{args.seq_len}, {args.precision}, "
             f"vocab {args.draft_vocab or 49152}")
    plotted = plot(rows, out.with_suffix(".png"), title)
    plot_line = (f"![peak memory vs S]({out.with_suffix('.png').name})" if plotted
                 else "(no plot: matplotlib is not installed; `pip install matplotlib` and rerun)")
    machine = result["machine"]
    md = [f"# Stage-2 training memory vs S: Beagle against a self-attention TTT unroll", "",
          f"Machine: {machine['platform']}, {machine['processor'] or 'cpu'}, {machine['threads']} threads, "
          f"torch {machine['torch']}.", "",
          "Settings: " + json.dumps(settings), "", table, "", *summary, "", plot_line, "",
          "Memory is the growth above the resident models and batch (target states and soft labels included in the "
          "baseline, identical for both methods). Step times are single unprofiled runs on a shared machine: noisy."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(table)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
