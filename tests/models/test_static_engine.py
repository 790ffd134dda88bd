"""The static-cache engine against Hugging Face `generate` (greedy) and the `hf` engine (seeded sampling):
the same tokens, over several prompt lengths, left padding, early EOS, LoRA adapters, reused caches and
weights changed between rollouts. Every case first checks that it is decisive: the winning logit of each
step leads the runner-up by far more than the float error of a different summation order, so equal tokens
are the expected result on any machine, not a lucky one."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmstack.models.engines import AutoEngine, build_engine
from llmstack.models.engines.hf import HFEngine
from llmstack.models.engines.static import StaticEngine
from llmstack.rl.rollout import SamplingSettings
from llmstack.rl.sampling import row_seeds

V, EOS, PAD = 300, 2, 0
# fp32 logits of a 2-layer model summed in another order differ by ~1e-6 of their size (~10 here)
DECISIVE = 1e-3


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(config).eval()


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(3, V, (len(lengths), P), generator=g)
    mask = (torch.arange(P)[None] >= P - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def reference(model, ids, mask, new_tokens: int, eos: int = EOS) -> torch.Tensor:
    """`generate`'s greedy answer, after checking every step's choice is decisive."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=eos, pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > DECISIVE, "pick another seed: a step is nearly tied"
    return out.sequences[:, ids.shape[1]:]


def static_greedy(model, ids, mask, new_tokens: int, eos: int = EOS) -> torch.Tensor:
    engine = StaticEngine(SamplingSettings(new_tokens, 1.0), eos, PAD, greedy=True)
    engine.load_weights(model)
    return engine.generate(ids, mask)


@pytest.mark.parametrize("lengths", [[7], [5, 5, 5], [1, 9, 4, 12, 2, 9]], ids=["one", "equal", "left-padded"])
def test_greedy_gives_exactly_the_tokens_of_generate(lengths):
    model = tiny_model()
    ids, mask = left_padded(lengths)
    expected = reference(model, ids, mask, 16)
    assert expected.shape == (len(lengths), 16)
    assert torch.equal(static_greedy(model, ids, mask, 16), expected)


def test_greedy_stops_each_row_at_eos_as_generate_does():
    model = tiny_model()
    ids, mask = left_padded([3, 8, 6, 11])
    free = reference(model, ids, mask, 12, eos=-1)
    eos = int(free[1, 2])  # row 1's third token: it ends there, the others end there or run on
    expected = reference(model, ids, mask, 12, eos=eos)
    assert (expected[1, 3:] == PAD).all() and (expected == eos).sum() >= 1
    assert torch.equal(static_greedy(model, ids, mask, 12, eos=eos), expected)
    # a batch whose rows have all ended stops: shorter than the limit, as generate's
    alone = reference(model, ids[1:2], mask[1:2], 12, eos=eos)
    assert alone.shape[1] == 3
    assert torch.equal(static_greedy(model, ids[1:2], mask[1:2], 12, eos=eos), alone)


def test_greedy_under_lora_adapters_samples_the_adapted_policy():
    peft = pytest.importorskip("peft")
    base = tiny_model()
    ids, mask = left_padded([4, 10, 7])
    plain = reference(base, ids, mask, 10)
    # adapters initialised away from zero, so that they change the answers
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False)).eval()
    adapted = reference(model, ids, mask, 10)
    assert not torch.equal(adapted, plain)
    assert torch.equal(static_greedy(model, ids, mask, 10), adapted)


