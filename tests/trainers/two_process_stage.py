"""Run under a 2-process launcher by test_two_processes.py: train one stage, then compare the trained
parameters across ranks.

    python -m accelerate.commands.launch ... two_process_stage.py STAGE OUTPUT_DIR [key=value ...]
"""

import importlib
import json
import sys

import torch
import torch.distributed as dist

from llmstack.cli import STAGES, exit_process
from llmstack.config import load_config

stage, out, *overrides = sys.argv[1:]
config_cls, target = STAGES[stage]
module, func = target.split(":")
result = getattr(importlib.import_module(module), func)(load_config(config_cls, None, [f"output_dir={out}", *overrides]))
flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    report = {"world_size": dist.get_world_size(),
              "max_abs_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered)}
    with open(f"{out}/ranks.json", "w") as fh:
        json.dump(report, fh)
# both ranks leave together: a rank tearing down gloo while its peer still writes can abort the peer
dist.barrier()
dist.destroy_process_group()
exit_process(0)
