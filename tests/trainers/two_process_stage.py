"""Run under a 2-process launcher by test_two_processes.py: train one stage, then compare the trained
parameters across ranks, each gathered whole where the layout shards it, and keep the trained model's
logits on a fixed input (every rank takes part in the forward, as sharded layouts need).

    python -m accelerate.commands.launch ... two_process_stage.py STAGE OUTPUT_DIR [key=value ...]

With STOP_AT_STEP=N in the environment, every process sends itself SIGTERM after logging step N, as a
scheduler would, and the run stops there with a checkpoint.
"""

import importlib
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from llmstack.cli import STAGES, exit_process
from llmstack.config import load_config
from llmstack.tracking.metrics import MetricsLog


def whole(param: torch.Tensor) -> torch.Tensor:
    """This process's view of a parameter, gathered when it holds only a shard (FSDP2 or ZeRO-3)."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach()


if "STOP_AT_STEP" in os.environ:
    stop_at, log_row = int(os.environ["STOP_AT_STEP"]), MetricsLog.log

    def log_then_stop(self, at, row):
        log_row(self, at, row)
        if at == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    MetricsLog.log = log_then_stop

stage, out, *overrides = sys.argv[1:]
config_cls, target = STAGES[stage]
module, func = target.split(":")
result = getattr(importlib.import_module(module), func)(load_config(config_cls, None, [f"output_dir={out}", *overrides]))
local = [p for p in result.model.parameters()]
sharded = any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in local)
flat = torch.cat([whole(p).flatten() for p in local])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
probe = (torch.arange(1, 17) * 7 % 300)[None]
with torch.no_grad():
    logits = result.model.eval()(input_ids=probe).logits
if dist.get_rank() == 0:
    torch.save({"input_ids": probe, "logits": logits}, f"{out}/probe.pt")
    report = {"world_size": dist.get_world_size(), "sharded": sharded, "status": result.status,
              "max_abs_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered)}
    with open(f"{out}/ranks.json", "w") as fh:
        json.dump(report, fh)
# both ranks leave together: a rank tearing down gloo while its peer still writes can abort the peer
dist.barrier()
dist.destroy_process_group()
exit_process(0)
