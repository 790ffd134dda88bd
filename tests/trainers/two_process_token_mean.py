"""Run under a 2-process launcher by test_two_processes.py: one optimizer_step of a small classifier where
rank 0 holds 11 targets in two micro-batches and rank 1 holds 2 in two micro-batches (others ignored), then
rank 0 writes the loss and the updated weights.

    python -m accelerate.commands.launch ... two_process_token_mean.py OUT_FILE
"""

import sys

import torch
import torch.distributed as dist

from llmstack.cli import exit_process
from llmstack.trainers.base import make_accelerator
from llmstack.trainers.supervised import SupervisedObjective, optimizer_step

from token_mean_case import micro_batches, model_and_objective  # noqa: E402  (tests/trainers)

acc = make_accelerator("fp32", 2, [], "/tmp")
model, objective = model_and_objective()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
model, optimizer = acc.prepare(model, optimizer)
loss, _, _ = optimizer_step(acc, model, optimizer, scheduler, micro_batches(acc.process_index),
                            SupervisedObjective(**objective), 0.0, 0)
if acc.is_main_process:
    torch.save({"world_size": acc.num_processes, "loss": loss,
                "weights": {k: v.detach() for k, v in acc.unwrap_model(model).state_dict().items()}}, sys.argv[1])
dist.barrier()
dist.destroy_process_group()
exit_process(0)
