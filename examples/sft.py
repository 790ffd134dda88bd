"""SFT from Python: a tiny model and prompt-completion records in memory, stopped by a callback at step 3."""
from transformers import AutoModelForCausalLM, LlamaConfig

from llmstack import Callback, SFTTrainer
from llmstack.data.text import train_tokenizer


class StopAt(Callback):
    def on_step_end(self, step, metrics):
        return step >= 3 and "three steps are enough for an example"


records = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}."} for a in range(9) for b in range(9)]
tokenizer = train_tokenizer((r["prompt"] + r["completion"] for r in records), vocab_size=320)
model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=128))
config = {"output_dir": "runs/example-sft", "data": {"max_length": 64}, "train": {"batch_size": 4, "lr": 1e-3}}
result = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=records, config=config, callbacks=[StopAt()]).train()
print(result.status, result.reason, AutoModelForCausalLM.from_pretrained(result.run_dir / "model").num_parameters())
