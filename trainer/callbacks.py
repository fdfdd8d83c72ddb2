"""Training callbacks: τ evaluation during training, and the compute ledger of a (possibly resumed) run."""

import json
import os
import threading
import time

import torch
from transformers import TrainerCallback


class SpeculativeEvalCallback(TrainerCallback):
    """After each evaluation, run real greedy speculative decoding (`target.generate(..., assistant_model=beagle)`) on
    a few held-out prompts and log τ (tokens per target forward) and the share of outputs identical to plain greedy.

        trainer.add_callback(SpeculativeEvalCallback(trainer, prompts, max_new_tokens=64))

    It also logs `train_wall_s`, the wall time since training began less the time these evaluations took (plus
    `wall_offset_s`: the training time of the earlier processes of a resumed run), and with
    `curve_path` appends each point `{"step", "train_wall_s", "tau", ...}` as a JSON line there: the learning curve
    of τ against training time.
    """

    def __init__(self, trainer, prompts: list[torch.Tensor], max_new_tokens: int = 64, check_lossless: bool = True,
                 curve_path: str | None = None, wall_offset_s: float = 0.0):
        if not prompts:
            raise ValueError("SpeculativeEvalCallback: `prompts` expected at least one prompt, found none.")
        self.trainer = trainer
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.check_lossless = check_lossless
        self.curve_path = curve_path
        self.wall_offset_s = wall_offset_s
        self._began: float | None = None
        self._eval_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._began, self._eval_s = time.perf_counter(), 0.0

    def train_wall_s(self) -> float:
        """Seconds of training in this process so far, less the τ evaluations (0 before training begins)."""
        return 0.0 if self._began is None else time.perf_counter() - self._began - self._eval_s

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
            # the draft's own τ: no prompt-lookup copy rounds (on by default at inference)
            out = target.generate(ids, assistant_model=beagle, prompt_lookup_num_tokens=0, **settings)
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
            logs["train_wall_s"] = round(self.wall_offset_s + started - self._began - self._eval_s, 3)
        self._eval_s += time.perf_counter() - started
        self.trainer.log(logs)
        if self.curve_path and args.process_index == 0:
            alphas = {k: v for k, v in (kwargs.get("metrics") or {}).items() if k.startswith("eval_alpha")}
            point = {"step": state.global_step, **logs, "prompts": len(self.prompts),
                     "max_new_tokens": self.max_new_tokens, **alphas}
            with open(self.curve_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(point) + "\n")


class ComputeLedger(TrainerCallback):
    """The compute a training run spends, kept on disk while it runs, so a run split over several processes (a
    stopped run resumed from its checkpoint, on this machine or another) still adds up to its true total.

        ledger = ComputeLedger(os.path.join(output_dir, "compute_ledger.json"), entry, resume=True)
        ...                      # data preparation, offline cache: counted in the segment's wall time
        ledger.describe(supervised_per_step, data=report.summary())
        trainer.add_callback(ledger)
        trainer.train(resume_from_checkpoint=True)
        runs = ledger.close(trainer.state.global_step)

    Each process is one segment: `entry` (what the run is: command, data, settings) plus `wall_s` (since the process
    started), `train_wall_s` (since training began, less the time `clock` says went to τ evaluations), `first_step`,
    `last_step`, `steps` and `token_updates` (`supervised_per_step` x steps this segment ran, including steps a
    stopped segment ran past its last checkpoint: they were computed, and are computed again after the resume).
    Create it when the process starts (data preparation and the offline cache count too) and `describe` the data
    once it is known. A daemon thread rewrites the file every `heartbeat_s` seconds, and every log, evaluation and
    save rewrites it too; each write goes to a temporary file renamed into place, so the file is always a complete
    JSON document. With `resume=False` an existing ledger (an earlier run into the same folder) is replaced.
    """

    def __init__(self, path: str, entry: dict, resume: bool = False, started: float | None = None,
                 heartbeat_s: float = 15.0, main_process: bool = True):
        self.path = path
        self.main_process = main_process  # only the main process of a distributed run writes the file
        self.supervised_per_step = 0.0  # set once the data is known (`describe`)
        self._previous = self._read(path) if resume and os.path.isfile(path) else []
        self._started = time.time() if started is None else started
        self._train_began: float | None = None
        self._step: int | None = None
        self.clock = None  # optional: a callable giving this segment's training seconds (SpeculativeEvalCallback)
        self.segment = {**entry, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started)),
                        "wall_s": 0.0, "train_wall_s": 0.0, "first_step": None, "last_step": None, "steps": 0,
                        "token_updates": 0}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.write()
        threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True, name="compute-ledger").start()

    @staticmethod
    def _read(path: str) -> list[dict]:
        try:
            with open(path, encoding="utf-8") as handle:
                segments = json.load(handle)["segments"]
            if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
                raise TypeError("segments is not a list of objects")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"compute ledger {path}: expected a JSON object with a `segments` list (written by "
                             f"ComputeLedger), found unreadable content ({error}); move it away to start the "
                             f"record afresh.") from None
        return segments

    @property
    def previous_train_wall_s(self) -> float:
        """Training seconds of the earlier segments of this run (the τ learning curve's time offset)."""
        return sum(s["train_wall_s"] for s in self._previous)

    def _heartbeat(self, every: float):
        while not self._closed.wait(every):
            self.write()

    def describe(self, supervised_per_step: float, **fields):
        """The data and settings, once known: `supervised_per_step` (supervised tokens per optimizer step, for
        `token_updates`) and any fields to add to this segment's entry."""
        with self._lock:
            self.supervised_per_step = supervised_per_step
            self.segment.update(fields)
        self.write()

    def write(self, step: int | None = None):
        with self._lock:
            now = time.time()
            segment = self.segment
            segment["wall_s"] = round(now - self._started, 1)
            if self._train_began is not None:
                segment["train_wall_s"] = round(self.clock() if self.clock else now - self._train_began, 1)
            self._step = self._step if step is None else step
            if self._step is not None and segment["first_step"] is not None:
                segment["last_step"] = self._step
                segment["steps"] = self._step - segment["first_step"]
                segment["token_updates"] = int(round(self.supervised_per_step * segment["steps"]))
            if not self.main_process:
                return
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({"segments": self._previous + [segment]}, handle, indent=1)
            os.replace(temporary, self.path)

    def segments(self) -> list[dict]:
        with self._lock:
            return [dict(s) for s in self._previous + [self.segment]]

    def close(self, step: int | None = None) -> list[dict]:
        """Stop the heartbeat, write the final state of this segment, and return all segments."""
        self._closed.set()
        self.write(step)
        return self.segments()

    def on_train_begin(self, args, state, control, **kwargs):
        self._train_began = time.time()
        self.segment["first_step"] = state.global_step
        self.write(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._step = state.global_step  # the heartbeat writes it

    def on_log(self, args, state, control, **kwargs):
        self.write(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.write(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.write(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.write(state.global_step)
