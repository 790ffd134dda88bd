"""The single-process parts of llmstack.trainers.distributed: DeepSpeed's config filled from llmstack's own
settings, with clear errors where a DeepSpeed file disagrees; the layout names; gathering is a no-op where
nothing is sharded."""

import pytest
import torch
from accelerate import Accelerator

from llmstack.trainers import distributed


def filled(ds: dict, micro=4, accum=2, clip=1.0, world=8) -> dict:
    distributed.fill_deepspeed_config(ds, micro, accum, clip, world)
    return ds


def test_auto_values_take_llmstacks_batch_accumulation_and_clipping():
    ds = filled({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto", "train_batch_size": "auto", "zero_optimization": {"stage": 3}})
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and "train_batch_size" not in ds
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_agreeing_fixed_values_are_accepted():
    ds = filled({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 64})
    assert ds["gradient_accumulation_steps"] == 2


def test_a_disagreeing_value_names_the_file_the_key_and_llmstacks_setting(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/mine.json")
    with pytest.raises(ValueError, match=r"mine.json: 'gradient_accumulation_steps' is 4 but llmstack's "
                                         r"train.grad_accum is 2; set it to \"auto\""):
        filled({"gradient_accumulation_steps": 4})


def test_a_global_batch_that_does_not_divide_over_processes_and_accumulation_is_refused():
    with pytest.raises(ValueError, match=r"'train_batch_size' 60 does not divide into 8 processes x "
                                         r"train.grad_accum 2 x train.batch_size 4 \(= 64\)"):
        filled({"train_batch_size": 60})


def test_one_process_is_the_single_layout_and_needs_no_gathering():
    acc = Accelerator(cpu=True)
    assert distributed.layout(acc) == "single" and not distributed.is_sharded(acc)
    model = torch.nn.Linear(3, 2)
    with distributed.full_model(acc, model) as whole:
        assert whole is model
    state = distributed.full_state(acc, model)
    assert state.keys() == {"weight", "bias"} and torch.equal(state["weight"], model.weight)
