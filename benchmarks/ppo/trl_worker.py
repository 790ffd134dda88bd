"""TRL 1.12's PPO trainer as one contender, alone in this process; prints one JSON line of results. Runs
in TRL 1.12's own virtual environment (see venv.py), so it imports nothing from llmstack.

    <trl venv>/bin/python -m benchmarks.ppo.trl_worker SETUP_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.ppo.clock import Clock, report
from benchmarks.ppo.spec import Work, trl_kwargs


def main(argv: list[str]) -> None:
    setup, out = (Path(a) for a in argv)
    work = Work.load(setup / "work.json")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    tokenizer = AutoTokenizer.from_pretrained(setup / "policy")
    # the very rows llmstack's prompt loader deals, in its order, already left-padded
    queries = Dataset.from_dict({"input_ids": json.loads((setup / "queries.json").read_text())})

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(setup / "policy", dtype=torch.float32)

    def scalar_head():
        return AutoModelForSequenceClassification.from_pretrained(setup / "reward", num_labels=1, dtype=torch.float32)

    rewards, kls = [], []

    class Behaviour(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                rewards.append(logs["objective/scores"])
                kls.append(logs["objective/kl"])

    trainer = PPOTrainer(args=PPOConfig(**trl_kwargs(work, str(out))), processing_class=tokenizer,
                         model=causal_lm(), ref_model=causal_lm(), reward_model=scalar_head(),
                         value_model=scalar_head(), train_dataset=queries, callbacks=[Behaviour()])
    # read in sequence: TRL's own loader would reshuffle them
    trainer.dataloader = DataLoader(queries, batch_size=work.rollout, shuffle=False,
                                    collate_fn=trainer.data_collator, drop_last=True)

    def describe(out, model, queries, *args):
        responses = out[0][:, queries.shape[1]:]
        is_eos = responses == tokenizer.eos_token_id
        ends = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, responses.shape[1])
        return responses.numel(), ends.float().mean()

    clock = Clock()
    # train() looks these up in its module; masked_whiten runs once per step there, on the advantages, as
    # the scoring's last act (whiten_rewards is off)
    ppo_trainer.batch_generation = clock.generation(ppo_trainer.batch_generation, describe)
    ppo_trainer.masked_whiten = clock.scoring_end(ppo_trainer.masked_whiten)
    trainer.train()
    report(clock, rewards, kls)


if __name__ == "__main__":
    main(sys.argv[1:])
