"""Reward sources: where an RL step's scores come from, combined with weights, then normalised.

A source is anything with the `RewardSource` shape: it reads one rollout (`RewardInputs`: token ids and
masks, the prompts, the decoded completions, the prompt records' other columns) and returns one score per
response. A reward model is one (`llmstack.models.reward_model.RewardModelScores`); adding another is one
module with a class of this shape, and its name where the RL loop builds its sources from the config.
`combined` sums the weighted sources and keeps each one's scores for the logs.

Shape legend: B responses on this process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Protocol

import torch

from llmstack.rl.advantages import RunningMoments
from llmstack.rl.experience import Experience


@dataclass
class RewardInputs:
    """What a reward source may read about one rollout's responses. The completions are decoded only when a
    source (or a metric) asks for them."""

    exp: Experience
    prompts: list  # [B] each row's prompt (a conversation)
    decode: Callable[[Experience], list[str]]
    columns: dict[str, list] = field(default_factory=dict)  # [B] per column: the prompt records' other fields

    @cached_property
    def completions(self) -> list[str]:
        return self.decode(self.exp)


class RewardSource(Protocol):
    name: str

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        """[B] fp32 scores on the experience's device."""


def combined(sources: list[tuple[RewardSource, float]],
             inputs: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of weight x scores over the sources [B], each source's own scores by name)."""
    each = {source.name: source(inputs) for source, _ in sources}
    total = sum(weight * each[source.name] for source, weight in sources)
    return total, each


class RewardNormaliser:
    """Scores on a standard scale: (score - mean) / std with the reward model's stored statistics, or, when
    it has none, running statistics of every score seen so far over all processes (kept in checkpoints)."""

    def __init__(self, enabled: bool, stats: tuple[float, float] | None):
        self.enabled, self.stats = enabled, stats
        self.moments = RunningMoments()

    def __call__(self, scores_B: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return scores_B
        if self.stats is not None:
            mean, std = self.stats
        else:
            self.moments.update(gather(scores_B))
            mean, std = self.moments.mean, self.moments.std
        return (scores_B - mean) / max(std, 1e-6)

    def state_dict(self) -> dict:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state)


def import_callable(path: str, key: str) -> Callable:
    """The function named by `path` ('package.module:function'), for functions given by name in a config;
    `key` is the config key that named it, for the error message."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"config key '{key}': {path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"config key '{key}': cannot import module {module_name!r} ({err}); is it installed "
                         "or on PYTHONPATH?") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"config key '{key}': {module_name!r} has no function {name!r}")
    return function
