"""Every size and count in every stage's configuration has an upper bound, so a typo (a missing decimal point,
an extra zero) fails at start-up naming the key instead of as a MemoryError or an abort hours later."""

import dataclasses
import typing

import pytest

from llmstack.cli import STAGES
from llmstack.config import ConfigError, load_config


def int_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from int_fields(typ, f"{prefix}{f.name}.")
        elif typ is int or int in typing.get_args(typ):
            yield f"{prefix}{f.name}", f.metadata


# what each stage needs besides the key under test to be a valid configuration
VALID = {"sft": ["model.name_or_path=m"], "reward": ["model.name_or_path=m"], "dpo": ["model.name_or_path=m"],
         "ppo": ["model.name_or_path=m", "reward_model.name_or_path=r"],
         "grpo": ["model.name_or_path=m", "reward_funcs=[numeric_match]"]}


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "pipeline"])
def test_every_integer_setting_is_bounded_above_and_refused_past_it(stage):
    config_cls = STAGES[stage][0]
    load_config(config_cls, None, VALID.get(stage, []))
    for key, meta in int_fields(config_cls):
        limit = meta.get("le") if meta.get("le") is not None else meta.get("lt")
        assert limit is not None, f"{stage}: config key '{key}' has no upper bound"
        with pytest.raises(ConfigError, match=f"config key '{key}': .* is out of range"):
            load_config(config_cls, None, [*VALID.get(stage, []), f"{key}={int(limit) + 1}"])
