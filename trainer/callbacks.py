"""Evaluation callbacks."""

import torch
from transformers import TrainerCallback


class SpeculativeEvalCallback(TrainerCallback):
    """After each evaluation, run real greedy speculative decoding (`target.generate(..., assistant_model=beagle)`) on
    a few held-out prompts and log τ (tokens per target forward) and the share of outputs identical to plain greedy.

        trainer.add_callback(SpeculativeEvalCallback(trainer, prompts, max_new_tokens=64))
    """

    def __init__(self, trainer, prompts: list[torch.Tensor], max_new_tokens: int = 64, check_lossless: bool = True):
        if not prompts:
            raise ValueError("SpeculativeEvalCallback: `prompts` expected at least one prompt, found none.")
        self.trainer = trainer
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.check_lossless = check_lossless

    @torch.no_grad()
    def on_evaluate(self, args, state, control, **kwargs):
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
        self.trainer.log(logs)
