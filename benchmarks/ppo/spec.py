"""The one description of the PPO work both contenders do, and its translation into each one's settings.

Standard library only: the TRL worker imports this module from its own virtual environment, which has no
llmstack installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Work:
    rollout: int = 8  # prompts per rollout (per PPO step)
    minibatch: int = 4  # sequences per optimiser step
    epochs: int = 2  # passes over each rollout
    new_tokens: int = 32  # longest response
    temperature: float = 0.7
    lr: float = 1e-5  # policy and value model alike
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    kl_coef: float = 0.05  # fixed: no adaptive controller on either side
    kl_estimator: str = "k1"
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    max_prompt_tokens: int = 64  # longer prompts keep their last tokens
    steps: int = 6  # PPO steps run by each contender
    seed: int = 0

    def __post_init__(self):
        if self.rollout % self.minibatch:
            raise ValueError(f"the rollout ({self.rollout}) must split into whole minibatches of {self.minibatch}")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Work":
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "adam_betas": tuple(data["adam_betas"])})


def llmstack_overrides(work: Work, policy: str, reward: str, prompts: str, output_dir: str,
                       engine: str = "auto") -> list[str]:
    """`key=value` overrides of llmstack's PPOConfig, generating with rollout engine `engine`. The reward model's
    directory is also the value model's start, as in TRL's examples."""
    return [
        f"output_dir={output_dir}", f"seed={work.seed}", f"model.name_or_path={policy}",
        f"reward_model.name_or_path={reward}", f"value_model.name_or_path={reward}",
        f"data.train={prompts}", f"data.max_prompt_length={work.max_prompt_tokens}",
        f"train.max_steps={work.steps}", f"train.batch_size={work.minibatch}", f"train.lr={work.lr}",
        "train.schedule=constant", "train.warmup_steps=0", f"train.weight_decay={work.weight_decay}",
        f"train.adam_betas=[{work.adam_betas[0]}, {work.adam_betas[1]}]",
        # TRL's PPO loop never clips gradients
        "train.max_grad_norm=0", "train.precision=fp32", "train.log_every=1", f"train.save_every={work.steps}",
        f"rollout.batch_size={work.rollout}", f"rollout.max_new_tokens={work.new_tokens}",
        f"rollout.temperature={work.temperature}", "rollout.top_p=1.0", f"rollout.engine={engine}",
        f"ppo.epochs={work.epochs}", f"ppo.clip={work.clip}",
        f"ppo.value_clip={work.value_clip}", f"ppo.value_lr={work.lr}", f"ppo.gamma={work.gamma}",
        f"ppo.lam={work.lam}", f"ppo.kl_estimator={work.kl_estimator}", "ppo.kl_in=reward",
        f"ppo.kl_coef={work.kl_coef}", "ppo.kl_target=null", "ppo.missing_eos_penalty=null",
        # TRL scores with the raw reward-model output
        "ppo.normalize_rewards=false", "ppo.reward_clip=null", "ppo.whiten_advantages=true",
    ]


def trl_kwargs(work: Work, output_dir: str) -> dict:
    """Arguments of TRL 1.12's `trl.experimental.ppo.PPOConfig`.

    TRL's rollout is `per_device_train_batch_size x gradient_accumulation_steps` prompts, split into
    `num_mini_batches` minibatches. With accumulation 1 and the whole rollout as the per-device batch, each
    minibatch is one forward/backward and one optimiser step, as in llmstack.
    """
    return dict(
        output_dir=output_dir, seed=work.seed, per_device_train_batch_size=work.rollout,
        gradient_accumulation_steps=1, num_mini_batches=work.rollout // work.minibatch,
        local_rollout_forward_batch_size=work.rollout, total_episodes=work.rollout * work.steps,
        num_ppo_epochs=work.epochs, response_length=work.new_tokens, temperature=work.temperature,
        stop_token="eos", learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=work.weight_decay, adam_beta1=work.adam_betas[0], adam_beta2=work.adam_betas[1],
        kl_coef=work.kl_coef, kl_estimator=work.kl_estimator, cliprange=work.clip,
        cliprange_value=work.value_clip, gamma=work.gamma, lam=work.lam, whiten_rewards=False,
        missing_eos_penalty=None,
        # TRL's PPOConfig defaults to bf16 and gradient checkpointing; the comparison is fp32 without either
        bf16=False, fp16=False, gradient_checkpointing=False,
        # its extra sampling on an eval set every few steps is a debugging aid with no llmstack counterpart
        num_sample_generations=0,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )
