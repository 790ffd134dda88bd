"""The uneven token-mean case shared by test_two_processes.py and two_process_token_mean.py."""

import torch
import torch.nn.functional as F

IGNORE = -100
# per rank, per micro-batch: how many of the 6 positions carry a target
TARGETS = {0: (6, 5), 1: (2, 0)}


def micro_batches(rank: int) -> list[dict]:
    out = []
    for i, n in enumerate(TARGETS[rank]):
        gen = torch.Generator().manual_seed(100 * rank + i)
        x = torch.randn(6, 4, generator=gen)
        labels = torch.randint(0, 3, (6,), generator=gen)
        labels[n:] = IGNORE
        out.append({"input_ids": x, "labels": labels})
    return out


def _loss_sum(model, batch):
    return F.cross_entropy(model(batch["input_ids"]), batch["labels"], ignore_index=IGNORE, reduction="sum")


def model_and_objective():
    torch.manual_seed(0)
    objective = {"loss_sum": _loss_sum, "count_targets": lambda b: int((b["labels"] != IGNORE).sum()),
                 "count_tokens": lambda b: len(b["labels"])}
    return torch.nn.Linear(4, 3), objective
