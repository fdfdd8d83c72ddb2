"""Evaluation callbacks."""

import json
import time

import torch
from transformers import TrainerCallback


class SpeculativeEvalCallback(TrainerCallback):
    """After each evaluation, run real greedy speculative decoding (`target.generate(..., assistant_model=beagle)`) on
    a few held-out prompts and log τ (tokens per target forward) and the share of outputs identical to plain greedy.

        trainer.add_callback(SpeculativeEvalCallback(trainer, prompts, max_new_tokens=64))

    It also logs `train_wall_s`, the wall time since training began less the time these evaluations took, and with
    `curve_path` appends each point `{"step", "train_wall_s", "tau", ...}` as a JSON line there: the learning curve
    of τ against training time.
    """

    def __init__(self, trainer, prompts: list[torch.Tensor], max_new_tokens: int = 64, check_lossless: bool = True,
                 curve_path: str | None = None):
        if not prompts:
            raise ValueError("SpeculativeEvalCallback: `prompts` expected at least one prompt, found none.")
        self.trainer = trainer
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.check_lossless = check_lossless
        self.curve_path = curve_path
        self._began: float | None = None
        self._eval_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._began, self._eval_s = time.perf_counter(), 0.0

    @torch.no_grad()
    def on_evaluate(self, args, state, control, **kwargs):
        started = time.perf_counter()
        beagle, target = self.trainer.beagle, self.trainer.target_model
        was_training = beagle.training
        beagle.eval()
        accepted = rounds = identical = 0
        for prompt in self.prompts:
            ids = prompt.view(1, -1).to(target.device)
            settings = dict(do_sample=False, max_new_tokens=self.max_new_tokens,
                            attention_mask=torch.ones_like(ids))
            out = target.generate(ids, assistant_model=beagle, **settings)
            stats = beagle.generation_stats
            accepted += sum(stats.accepted)
            rounds += stats.rounds
            if self.check_lossless:
                identical += int(torch.equal(out, target.generate(ids, **settings)))
        beagle.train(was_training)
        logs = {"eval_tau": (accepted + rounds) / max(rounds, 1)}
        if self.check_lossless:
            logs["eval_greedy_identical"] = identical / len(self.prompts)
        if self._began is not None:
            # milliseconds: a few steps of a tiny model take well under the 0.1 s a coarser rounding would keep
            logs["train_wall_s"] = round(started - self._began - self._eval_s, 3)
        self._eval_s += time.perf_counter() - started
        self.trainer.log(logs)
        if self.curve_path and args.process_index == 0:
            alphas = {k: v for k, v in (kwargs.get("metrics") or {}).items() if k.startswith("eval_alpha")}
            point = {"step": state.global_step, **logs, "prompts": len(self.prompts),
                     "max_new_tokens": self.max_new_tokens, **alphas}
            with open(self.curve_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(point) + "\n")
