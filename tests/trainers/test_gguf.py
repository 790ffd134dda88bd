"""A model loaded from a GGUF file (written here with the `gguf` package) computes what the original did,
trains, and saves as a plain Hugging Face model that stock transformers reloads without the GGUF."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmstack.config import SFTConfig, load_config
from llmstack.models.causal_lm import load_causal_lm
from llmstack.trainers.sft import sft

from helpers import tiny_chat_policy

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'llmstack[dev]')")

HEADS, KV_HEADS = 4, 2
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF stores Llama's query and key rows with each head's two rotary halves interleaved (llama.cpp's
    rotation pairs neighbours); Hugging Face's loader undoes this."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().float()
        if key in TOP_NAMES:
            name = TOP_NAMES[key]
        else:
            layer, module = key.split(".")[2], ".".join(key.split(".")[3:-1])
            name = f"blk.{layer}.{LAYER_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                tensor = rotary_interleave(tensor, HEADS)
            elif module == "self_attn.k_proj":
                tensor = rotary_interleave(tensor, KV_HEADS)
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    _, tokenizer = tiny_chat_policy(root)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    original = AutoModelForCausalLM.from_config(config).eval()
    (root / "gguf").mkdir()
    write_gguf(original, root / "gguf/tiny.gguf")
    return root, original


def test_a_gguf_model_computes_what_the_original_did(gguf_model):
    root, original = gguf_model
    loaded = load_causal_lm(str(root / "gguf"), "tiny.gguf").eval()
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)  # F32 tensors: nothing was rounded


def test_a_gguf_model_trains_and_saves_as_a_plain_hugging_face_model(tmp_path, gguf_model):
    root, original = gguf_model
    result = sft(load_config(SFTConfig, None, [
        f"output_dir={tmp_path / 'sft'}", f"model.name_or_path={root / 'gguf'}", "model.gguf_file=tiny.gguf",
        f"model.tokenizer={root / 'policy'}", "data.train=synthetic:24", "data.max_length=64", "train.max_steps=2",
        "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=0", "train.eval_every=0", "sample_prompts=0"]))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft/model")
    assert getattr(reloaded.config, "quantization_config", None) is None
    trained, start = result.model.state_dict(), original.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
