"""The parallel layouts a launcher can choose, and the few steps where a sharded layout needs more than
`accelerator.prepare`.

Layouts (`layout(acc)`): 'single', 'ddp', DeepSpeed 'zero1' / 'zero2' / 'zero3', and 'fsdp' (FSDP2,
`fully_shard` on every decoder layer and on the root). The launcher config picks one
(configs/accelerate/*.yaml); a run's code is the same under all of them. Under 'zero3' and 'fsdp' a
process holds only a shard of each parameter, which matters in four places:

- generation gathers the policy's parameters once per rollout into a plain copy (`full_model`), instead of
  gathering every layer again for every generated token;
- frozen models (PPO's reference and reward model) are sharded for inference too (`prepare_frozen`);
- DeepSpeed runs backward and the optimiser step inside its engine, one engine per trained model
  (`backward`);
- comparing or saving a model needs its gathered parameters (`full_state`; `accelerator.get_state_dict`
  for the saved model/); a checkpoint holds each DeepSpeed engine as its own files (`save_engine`,
  `load_engine`, which reads them without unpickling).

accelerate's FSDP plugin only switches on for GPU-like devices; `adopt_fsdp_on_cpu` gives a CPU process
group the same FSDP2 state, so CPU runs go through the code path GPU runs take.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType

SHARDED = ("zero3", "fsdp")


def layout(acc: Accelerator) -> str:
    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "single" if kind == DistributedType.NO else "ddp"


def is_sharded(acc: Accelerator) -> bool:
    return layout(acc) in SHARDED


def flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def adopt_fsdp_on_cpu(acc: Accelerator) -> None:
    """Turn the CPU process group the launcher built into accelerate's FSDP2 state, configured from the
    launcher's FSDP_* settings, so `prepare`, `get_state_dict` and clipping shard as on GPUs."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP on CPU needs fsdp_version: 2 in the launcher config (got {plugin.fsdp_version}); "
                         "see configs/accelerate/cpu-2proc-fsdp.yaml")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    # accelerate keeps the layout in two shared states; both must agree or checkpoints take the DDP path
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed configuration


# DeepSpeed key -> the llmstack key that decides it
_OWNED = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
          "gradient_clipping": "train.max_grad_norm"}


def fill_deepspeed_config(ds: dict, micro_batch: int | None, grad_accum: int, max_grad_norm: float,
                          world_size: int) -> None:
    """Write llmstack's batch, accumulation and clipping into the DeepSpeed config (its engine clips, and
    accelerate's clip_grad_norm_ only reports the norm). Values the DeepSpeed file fixes must agree with
    llmstack's config: the file should say "auto"."""
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the launcher's deepspeed_config")
    ours = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": max_grad_norm}
    for key, value in ours.items():
        given = ds.get(key, "auto")
        if value is not None and given != "auto" and float(given) != float(value):
            raise ValueError(f"{source}: '{key}' is {given} but llmstack's {_OWNED[key]} is {value}; set it to "
                             f"\"auto\" (llmstack's config decides) or make the two agree")
    given_total = ds.get("train_batch_size", "auto")
    if micro_batch is not None and given_total != "auto" and int(given_total) != micro_batch * grad_accum * world_size:
        raise ValueError(f"{source}: 'train_batch_size' {given_total} does not divide into {world_size} processes x "
                         f"train.grad_accum {grad_accum} x train.batch_size {micro_batch} "
                         f"(= {micro_batch * grad_accum * world_size}); set it to \"auto\"")
    if micro_batch is not None:
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds.pop("train_batch_size", None)
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = max_grad_norm
    # llmstack's own AdamW is the optimiser: DeepSpeed must be told to accept it under ZeRO
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # every run ends with a consolidated Hugging Face model/, which needs the gathered weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True


# ---------------------------------------------------------------------------------------------------------
# Training steps and frozen models


def backward(acc: Accelerator, model, loss: torch.Tensor) -> None:
    """`acc.backward(loss)` for `model`. One Accelerator drives one DeepSpeed engine through `backward`; PPO
    trains two (policy and value), so each engine gets accelerate's wrapper of its own, which runs its
    backward and, at the end of accumulation, its clipped optimiser step."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

        DeepSpeedEngineWrapper(model).backward(loss, sync_gradients=acc.sync_gradients)
    else:
        acc.backward(loss)


def prepare_frozen(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is only evaluated (PPO's reference and reward model), placed like the trained ones:
    ZeRO-3-partitioned through an optimiser-less DeepSpeed engine, FSDP2-sharded, or replicated."""
    model.requires_grad_(False).eval()
    kind = layout(acc)
    if kind.startswith("zero"):
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=_inference_config(acc, kind == "zero3"))
        engine.eval()  # DeepSpeed's engine returns None here, not itself
        return engine
    if kind == "fsdp":
        return _fully_shard(acc, model)
    return model.to(acc.device)


