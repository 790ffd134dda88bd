import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from llmstack.config import ConfigError
from llmstack.models.causal_lm import (build_from_preset, check_vocab, load_causal_lm, matmul_params,
                                       preset_config, save_model)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {f"t{i}": i for i in range(300)}
    vocab.update({"<|bos|>": 300, "<|eos|>": 301, "<|pad|>": 302, "[UNK]": 303})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="[UNK]")


def count(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


@pytest.mark.parametrize("name, vocab, low, high", [("llama-1m", 4096, 1.0e6, 2.0e6),
                                                     ("llama-25m", 32000, 20e6, 30e6),
                                                     ("llama-110m", 32000, 100e6, 125e6)])
def test_presets_have_the_sizes_their_names_promise(name, vocab, low, high):
    assert low <= count(preset_config(name, vocab, 512)) <= high


def test_preset_vocabulary_rounds_up_and_is_deterministic(tokenizer):
    a = build_from_preset("llama-1m", tokenizer, 64, seed=3)
    b = build_from_preset("llama-1m", tokenizer, 64, seed=3)
    assert a.config.vocab_size == 320  # 304 tokens rounded up to a multiple of 64
    assert a.config.eos_token_id == 301 and a.config.pad_token_id == 302
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # tied embeddings: the LM head is the embedding matrix, so it is counted once in the matmul parameters
    assert matmul_params(a) == sum(p.numel() for p in a.parameters())


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown preset 'llama-7b'; available: llama-1m"):
        preset_config("llama-7b", 100, 64)


def test_tokenizer_larger_than_the_embedding_is_refused(tokenizer):
    model = AutoModelForCausalLM.from_config(preset_config("llama-1m", 256, 64))
    with pytest.raises(ValueError, match="the tokenizer has 304 tokens but the model embeds only 256"):
        check_vocab(model, tokenizer)


def test_saved_model_reloads_with_auto_classes(tmp_path, tokenizer):
    save_model(build_from_preset("llama-1m", tokenizer, 64, seed=1), tokenizer, tmp_path / "model")
    model = build_from_preset("llama-1m", tokenizer, 64, seed=0)
    save_model(model, tokenizer, tmp_path / "model")  # replaces the earlier save whole
    assert not (tmp_path / "model.tmp").exists()
    assert (tmp_path / "model" / "model.safetensors").is_file()
    again = load_causal_lm(str(tmp_path / "model"))
    ids = torch.tensor([[1, 2, 3, 301]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "model").eos_token == "<|eos|>"


def test_missing_local_model_says_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="cannot load a model from .*holds no loadable model"):
        load_causal_lm(str(tmp_path))
