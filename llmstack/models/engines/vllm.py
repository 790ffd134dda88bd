"""A vLLM rollout engine colocated with training (CUDA only; optional extra `llmstack[vllm]`).

VERIFIED ONLY WHERE `scripts/gpu-check-vllm.sh` HAS RUN. On the CPU machines this project is tested on, vLLM
cannot run: the tests drive this module's weight push, sleep/wake order and batching against a fake vLLM
(tests/models/test_vllm_engine.py), not vLLM itself.

How it works, per rollout:
1. `load_weights(policy)`: the first call starts vLLM in this process on the policy's GPU, from the policy's
   checkpoint directory (`name_or_path`), with sleep mode on. Every call then wakes vLLM's weight memory,
   pushes the policy's current weights into vLLM's model (`load_weights` of the model its model runner holds,
   with Hugging Face names; LoRA adapters added into the weights they adapt, out of place, so the policy is
   left exactly as it was), and wakes the KV cache.
2. `generate`: one request per row, its left padding stripped, sampled with the row's own seed (vLLM's
   per-request seed: a row's answer then does not depend on the batch or the process, though it is not the
   `hf` engine's answer, which draws its noise differently), stopping at EOS; the answers come back
   right-padded. Then vLLM sleeps at level 2 (weights and KV cache released), so the update that follows has
   the GPU's memory; the next push refills the weights.
Log-probabilities are not vLLM's: the RL loop recomputes them with the policy, as for every engine.
Under N processes each runs its own vLLM on its own GPU (vLLM's "external_launcher" backend, as the
process group is already formed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from llmstack.rl.rollout import SamplingSettings

# share of the GPU vLLM may take while awake: training's activations and optimiser state live beside it
GPU_MEMORY_SHARE = 0.3


class VLLMBackend:
    """The two things the engine needs from the vllm package: an engine, and sampling parameters."""

    def llm(self, model: torch.nn.Module):
        try:
            import vllm
        except ImportError as err:
            raise ImportError("rollout.engine=vllm needs vLLM on a CUDA machine: pip install 'llmstack[vllm]'") from err
        path = getattr(model, "name_or_path", None)
        if not path or not os.path.isdir(path):
            raise ValueError(f"rollout.engine=vllm starts vLLM from the policy's checkpoint directory, and "
                             f"{path!r} is none: give model.name_or_path as a saved directory")
        # in-process engine core: the push below reaches the model object directly
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        spread = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        return vllm.LLM(model=path, dtype=next(model.parameters()).dtype, enable_sleep_mode=True,
                        gpu_memory_utilization=GPU_MEMORY_SHARE, generation_config="vllm",
                        skip_tokenizer_init=True,  # token ids in and out: vLLM never needs the text
                        **({"distributed_executor_backend": "external_launcher"} if spread else {}))

    def sampling_params(self, **kwargs):
        import vllm

        return vllm.SamplingParams(**kwargs)


class VLLMEngine:
    """vLLM sampling at `temperature` with nucleus `top_p` from per-row seeds, fed the policy's weights
    before each rollout and asleep between rollouts."""

    def __init__(self, sampling: SamplingSettings, eos_token_id: int, pad_token_id: int, *,
                 backend: VLLMBackend | None = None):
        self.sampling, self.eos_token_id, self.pad_token_id = sampling, eos_token_id, pad_token_id
        self.backend = backend or VLLMBackend()
        self.llm, self.asleep = None, False

    def load_weights(self, model: torch.nn.Module) -> None:
        if self.llm is None:
            self.llm, self.asleep = self.backend.llm(model), False  # vLLM starts awake
        if self.asleep:  # weights first, the KV cache after the push: the two never peak together
            self.llm.wake_up(tags=["weights"])
        runner_model(self.llm).load_weights(weights=hf_weights(model))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def generate(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
                 seeds_B: torch.Tensor | None = None) -> torch.Tensor:
        if self.llm is None or self.asleep:
            raise RuntimeError("VLLMEngine.generate before load_weights: push the policy's weights first")
        s, B = self.sampling, prompt_ids_BP.shape[0]
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompt_ids_BP, prompt_mask_BP)]
        params = [self.backend.sampling_params(
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, stop_token_ids=[self.eos_token_id],
            detokenize=False, **({} if seeds_B is None else {"seed": int(seeds_B[i]) & (2 ** 63 - 1)}))
            for i in range(B)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.llm.sleep(level=2)
        self.asleep = True
        return right_padded([list(o.outputs[0].token_ids) for o in outputs], self.eos_token_id, self.pad_token_id,
                            prompt_ids_BP.device)


def right_padded(answers: list[list[int]], eos_token_id: int, pad_token_id: int, device) -> torch.Tensor:
    """[B, R] from token lists: each cut after its first EOS, then padded to the longest."""
    cut = [a[:a.index(eos_token_id) + 1] if eos_token_id in a else a for a in answers]
    out = torch.full((len(cut), max(1, max(map(len, cut)))), pad_token_id, dtype=torch.long)
    for i, a in enumerate(cut):
        out[i, :len(a)] = torch.tensor(a, dtype=torch.long)
    return out.to(device)


def runner_model(llm):
    """The model object vLLM's in-process worker runs (its place moved between vLLM versions)."""
    worker = llm.llm_engine.model_executor.driver_worker
    return getattr(worker, "worker", worker).model_runner.model


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under Hugging Face checkpoint names, with LoRA adapters added into the weights
    they adapt. The sum is computed out of place: merging into the module and unmerging after would leave the
    frozen base a rounding error away from itself after every rollout."""
    if not hasattr(model, "get_base_model"):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module for name, module in base.named_modules()
              if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or "modules_to_save" in name:
            continue
        if name in deltas:
            tensor = tensor + sum(deltas[name].get_delta_weight(a) for a in deltas[name].active_adapters)
        yield name.replace(".base_layer.", "."), tensor