def test_each_rollout_reads_the_current_weights_and_reuses_an_emptied_cache():
    model = tiny_model()
    ids, mask = left_padded([6, 9])
    engine = StaticEngine(SamplingSettings(8, 1.0), EOS, PAD, greedy=True)
    engine.load_weights(model)
    first = engine.generate(ids, mask)
    with torch.no_grad():
        for p in model.parameters():  # an update in place, as an optimiser step makes
            p.add_(torch.randn_like(p) * 0.05)
    engine.load_weights(model)
    second = engine.generate(ids, mask)
    expected = reference(model, ids, mask, 8)
    assert not torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_seeded_sampling_gives_the_answers_of_the_hf_engine(temperature, top_p):
    model = tiny_model()
    ids, mask = left_padded([2, 11, 6, 9, 4, 11, 1, 7])
    settings = SamplingSettings(14, temperature, top_p)
    seeds = row_seeds(3, 5, torch.arange(8))
    hf, fast = HFEngine(settings, EOS, PAD), StaticEngine(settings, EOS, PAD)
    hf.load_weights(model)
    fast.load_weights(model)
    expected = hf.generate(ids, mask, seeds)
    assert torch.equal(fast.generate(ids, mask, seeds), expected)
    # a row's answer is its seed's alone: alone, or behind a different padding, it is the same
    alone = fast.generate(ids[1:2, -11:], mask[1:2, -11:], seeds[1:2])
    assert torch.equal(alone, expected[1:2, :alone.shape[1]]) and (expected[1, alone.shape[1]:] == PAD).all()
    assert not torch.equal(fast.generate(ids, mask, seeds + 1), expected)


def test_auto_picks_static_on_cuda_where_the_architecture_supports_a_static_cache_and_hf_elsewhere(monkeypatch):
    import llmstack.models.engines as engines

    model = tiny_model()
    on_cpu = build_engine("auto", SamplingSettings(4, 1.0), EOS, PAD)
    on_cpu.load_weights(model)
    assert on_cpu.chosen == ("static" if torch.cuda.is_available() else "hf")
    monkeypatch.setattr(engines, "on_cuda", lambda model: True)
    auto = build_engine("auto", SamplingSettings(4, 1.0), EOS, PAD)
    auto.load_weights(model)
    assert isinstance(auto, AutoEngine) and auto.chosen == "static"
    model._can_compile_fullgraph = False
    other = build_engine("auto", SamplingSettings(4, 1.0), EOS, PAD)
    other.load_weights(model)
    assert other.chosen == "hf"
    ids, mask = left_padded([3, 5])
    seeds = row_seeds(0, 0, torch.arange(2))
    assert torch.equal(auto.generate(ids, mask, seeds), other.generate(ids, mask, seeds))


@pytest.mark.slow
def test_the_compiled_decoding_step_gives_the_same_tokens():
    """The path CUDA takes (compiled step, cache rounded up to a block), run here by inductor on CPU."""
    model = tiny_model()
    engine = StaticEngine(SamplingSettings(10, 1.0), EOS, PAD, greedy=True, compile=True)
    engine.load_weights(model)
    for lengths in ([4, 9, 2], [12, 3, 7]):
        ids, mask = left_padded(lengths)
        assert torch.equal(engine.generate(ids, mask), reference(model, ids, mask, 10))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run by scripts/gpu-check-vllm.sh")


@CUDA
def test_cuda_compiled_engine_gives_the_tokens_of_generate_and_of_the_hf_engine():
    """On CUDA the decoding step is compiled with CUDA graphs by default; new prompt lengths within one cache
    block reuse the graphs, and a reused cache is emptied between rollouts."""
    model = tiny_model().cuda()
    greedy = StaticEngine(SamplingSettings(12, 1.0), EOS, PAD, greedy=True)
    greedy.load_weights(model)
    for lengths in ([4, 9, 2], [12, 3, 7], [5, 5, 5]):
        ids, mask = (t.cuda() for t in left_padded(lengths))
        assert torch.equal(greedy.generate(ids, mask), reference(model, ids, mask, 12))
    settings = SamplingSettings(12, 0.7, 0.9)
    hf, fast = HFEngine(settings, EOS, PAD), StaticEngine(settings, EOS, PAD)
    hf.load_weights(model)
    fast.load_weights(model)
    ids, mask = (t.cuda() for t in left_padded([2, 11, 6, 9]))
    seeds = row_seeds(3, 5, torch.arange(4)).cuda()
    assert torch.equal(fast.generate(ids, mask, seeds), hf.generate(ids, mask, seeds))
