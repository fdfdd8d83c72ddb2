"""Two-process data-parallel training on CPU (gloo), launched by tests/test_trainer_ecosystem.py with torchrun."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import make_target  # noqa: E402
from test_training import tiny_dataset  # noqa: E402

from modeling_beagle import BeagleModel  # noqa: E402
from trainer import BeagleTrainer, BeagleTrainingArguments  # noqa: E402

out = sys.argv[1]
target = make_target("llama", initializer_range=0.2)
data = tiny_dataset(target, rows=32)
torch.manual_seed(0)
beagle = BeagleModel.from_target(target, attn_implementation="sdpa", noise_type="none")
args = BeagleTrainingArguments(output_dir=out, bf16=False, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                               stage1_window=3, stage2_steps=3, report_to=[], save_strategy="no", ddp_backend="gloo",
                               logging_steps=2, seed=0, stage1_ratio=float(os.environ.get("RATIO", "0.5")))
trainer = BeagleTrainer(model=beagle, args=args, target_model=target, train_dataset=data)
trainer.train()
assert trainer.args.world_size == 2, trainer.args.world_size
trainer.save_model(os.path.join(out, "beagle"))
# every rank ends with the same weights
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
torch.distributed.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1])
print(f"rank {trainer.args.process_index} ok")
# Leave the group, then skip interpreter finalisation: gloo's worker threads can still hold tensors when the
# interpreter is torn down, and a rank then aborts ("terminate called without an active exception") after the
# test's work is done (seen once in CI even with destroy_process_group; pytorch/pytorch#179291 describes the cause).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
