"""A reward model from Python: preference pairs in memory, a tiny backbone, stopped by a callback at step 3."""
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from llmstack import Callback, RewardTrainer
from llmstack.data.text import train_tokenizer


class StopAt(Callback):
    def on_step_end(self, step, metrics):
        return step >= 3 and "three steps are enough for an example"


pairs = [{"prompt": f"What is {a} plus {b}?", "chosen": f" {a + b}, glad to help.", "rejected": f" {a + b + 1}."}
         for a in range(9) for b in range(9)]
tokenizer = train_tokenizer((p["prompt"] + p["chosen"] + p["rejected"] for p in pairs), vocab_size=320)
backbone = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=128))
config = {"output_dir": "runs/example-reward", "data": {"max_length": 64}, "train": {"batch_size": 4}}
result = RewardTrainer(model=backbone, tokenizer=tokenizer, train_dataset=pairs, config=config, callbacks=[StopAt()]).train()
print(result.status, AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").config.num_labels)
