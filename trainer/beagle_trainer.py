"""`BeagleTrainer`: Two-Stage Block-Attention Training on transformers' `Trainer`.

Stage 1 (the first `stage1_ratio` of the optimizer steps): one forward per batch with the inverse block mask and a
random window offset per sequence. Stage 2: S in-place simulation steps per batch, the draft states of step t written
into the buffer D that step t + 1 reads; each step's loss (weighted β_t = S - t + 1) is back-propagated before the
next step with D detached, so peak memory does not grow with S.

The frozen target runs inside the trainer (online states); it is never part of the optimizer or the checkpoint.
"""

import os
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from .offline_cache import OfflineCache, OfflineCollator
from .precision import bf16_is_native, warn_if_slow_bf16

from .objectives import (
    STAT_NAMES,
    SoftLabels,
    draw_window_offsets,
    offset_weights,
    soft_labels_from_states,
    stage1_forward,
    stage2_step,
)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


@dataclass
class BeagleTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the two-stage schedule and the method's options (method.md §3-4)."""

    stage1_ratio: float = field(default=0.5, metadata={"help": "share of the optimizer steps trained in stage 1"})
    stage1_window: int = field(default=5, metadata={"help": "stage-1 window k"})
    stage1_offset_weights: str = field(default="uniform", metadata={
        "help": "stage-1 loss weights by window offset i: uniform (the paper's) or decay (stage 2's β_i = k - i + 1, "
                "mean 1: more of the gradient on the first draft positions)"})
    stage2_steps: int = field(default=4, metadata={"help": "stage-2 simulation steps S (stage-2 window k = S)"})
    offset_range: int | None = field(default=None, metadata={"help": "window offsets drawn from [0, offset_range); "
                                                                     "default [0, k)"})
    noise_type: str = field(default="uniform", metadata={"help": "noise on true states: uniform, gaussian or none"})
    noise_scale: float = field(default=0.2, metadata={"help": "noise half-width (uniform) or sigma (gaussian)"})
    smooth_l1_weight: float = field(default=10.0, metadata={"help": "λ_v, weight of SmoothL1(ĥ, h)"})
    tv_weight: float = field(default=0.0, metadata={
        "help": "weight of the total variation 1 - Σ min(P, Q) added to the CE (the chance that sampling rejects "
                "the draft's token); 0 (the default) trains CE + λ_v SmoothL1 only"})
    grad_through_draft_states: bool = field(default=False, metadata={"help": "stage 2 back-propagates through D"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "`beagle train` without --resume_from_checkpoint into an output_dir that holds an earlier run "
                "(checkpoint-N folders, compute ledger, regenerated data, final draft): delete those first instead of "
                "refusing the run"})
    # The method's optimizer settings (paper: AdamW betas (0.9, 0.95), clip 0.5); the loss mask column must survive.
    adam_beta2: float = 0.95
    max_grad_norm: float = 0.5
    remove_unused_columns: bool = False

    # Every Beagle parameter takes part in every forward: no extra autograd traversal under DDP.
    ddp_find_unused_parameters: bool | None = False
    # None or "auto" (the default): bf16 mixed precision where the device computes bf16 natively (trainer.precision).
    # Typed `bool | str` (not `bool | None`) so that HfArgumentParser takes a bare `--bf16` as true.
    bf16: bool | str = field(default=None, metadata={
        "help": "bf16 mixed precision: true, false, or unset / 'auto' (on where the device computes bf16 natively, a "
                "CUDA GPU with bf16 or a CPU with AMX / AVX512-BF16; off elsewhere, where torch emulates it far "
                "slower than fp32)"})

    def __post_init__(self):
        if not self.use_cpu and not _has_accelerator():
            # On a CPU-only machine, torchrun / accelerate launch should give CPU data parallelism (gloo), which
            # transformers enables only with use_cpu=True.
            self.use_cpu = True
        device = "cpu" if self.use_cpu else None  # use_cpu is set above wherever there is no accelerator
        if self.bf16 is None or self.bf16 == "auto":
            self.bf16 = not self.fp16 and bf16_is_native(device)
        elif not isinstance(self.bf16, bool):
            raise ValueError(f"`bf16` expected true, false or 'auto', found {self.bf16!r}.")
        elif self.bf16:
            warn_if_slow_bf16("training (--bf16)", device)
        super().__post_init__()
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"`max_steps` expected a positive integer (or -1: `num_train_epochs` decides), found "
                             f"{self.max_steps}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` expected a float > 0, found {self.learning_rate}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` expected a positive integer, found {getattr(self, name)}.")
        if not 0.0 <= self.stage1_ratio <= 1.0:
            raise ValueError(f"`stage1_ratio` expected a float in [0, 1], found {self.stage1_ratio}.")
        for name in ("stage1_window", "stage2_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` expected a positive integer, found {getattr(self, name)}.")
        if self.offset_range is not None and self.offset_range < 1:
            raise ValueError(f"`offset_range` expected None or a positive integer, found {self.offset_range}.")
        if self.stage1_offset_weights not in ("uniform", "decay"):
            raise ValueError(f"`stage1_offset_weights` expected uniform or decay, "
                             f"found {self.stage1_offset_weights!r}.")
        if self.noise_type not in ("uniform", "gaussian", "none"):
            raise ValueError(f"`noise_type` expected one of uniform, gaussian, none, found {self.noise_type!r}.")
        if not self.tv_weight >= 0:
            raise ValueError(f"`tv_weight` expected a float >= 0, found {self.tv_weight}.")
        if self.remove_unused_columns:
            raise ValueError("`remove_unused_columns` expected False for BeagleTrainer (it needs `loss_mask`).")
        # Trainer options that act through its own loss or the model's input embedding, which Beagle's training
        # replaces (soft labels from the target; the target's frozen embedding in eval mode): refused, not ignored.
        if self.label_smoothing_factor:
            raise ValueError(f"`label_smoothing_factor` expected 0 for BeagleTrainer, found "
                             f"{self.label_smoothing_factor}: the draft learns the target's own distribution (soft "
                             "labels), which smoothing would blur.")
        if self.neftune_noise_alpha is not None:
            raise ValueError(f"`neftune_noise_alpha` expected None for BeagleTrainer, found "
                             f"{self.neftune_noise_alpha}: "
                             "NEFTune perturbs a trained embedding; Beagle's is the target's, frozen (`noise_scale` "
                             "sets the noise on the target's states).")

    def method_options(self) -> dict:
        """The options recorded into the Beagle config (and so into the saved checkpoint and model card)."""
        return {name: getattr(self, name) for name in ("stage1_window", "stage1_offset_weights", "stage2_steps",
                                                          "offset_range", "noise_type", "noise_scale",
                                                          "smooth_l1_weight", "tv_weight",
                                                          "grad_through_draft_states")}


