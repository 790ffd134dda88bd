"""PPO from Python: a tiny policy and reward model, a reward function beside it, stopped by a callback at step 3."""
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from llmstack import Callback, PPOTrainer
from llmstack.data.text import train_tokenizer


class StopAt(Callback):
    def on_step_end(self, step, metrics):
        return step >= 3 and "three steps are enough for an example"


def brevity(prompts, completions, **columns):
    return [-len(c) / 100 for c in completions]


prompts = [{"prompt": f"What is {a} plus {b}?"} for a in range(9) for b in range(9)]
tokenizer = train_tokenizer((p["prompt"] for p in prompts), vocab_size=300)
shape = LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    num_labels=1)  # the reward model gives one score
policy, scorer = AutoModelForCausalLM.from_config(shape), AutoModelForSequenceClassification.from_config(shape)
config = {"output_dir": "runs/example-ppo", "rollout": {"batch_size": 4, "max_new_tokens": 8}, "train": {"batch_size": 4}}
result = PPOTrainer(model=policy, tokenizer=tokenizer, reward_model=scorer, reward_funcs=[brevity], train_dataset=prompts,
                    config=config, callbacks=[StopAt()]).train()
print(result.status, AutoModelForCausalLM.from_pretrained(result.run_dir / "model").num_parameters())
