"""Run under a 2-process launcher by test_two_processes.py: pretrain, then compare parameters across ranks.

    python -m accelerate.commands.launch ... two_process_pretrain.py OUTPUT_DIR [key=value ...]
"""

import json
import sys

import torch
import torch.distributed as dist

from llmstack.config import PretrainConfig, load_config
from llmstack.trainers.pretrain import pretrain

out, *overrides = sys.argv[1:]
result = pretrain(load_config(PretrainConfig, None, [f"output_dir={out}", *overrides]))
flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    report = {"world_size": dist.get_world_size(),
              "max_abs_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered)}
    with open(f"{out}/ranks.json", "w") as fh:
        json.dump(report, fh)
dist.destroy_process_group()