class BeagleDataCollator:
    """Right-pads `input_ids`, `loss_mask` (and builds `attention_mask`) to the longest row of the batch."""

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
                 "loss_mask": torch.zeros(len(rows), length, dtype=torch.bool),
                 "attention_mask": torch.zeros(len(rows), length, dtype=torch.long)}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
            batch["loss_mask"][i, :n] = torch.as_tensor(row["loss_mask"], dtype=torch.bool)
            batch["attention_mask"][i, :n] = 1
        return batch


class BeagleTrainer(Trainer):
    """Trains a `BeagleModel` against a frozen target with Two-Stage Block-Attention Training."""

    loss_is_scaled_for_ga = False  # each micro-batch loss is a mean; Trainer divides by the accumulation steps

    def __init__(self, model=None, args: BeagleTrainingArguments | None = None, target_model=None,
                 data_collator=None, **kwargs):
        if target_model is None:
            raise ValueError("BeagleTrainer: `target_model` expected the frozen target model, found None.")
        if args is not None and not isinstance(args, BeagleTrainingArguments):
            raise ValueError(f"BeagleTrainer: `args` expected BeagleTrainingArguments, found {type(args).__name__}.")
        pad = getattr(target_model.config.get_text_config(), "pad_token_id", None)
        pad = pad if pad is not None else 0
        offline = [d for d in (kwargs.get("train_dataset"), kwargs.get("eval_dataset")) if isinstance(d, OfflineCache)]
        if data_collator is None:
            # Lengths padded to a multiple of 64: few distinct shapes (see objectives.HEAD_ROW_BUCKET for why).
            collator = OfflineCollator if offline else BeagleDataCollator
            data_collator = collator(pad_token_id=pad, pad_to_multiple_of=64)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.target_model = target_model.eval().requires_grad_(False).to(self.args.device)
        self.beagle.bind_target(self.target_model)
        for cache in offline:  # states cached for another target, layer set or draft vocabulary are refused
            cache.check_target(self.target_model, self.beagle)
        self.beagle.config.update(self.args.method_options())
        self._train_stats: dict[str, torch.Tensor] = {}
        self._saving_for_caller = False  # set by `save_model` around a save the caller asked for

    # ------------------------------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; a folder saved by the caller (not one of the Trainer's `checkpoint-N` folders, which
        keep it for resuming) leaves out `training_args.bin`, transformers' pickled TrainingArguments: the folder is
        a checkpoint to ship, and Beagle checkpoints hold no pickle (`beagle push` would refuse it)."""
        self._saving_for_caller = not _internal_call
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._saving_for_caller = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        path = os.path.join(output_dir if output_dir is not None else self.args.output_dir, TRAINING_ARGS_NAME)
        if self._saving_for_caller and self.args.should_save and os.path.isfile(path):
            os.remove(path)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def beagle(self):
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def current_stage(self, step: int | None = None) -> int:
        """The stage that trains optimizer step `step` (0-based; default: the next one, `global_step`)."""
        switch = int(round(self.state.max_steps * self.args.stage1_ratio))
        return 1 if (self.state.global_step if step is None else step) < switch else 2

    @torch.no_grad()
    def target_features(self, inputs: dict):
        """The keys' context states, the top post-norm states and the soft labels: read from an offline cache
        batch when present, else computed by the frozen target (online)."""
        if "context_states" in inputs:
            dtype = self.beagle.dtype
            supervised = inputs["loss_mask"].bool() & inputs["attention_mask"].bool()
            labels = SoftLabels(probs=inputs["topk_probs"], indices=inputs["topk_ids"])
            return inputs["context_states"].to(dtype), inputs["target_states"].to(dtype), labels, supervised
        layer_ids = list(self.beagle.config.target_layer_ids)
        out = self.target_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=sorted(set(layer_ids + [-1])))
        hidden = out.hidden_states
        context = hidden[layer_ids[0]] if len(layer_ids) == 1 else torch.cat([hidden[i] for i in layer_ids], -1)
        top = hidden[-1]
        supervised = inputs["loss_mask"].bool() & inputs["attention_mask"].bool()
        labels = soft_labels_from_states(self.beagle, top[supervised])
        return context, top, labels, supervised

    def _offsets(self, batch: int, window: int):
        offset_range = self.args.offset_range or window
        return draw_window_offsets(batch, offset_range, self.args.device)

    def _accumulate(self, stage: int, stats: dict) -> None:
        for name, values in stats.items():
            key = f"stage{stage}_{name}"
            self._train_stats[key] = self._train_stats.get(key, 0) + values

    # ---------------------------------------------------------------------------------------------- training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stage-1 loss of one batch (one forward with the inverse block mask)."""
        context, top, labels, supervised = self.target_features(inputs)
        window = self.args.stage1_window
        loss, stats = stage1_forward(
            self.beagle, inputs["input_ids"], context, top, labels, supervised, inputs["attention_mask"], window,
            self._offsets(inputs["input_ids"].shape[0], window), self.args.smooth_l1_weight, forward=model,
            weights=offset_weights(window, self.args.stage1_offset_weights), tv_weight=self.args.tv_weight,
        )
        if model.training:
            self._accumulate(1, stats)
        return (loss, stats) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.current_stage() == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        return self.stage2_step(model, inputs)

    def stage2_step(self, model, inputs) -> torch.Tensor:
        """S simulation steps; each step's weighted loss is back-propagated before the next (D detached)."""
        steps = self.args.stage2_steps
        context, top, labels, supervised = self.target_features(inputs)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        offsets = self._offsets(input_ids.shape[0], steps)
        draft = torch.zeros_like(top, dtype=self.beagle.dtype)
        weights = [steps - t + 1 for t in range(1, steps + 1)]
        num_supervised = supervised.sum().clamp(min=1)
        total = torch.zeros((), device=self.args.device)
        through = self.args.grad_through_draft_states
        unrolled = torch.zeros((), device=self.args.device)
        for t in range(1, steps + 1):
            with self.compute_loss_context_manager():
                loss_sum, _, stats, states, at_step = stage2_step(
                    self.beagle, input_ids, context, draft, top, labels, supervised, attention_mask, steps, offsets,
                    t, self.args.smooth_l1_weight, forward=model, tv_weight=self.args.tv_weight,
                )
            # β_t-weighted sum over positions, normalised so that equal weights give the mean per-position loss.
            loss = weights[t - 1] * loss_sum / num_supervised / (sum(weights) / steps)
            self._accumulate(2, stats)
            if through:
                unrolled = unrolled + loss
                draft = torch.where(at_step[..., None], states, draft)
            else:
                self.accelerator.backward(loss / self.current_gradient_accumulation_steps)
                draft = torch.where(at_step[..., None], states.detach(), draft)
            total = total + loss.detach()
        if through:
            self.accelerator.backward(unrolled / self.current_gradient_accumulation_steps)
        return total / self.current_gradient_accumulation_steps

    def log(self, logs: dict, *args, **kwargs) -> None:
        for key in list(self._train_stats):
            if key.endswith("_count"):
                prefix = key[: -len("_count")]
                counts = self._train_stats[key].clamp(min=1)
                for metric in STAT_NAMES:
                    values = self._train_stats.get(f"{prefix}_{metric}")
                    if values is not None:
                        for i, v in enumerate((values / counts).tolist()):
                            if self._train_stats[key][i] > 0:
                                logs[f"{prefix}_{metric}_{i + 1}"] = round(v, 4)
        self._train_stats = {}
        if self.state.max_steps:
            logs["stage"] = self.current_stage(max(self.state.global_step - 1, 0))  # of the last step trained
        super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Held-out top-1 agreement α per draft position: stage-1 offsets 1..k and stage-2 steps 1..S (the latter is
        exactly chain drafting with the true tokens), plus both loss terms.

        Every supervised position is scored at every offset and step: the windows are placed at each of their k
        (stage 1) or S (stage 2) possible offsets in turn, so position p is the i-th draft position of its window
        once per i. (Training draws one offset per sequence; scoring with one draw, as before session 24, scored
        each stage-2 step on about 1/S of the positions, a noisier estimate of the same mean.)"""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        generator_state = torch.random.get_rng_state()  # iterating the loader draws a seed: leave training's stream
        for inputs in dataloader:
            inputs = self._prepare_inputs(inputs)
            context, top, labels, supervised = self.target_features(inputs)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            k = self.args.stage1_window
            for offset in range(k):
                offsets = torch.full((ids.shape[0],), offset, device=ids.device)
                _, stats = stage1_forward(self.beagle, ids, context, top, labels, supervised, mask, k, offsets,
                                          self.args.smooth_l1_weight)
                for name, v in stats.items():
                    sums[f"offset_{name}"] = sums.get(f"offset_{name}", 0) + v
            steps = self.args.stage2_steps
            for offset in range(steps):
                offsets = torch.full((ids.shape[0],), offset, device=ids.device)
                draft = torch.zeros_like(top, dtype=self.beagle.dtype)
                for t in range(1, steps + 1):
                    _, _, stats, states, at_step = stage2_step(self.beagle, ids, context, draft, top, labels,
                                                               supervised, mask, steps, offsets, t,
                                                               self.args.smooth_l1_weight)
                    draft = torch.where(at_step[..., None], states, draft)
                    for name, v in stats.items():
                        sums[f"step_{name}"] = sums.get(f"step_{name}", 0) + v
        torch.random.set_rng_state(generator_state)
        metrics = {}
        for kind in ("offset", "step"):
            counts = sums[f"{kind}_count"].clamp(min=1)
            for metric in STAT_NAMES:
                for i, v in enumerate((sums[f"{kind}_{metric}"] / counts).tolist()):
                    if sums[f"{kind}_count"][i] > 0:
                        name = "alpha" if metric == "agree" else metric
                        metrics[f"{metric_key_prefix}_{name}_{kind}_{i + 1}"] = v
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
