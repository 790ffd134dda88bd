"""The vLLM engine's own logic, against a fake vLLM on CPU (vLLM itself needs CUDA; scripts/gpu-check-vllm.sh
runs the real one): the policy's current weights reach the engine before every rollout (LoRA merged in,
the policy left as it was), vLLM sleeps between rollouts and wakes weights before the KV cache, and a batch
of left-padded prompts becomes one seeded request per row whose answers come back right-padded."""

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmstack.models.engines.vllm import GPU_MEMORY_SHARE, VLLMEngine, hf_weights, right_padded
from llmstack.rl.rollout import SamplingSettings
from llmstack.rl.sampling import row_seeds

V, EOS, PAD = 300, 2, 0


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=PAD)).eval()


class FakeVLLM:
    """vLLM's surface as the engine uses it. Its model is a Hugging Face model of the policy's architecture
    with its own random weights, so only pushed weights make its answers the policy's; it answers greedily,
    row by row from the unpadded prompt, and sleeping at level 2 destroys its weights, as vLLM's does."""

    def __init__(self, config):
        self.model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
        self.events, self.requests, self.awake = [], [], {"weights", "kv_cache"}
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))))

    def _load_weights(self, weights):
        assert "weights" in self.awake, "weights pushed into sleeping memory"
        state = self.model.state_dict()
        names = set()
        for name, tensor in weights:
            state[name].copy_(tensor)  # a name vLLM would not know fails here
            names.add(name)
        self.events.append("load")
        self.pushed = names

    def generate(self, prompts, params, use_tqdm):
        assert self.awake == {"weights", "kv_cache"}, "generate while asleep"
        self.events.append("generate")
        self.requests.append((prompts, params))
        outputs = []
        for prompt, p in zip(prompts, params):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=p.max_tokens, eos_token_id=p.stop_token_ids[0], pad_token_id=PAD)
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=out[0, ids.shape[1]:].tolist())]))
        return outputs

    def sleep(self, level):
        self.events.append(f"sleep({level})")
        self.awake.clear()
        if level == 2:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags):
        self.events.append(f"wake({','.join(tags)})")
        self.awake |= set(tags)


class FakeBackend:
    def __init__(self):
        self.started = []

    def llm(self, model):
        self.started.append(FakeVLLM(model.config))
        return self.started[-1]

    def sampling_params(self, **kwargs):
        return SimpleNamespace(**kwargs)


def left_padded(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(3, V, (len(lengths), P), generator=g)
    mask = (torch.arange(P)[None] >= P - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def greedy_rows(model, ids, mask, new_tokens):
    """Each row's greedy answer from its unpadded prompt, right-padded: what the engine must return."""
    rows = []
    for row, m in zip(ids, mask):
        prompt = row[m.bool()][None]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD)
        rows.append(out[0, prompt.shape[1]:].tolist())
    return right_padded(rows, EOS, PAD, "cpu")


def test_each_rollout_samples_the_policys_current_weights_and_vllm_sleeps_between_rollouts():
    policy, backend = tiny_model(), FakeBackend()
    engine = VLLMEngine(SamplingSettings(8, 1.0), EOS, PAD, backend=backend)
    ids, mask = left_padded([4, 9, 6])
    engine.load_weights(policy)
    first = engine.generate(ids, mask, row_seeds(0, 0, torch.arange(3)))
    assert torch.equal(first, greedy_rows(policy, ids, mask, 8))
    with torch.no_grad():  # an update in place, as an optimiser step makes
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(RuntimeError, match="load_weights"):
        engine.generate(ids, mask, None)  # asleep since the last rollout: the weights must come first
    engine.load_weights(policy)
    second = engine.generate(ids, mask, row_seeds(0, 1, torch.arange(3)))
    expected = greedy_rows(policy, ids, mask, 8)
    assert torch.equal(second, expected) and not torch.equal(first, expected)
    fake = backend.started[0]
    assert len(backend.started) == 1, "one vLLM for the whole run"
    assert fake.events == ["load", "generate", "sleep(2)", "wake(weights)", "load", "wake(kv_cache)", "generate",
                           "sleep(2)"]
    assert fake.pushed == set(policy.state_dict())


def test_a_lora_policy_is_pushed_merged_and_left_unmerged():
    peft = pytest.importorskip("peft")
    policy = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False)).eval()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    pushed = dict((name, t.clone()) for name, t in hf_weights(policy))
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert pushed.keys() == expected.keys()
    assert all(torch.allclose(pushed[k], expected[k], rtol=1e-6, atol=1e-6) for k in expected)
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the push must leave the policy unmerged"
    engine = VLLMEngine(SamplingSettings(6, 1.0), EOS, PAD, backend=FakeBackend())
    ids, mask = left_padded([5, 3])
    engine.load_weights(policy)
    assert torch.equal(engine.generate(ids, mask, None), greedy_rows(policy, ids, mask, 6))


def test_a_batch_becomes_one_seeded_request_per_row_without_its_padding():
    backend = FakeBackend()
    engine = VLLMEngine(SamplingSettings(5, 0.7, 0.9), EOS, PAD, backend=backend)
    ids, mask = left_padded([2, 7, 4])
    seeds = row_seeds(3, 2, torch.arange(3))
    engine.load_weights(tiny_model())
    engine.generate(ids, mask, seeds)
    prompts, params = backend.started[0].requests[0]
    assert [p["prompt_token_ids"] for p in prompts] == [ids[0, 5:].tolist(), ids[1].tolist(), ids[2, 3:].tolist()]
    assert [p.seed for p in params] == [int(s) & (2 ** 63 - 1) for s in seeds] and len({p.seed for p in params}) == 3
    assert {(p.temperature, p.top_p, p.max_tokens, tuple(p.stop_token_ids)) for p in params} == {(0.7, 0.9, 5, (EOS,))}


def test_answers_come_back_cut_after_eos_and_right_padded():
    got = right_padded([[5, 6, EOS, 9, 9], [7], [8, 8, 8]], EOS, PAD, "cpu")
    assert got.tolist() == [[5, 6, EOS], [7, PAD, PAD], [8, 8, 8]]


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs CUDA and vLLM: run by scripts/gpu-check-vllm.sh")
def test_cuda_real_vllm_samples_the_pushed_weights_and_frees_its_memory_asleep(tmp_path):
    """The real thing: vLLM started from the policy's directory, then fed changed weights, answers as the
    changed policy does (greedy: vLLM samples greedily below a temperature of 1e-5, and every step of this
    model is decisive, so fp32 kernels of either library pick the same token); asleep, its memory is free."""
    tiny_model().save_pretrained(tmp_path / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32).cuda().eval()
    engine = VLLMEngine(SamplingSettings(8, 1e-6), EOS, PAD)
    ids, mask = (t.cuda() for t in left_padded([4, 9, 6]))
    engine.load_weights(policy)
    free_awake = torch.cuda.mem_get_info()[0]
    first = engine.generate(ids, mask, row_seeds(0, 0, torch.arange(3)))
    freed = torch.cuda.mem_get_info()[0] - free_awake
    assert freed > 0.5 * GPU_MEMORY_SHARE * torch.cuda.mem_get_info()[1], f"asleep, vLLM freed only {freed / 2**30:.1f} GiB"
    assert torch.equal(first.cpu(), greedy_rows(policy, ids, mask, 8).cpu())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.load_weights(policy)
    second = engine.generate(ids, mask, row_seeds(0, 1, torch.arange(3)))
    assert not torch.equal(second, first)
    assert torch.equal(second.cpu(), greedy_rows(policy, ids, mask, 8).cpu())
