"""Stage-1 training throughput and a short learning curve: full vs reduced draft vocabulary, fp32 vs bf16 autocast.

The target is built from a config with SmolLM2-135M's shapes (hidden 576, 9 / 3 heads, ffn 1536, vocab 49152;
`--layers` layers) and random weights. A default-initialised random target is a poor stand-in for a language model:
its next-token distributions are nearly uniform over all 49,152 tokens and its top state is a chaotic function of the
context, so a draft learns nothing in minutes. Three knobs give it the coarse statistics of a real LM instead:
the decoder layers are initialised with std `--target-init-std` (small: the next token depends mostly on the current
token, partly on the context), the lm_head is untied and scaled by `--logit-scale` (peaked distributions), and its
rows get Zipf-like norms `rank^-head_zipf` over a random ranking (a skewed token frequency, so that a reduced draft
vocabulary covers most of the data, as it does on real text). The data are the target's own sampled continuations of random prompts (`--prompt-len` random tokens, then
`--seq-len - prompt-len` tokens sampled at `--temperature`); the loss covers the sampled tokens only. The target's
top post-norm states are computed once and cached (like the offline feature cache); the soft labels are recomputed
from them at every step through Beagle's head (over the draft vocabulary when it is reduced), as the trainer does.

Each setting trains its own fresh Beagle with `trainer.objectives.stage1_forward` (window k = `--window`, a random
window offset per sequence per step) and a plain AdamW loop (betas 0.9 / 0.95, grad clip 0.5, linear warm-up then a
constant LR). The settings are interleaved in chunks of `--eval-every` seconds of training (A B C D A B C D ...), so
slow phases of a shared machine hit all of them alike; evaluation time is not counted as training time.

- Throughput: supervised token-updates/s = supervised (loss-mask) positions per step / step wall time.
- Learning curve: held-out top-1 agreement α per offset i = 1..k (stage-1 inverse block mask, fixed window offsets,
  eval mode) against the target's *full-vocabulary* argmax: a reduced-vocabulary draft's argmax is mapped back to
  target ids, so a target token outside the draft vocabulary counts as a miss (what verification would do).

Settings: `full-fp32` (the faithful setting: full 49,152-token head, fp32), `full-bf16`, `reduced-fp32`,
`reduced-bf16` (`draft_vocab_size = --draft-vocab`, `beagle.set_draft_vocabulary(ids)` with the most frequent
sampled tokens of the training data; bf16 = `torch.autocast("cpu", dtype=torch.bfloat16)` over the forward,
fp32 master weights).

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput            # ~60 s per setting
    python benchmarks/train_throughput.py --seconds 1200 --layers 4 --train-seqs 1024 ...     # a larger rerun

writes `<out>.json`, `<out>.md` and (when matplotlib is importable) `<out>.png`.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_beagle import BeagleModel
from modeling_beagle.generation_beagle import cache_kwargs
from modeling_beagle.masking_beagle import inverse_block_mask, window_starts
from trainer.objectives import draw_window_offsets, soft_labels_from_states, stage1_forward

SETTINGS = ("full-fp32", "full-bf16", "reduced-fp32", "reduced-bf16")


# --------------------------------------------------------------------------------------------- target and data
def build_target(args) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, eos_token_id=None, pad_token_id=0, bos_token_id=None,
                         initializer_range=args.target_init_std)
    torch.manual_seed(args.seed)
    target = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        target.model.embed_tokens.weight.normal_(0.0, 0.02)
        row_scale = (torch.randperm(config.vocab_size).float() + 1).pow(-args.head_zipf)
        row_scale /= row_scale.pow(2).mean().sqrt()
        target.lm_head.weight.normal_(0.0, 0.02).mul_(args.logit_scale * row_scale[:, None])
    return target


@torch.no_grad()
def sample_data(target, num: int, args, generator: torch.Generator) -> torch.Tensor:
    """`num` rows: `prompt_len` random tokens, then the target's own samples (KV cache, full-vocabulary sampling)."""
    from transformers import DynamicCache

    rows = []
    vocab = target.config.vocab_size
    for start in range(0, num, args.gen_batch):
        n = min(args.gen_batch, num - start)
        ids = torch.randint(1, vocab, (n, args.prompt_len), generator=generator)
        cache = DynamicCache(config=target.config)
        logits = target(input_ids=ids, **cache_kwargs(target, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        for _ in range(args.seq_len - args.prompt_len):
            probs = (logits.float() / args.temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
            logits = target(input_ids=nxt, **cache_kwargs(target, cache), use_cache=True).logits[:, -1]
        rows.append(ids)
    return torch.cat(rows)


@torch.no_grad()
def top_states(target, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([target.model(input_ids=chunk).last_hidden_state for chunk in ids.split(batch)])


# --------------------------------------------------------------------------------------------------- settings
class Run:
    """One setting: its own fresh Beagle, optimizer, counters and curve."""

    def __init__(self, name: str, target, args, draft_ids: torch.Tensor, seed: int):
        self.name, self.args = name, args
        self.reduced = name.startswith("reduced")
        self.bf16 = name.endswith("bf16")
        torch.manual_seed(seed)  # the same block initialisation for every setting
        overrides = {"draft_vocab_size": args.draft_vocab} if self.reduced else {}
        self.beagle = BeagleModel.from_target(target, **overrides).train()
        if self.reduced:
            self.beagle.set_draft_vocabulary(draft_ids)
        self.params = [p for p in self.beagle.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps, self.token_updates, self.train_s = 0, 0, 0.0
        self.step_rates, self.losses, self.curve = [], [], []

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def lr_at(self, step: int) -> float:
        return self.args.lr * min(1.0, (step + 1) / max(1, self.args.warmup_steps))

    def train_step(self, ids, states, loss_mask) -> None:
        start = time.perf_counter()
        supervised = loss_mask
        offsets = draw_window_offsets(ids.shape[0], self.args.window, ids.device, generator=self.generator)
        with self.autocast():
            labels = soft_labels_from_states(self.beagle, states[supervised])
            loss, _ = stage1_forward(self.beagle, ids, states, states, labels, supervised, torch.ones_like(ids),
                                     self.args.window, offsets, self.beagle.config.smooth_l1_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 0.5)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        n = int(supervised.sum())
        self.steps += 1
        self.token_updates += n
        self.train_s += seconds
        self.step_rates.append(n / seconds)
        self.losses.append(loss.item())

    @torch.no_grad()
    def evaluate(self, ids, states, loss_mask, target_argmax, offsets) -> list[float]:
        """α per offset 1..k against the target's full-vocabulary argmax (eval mode: no state noise)."""
        self.beagle.eval()
        k = self.args.window
        hits, counts = torch.zeros(k), torch.zeros(k)
        for rows in torch.arange(ids.shape[0]).split(self.args.batch):
            b_ids, b_states, b_mask = ids[rows], states[rows], loss_mask[rows]
            positions = torch.arange(b_ids.shape[1]).expand(len(rows), -1)
            starts = window_starts(positions, k, offsets[rows])
            with self.autocast():
                out = self.beagle(input_ids=b_ids, position_ids=positions, context_states=b_states,
                                  attention_mask=inverse_block_mask(positions, positions, starts), return_logits=False)
                logits = self.beagle.compute_logits(out.last_hidden_state[b_mask])
            guess = logits.argmax(-1)
            if self.beagle.draft_to_target is not None:
                guess = self.beagle.draft_to_target[guess]
            offset = (positions - starts)[b_mask]
            hits.index_add_(0, offset, (guess == target_argmax[rows][b_mask]).float())
            counts.index_add_(0, offset, torch.ones_like(offset, dtype=torch.float))
        self.beagle.train()
        return (hits / counts.clamp(min=1)).tolist()


# ------------------------------------------------------------------------------------------------------ output
def plot(result, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in result["rows"]:
        curve = row["curve"]
        x = [c["train_s"] for c in curve]
        axes[0].plot(x, [c["alpha"][0] for c in curve], marker="o", label=row["setting"])
        axes[1].plot(x, [statistics.mean(c["alpha"]) for c in curve], marker="o", label=row["setting"])
    axes[0].set_title("held-out α, offset 1")
    axes[1].set_title(f"held-out α, mean over offsets 1..{result['settings']['window']}")
    for ax in axes:
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("top-1 agreement with target argmax")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    k = result["settings"]["window"]
    base = next((r for r in result["rows"] if r["setting"] == "full-fp32"), result["rows"][0])
    head = "| setting | token-updates/s (median step) | token-updates/s (overall) | × full-fp32 | steps | train s | "
    head += " | ".join(f"α{i + 1}" for i in range(k)) + " | final loss |"
    lines = [head, "|" + "---|" * (7 + k)]
    for r in result["rows"]:
        alphas = " | ".join(f"{a:.3f}" for a in r["final_alpha"])
        lines.append(f"| {r['setting']} | {r['token_updates_per_s_median']:.0f} | {r['token_updates_per_s']:.0f} | "
                     f"{r['token_updates_per_s_median'] / base['token_updates_per_s_median']:.2f} | {r['steps']} | "
                     f"{r['train_s']:.0f} | {alphas} | {r['final_loss']:.3f} |")
    table = "\n".join(lines)
    curve_lines = ["| setting | train s | steps | token-updates | " + " | ".join(f"α{i + 1}" for i in range(k)) + " |",
                   "|" + "---|" * (4 + k)]
    for r in result["rows"]:
        for c in r["curve"]:
            curve_lines.append(f"| {r['setting']} | {c['train_s']:.1f} | {c['steps']} | {c['token_updates']} | "
                               + " | ".join(f"{a:.3f}" for a in c["alpha"]) + " |")
    plotted = plot(result, out.with_suffix(".png"))
    plot_line = (f"![learning curves]({out.with_suffix('.png').name})" if plotted
                 else "(no plot: matplotlib is not installed; `pip install matplotlib` and rerun)")
    m, s = result["machine"], result["settings"]
    md = ["# Stage-1 training throughput and learning curve", "",
          f"Machine: {m['platform']}, {m['processor'] or 'cpu'}, {m['threads']} threads, torch {m['torch']}.", "",
          "Settings: " + json.dumps(s), "",
          f"Reduced vocabulary covers {s['reduced_vocab_coverage']:.1%} of the held-out target argmax tokens "
          f"(upper bound of a reduced draft's α). The target's top-1 probability has median "
          f"{s['target_top1_prob_median']:.2f}; its argmax is what the current token alone gives (the context "
          f"ignored) at {s['target_argmax_token_only_share']:.1%} of held-out positions.", "",
          table, "", "Learning curve (held-out α per offset against the target's full-vocabulary argmax):", "",
          "\n".join(curve_lines), "", plot_line, "",
          "Timings on a shared 2-core machine are noisy; the settings were interleaved in chunks so ratios measured "
          "in the same run are the meaningful numbers."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/train_throughput")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall time per setting")
    parser.add_argument("--eval-every", type=float, default=10.0, help="seconds of training between evaluations")
    parser.add_argument("--layers", type=int, default=2, help="target layers")
    parser.add_argument("--target-init-std", type=float, default=0.005, help="std of the target's layer weights")
    parser.add_argument("--logit-scale", type=float, default=8.0, help="factor on the random target's lm_head")
    parser.add_argument("--head-zipf", type=float, default=0.1, help="lm_head row norms ~ rank^-head_zipf")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the data")
    parser.add_argument("--train-seqs", type=int, default=64)
    parser.add_argument("--eval-seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--window", type=int, default=4, help="stage-1 window k")
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    target = build_target(args)
    gen = torch.Generator().manual_seed(args.seed)
    data = sample_data(target, args.train_seqs + args.eval_seqs, args, gen)
    gen_s = time.perf_counter() - t0
    train_ids, eval_ids = data[: args.train_seqs], data[args.train_seqs:]
    train_states, eval_states = top_states(target, train_ids), top_states(target, eval_ids)
    loss_mask = torch.zeros_like(data[:1], dtype=torch.bool).expand(len(data), -1).clone()
    loss_mask[:, args.prompt_len:] = True  # the sampled tokens (the "assistant" part)
    train_mask, eval_mask = loss_mask[: args.train_seqs], loss_mask[args.train_seqs:]
    with torch.no_grad():
        eval_argmax = torch.cat([target.lm_head(s).argmax(-1) for s in eval_states.split(1)])
        top_p = torch.cat([target.lm_head(s[eval_mask[:1]]).softmax(-1).max(-1).values for s in eval_states.split(1)])
        # Share of held-out positions whose target argmax the current token alone gives (context ignored).
        token_only = target.lm_head(target.model.norm(target.model.embed_tokens(eval_ids))).argmax(-1)
        token_share = float((token_only == eval_argmax)[eval_mask].float().mean())
    counts = torch.bincount(train_ids[train_mask], minlength=target.config.vocab_size)
    draft_ids = counts.argsort(descending=True, stable=True)[: args.draft_vocab]
    in_vocab = torch.zeros(target.config.vocab_size, dtype=torch.bool)
    in_vocab[draft_ids] = True
    coverage = float(in_vocab[eval_argmax[eval_mask]].float().mean())
    prep_s = time.perf_counter() - t0
    print(f"data: {len(data)} x {args.seq_len} tokens in {gen_s:.0f} s ({int((counts > 0).sum())} distinct sampled "
          f"tokens); target top-1 prob median {float(top_p.median()):.2f}; argmax given by the current token alone "
          f"{token_share:.1%}; reduced-vocab coverage {coverage:.1%}",
          flush=True)

    eval_offsets = draw_window_offsets(args.eval_seqs, args.window, "cpu",
                                       generator=torch.Generator().manual_seed(args.seed + 1))
    runs = [Run(name, target, args, draft_ids, args.seed) for name in args.settings]
    for run in runs:
        run.curve.append({"train_s": 0.0, "steps": 0, "token_updates": 0,
                          "alpha": run.evaluate(eval_ids, eval_states, eval_mask, eval_argmax, eval_offsets)})
    order = torch.Generator().manual_seed(args.seed + 2)
    chunks = max(1, math.ceil(args.seconds / args.eval_every))
    for chunk in range(chunks):
        budget = min(args.eval_every * (chunk + 1), args.seconds)
        for run in runs:
            while run.train_s < budget:
                rows = torch.randint(0, args.train_seqs, (args.batch,), generator=order)
                run.train_step(train_ids[rows], train_states[rows], train_mask[rows])
            alpha = run.evaluate(eval_ids, eval_states, eval_mask, eval_argmax, eval_offsets)
            run.curve.append({"train_s": run.train_s, "steps": run.steps, "token_updates": run.token_updates,
                              "alpha": alpha, "train_loss": statistics.mean(run.losses[-10:])})
        print(f"chunk {chunk + 1}/{chunks}: " + "; ".join(
            f"{r.name} {r.steps} steps α1 {r.curve[-1]['alpha'][0]:.3f}" for r in runs), flush=True)

    rows = []
    for run in runs:
        rows.append({"setting": run.name, "steps": run.steps,
                     "train_s": run.train_s, "token_updates": run.token_updates,
                     "token_updates_per_s": run.token_updates / run.train_s,
                     "token_updates_per_s_median": statistics.median(run.step_rates[1:] or run.step_rates),
                     "final_alpha": run.curve[-1]["alpha"], "final_loss": statistics.mean(run.losses[-10:]),
                     "curve": run.curve})
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "settings": {
            "target": f"Llama {args.layers} layers, hidden 576, 9/3 heads, ffn 1536, vocab 49152, untied, random "
                      f"weights: layers std {args.target_init_std}, embedding std 0.02, lm_head std 0.02 x "
                      f"{args.logit_scale} x rank^-{args.head_zipf} row norms",
            "data": f"{args.train_seqs} train + {args.eval_seqs} held-out rows of {args.seq_len} tokens: "
                    f"{args.prompt_len} random prompt tokens + target samples at T={args.temperature}; loss on "
                    f"sampled tokens",
            "window": args.window, "batch": args.batch, "lr": args.lr, "warmup_steps": args.warmup_steps,
            "optimizer": "AdamW betas (0.9, 0.95), wd 0, clip 0.5", "seconds_per_setting": args.seconds,
            "eval_every_s": args.eval_every, "draft_vocab": args.draft_vocab,
            "draft_vocab_choice": "most frequent sampled tokens of the training data",
            "reduced_vocab_coverage": coverage, "target_top1_prob_median": float(top_p.median()),
            "target_argmax_token_only_share": token_share,
            "distinct_sampled_tokens": int((counts > 0).sum()), "data_prep_s": prep_s,
            "loss": "stage1_forward: soft CE over the draft vocabulary + 10 * SmoothL1; state noise uniform 0.2",
        },
        "rows": rows,
    }
    table = write_outputs(result, Path(args.out))
    print(table)


if __name__ == "__main__":
    main()