def _inference_config(acc: Accelerator, partition: bool) -> dict:
    """The training config's precision and (under ZeRO-3) parameter partitioning, without anything an
    optimiser needs; other stages replicate the model (stage 0), applying the same precision."""
    train = acc.state.deepspeed_plugin.deepspeed_config
    zero = train.get("zero_optimization", {})
    config = {"train_micro_batch_size_per_gpu": train.get("train_micro_batch_size_per_gpu", 1),
              "zero_optimization": {"stage": 3 if partition else 0}}
    if partition:
        for key in ("offload_param", "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if key in zero and zero[key] != "auto":
                config["zero_optimization"][key] = zero[key]
    for precision in ("bf16", "fp16"):
        if train.get(precision, {}).get("enabled") is True:
            config[precision] = {"enabled": True}
    return config


def _fully_shard(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 as accelerate's plugin applies it to trained models: each decoder layer (the model's
    `_no_split_modules`, or the launcher's fsdp_transformer_layer_cls_to_wrap) is one shard group, the rest
    is the root's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = acc.state.fsdp_plugin
    names = set(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or [])
    model.to(acc.device)
    options = {"reshard_after_forward": plugin.reshard_after_forward,
               "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, **options)
    return fully_shard(model, **options)


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed engines in checkpoints


def save_engine(engine, directory: Path) -> None:
    """A DeepSpeed engine's model and optimiser (partitioned under ZeRO) into `directory`, by its own writer;
    every process must call this."""
    engine.save_checkpoint(str(directory), tag="state", client_state={}, save_latest=False)


def load_engine(engine, directory: Path) -> None:
    """What `save_engine` wrote, read back with `load_tensors_only` (DeepSpeed's own reader unpickles)."""
    engine.checkpoint_engine.load = load_tensors_only
    loaded, _ = engine.load_checkpoint(str(directory), tag="state", load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not read its checkpoint in {directory}")


def load_tensors_only(path: str, map_location=None):
    """torch.load restricted to tensors, plain containers and the records DeepSpeed's optimiser state holds as
    plain data (the ZeRO stage, the loss scale, a fragment's offsets), rebuilt from their saved fields:
    nothing else named in a file can be loaded, so nothing in it can run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------------------
# Gathered parameters


def full_state(acc: Accelerator, model) -> dict[str, torch.Tensor]:
    """Every parameter of `model` whole, on every process (a collective: all processes must call it).
    Tied parameters appear under each of their names."""
    module = acc.unwrap_model(model)
    named = list(module.named_parameters(remove_duplicate=False))
    kind = layout(acc)
    if kind == "zero3":
        import deepspeed

        unique = list({id(p): p for _, p in named}.values())
        with deepspeed.zero.GatheredParameters(unique):
            return {name: p.detach().clone() for name, p in named}
    if kind == "fsdp":
        from torch.distributed.tensor import DTensor

        gathered: dict[int, torch.Tensor] = {}
        for _, p in named:
            if id(p) not in gathered:
                gathered[id(p)] = p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()
        return {name: gathered[id(p)] for name, p in named}
    return {name: p.detach() for name, p in named}


@contextlib.contextmanager
def full_model(acc: Accelerator, model) -> Iterator[torch.nn.Module]:
    """The model with whole parameters, for work one process may do alone (generation, sampling).

    Replicated layouts yield the unwrapped model itself. Sharded ones gather every parameter once, into a
    plain copy of the model that lives only inside the block: generating N tokens then costs one gather,
    not N, and no collective runs while a single process generates."""
    module = acc.unwrap_model(model)
    if not is_sharded(acc):
        yield module
        return
    state = full_state(acc, model)
    with torch.device("meta"):
        copy = type(module)(module.config)
    copy.load_state_dict(state, strict=False, assign=True)
    # buffers and plain tensor attributes (rotary frequencies) are never sharded: share the model's own
    for name, part in copy.named_modules():
        source = module.get_submodule(name)
        for attr, value in list(vars(part).items()) + list(part._buffers.items()):
            if torch.is_tensor(value) and value.is_meta:
                setattr(part, attr, getattr(source, attr))
    missing = [name for name, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathering {type(module).__name__} for generation left {missing[:3]} unfilled")
    copy.generation_config = module.generation_config
    copy.train(module.training)
    try:
        yield copy
    finally:
        del copy, state
