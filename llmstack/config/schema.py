"""The configuration schemas: one dataclass per section, reused across stages, and one per stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llmstack.config.curate import CurateConfig
from llmstack.config.limits import BATCH_MAX, COUNT_MAX, SEED_MAX, TOKENS_MAX, VOCAB_MAX
from llmstack.config.loading import ConfigError, option
from llmstack.config.paths import PREVIOUS, overwrite_option

Kernels = Literal["auto", "reference", "fused"]


def _kernels_option():
    return option("auto", "Loss and layer kernels: 'reference' (stock logits + cross-entropy), 'fused' (never the "
                  "full logits; Triton where it runs) or 'auto' (Triton on CUDA, the chunked torch loss on CPU). "
                  "Saved weights keep the stock layout either way.")


@dataclass
class ModelConfig:
    name_or_path: str | None = option(None, "Hugging Face Hub name or local directory of a causal LM to load.")
    preset: str | None = option("llama-1m", "Named architecture to build with fresh weights when "
                                "name_or_path is null (see llmstack.models.PRESETS).")
    gguf_file: str | None = option(None, "GGUF file inside name_or_path to load (dequantised to torch).")
    tokenizer: str | None = option(None, "Tokenizer name or directory. Default: the model's own; for a preset, a "
                                   "byte-level BPE trained on data.train.")
    vocab_size: int = option(4096, "Vocabulary size of a tokenizer trained for a preset model.", ge=259, le=VOCAB_MAX)
    trust_remote_code: bool = option(False, "Run model code shipped with a Hub repository (off: it executes "
                                     "arbitrary code).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Weights' dtype. auto: a trained model keeps fp32 master weights (train.precision casts per op), "
        "a frozen one (reward model) loads in the compute dtype; a frozen copy compared token by token with the "
        "trained model (the RL reference) shares its dtype. bf16/fp16: every model in it (pure low precision).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = option(
        None, "Attention kernel passed to Hugging Face; null: its default (sdpa where the model supports it).")

    def validate(self, prefix: str) -> None:
        if self.name_or_path is None and self.preset is None:
            raise ConfigError(f"{prefix}: set '{prefix}.name_or_path' (load a model) or '{prefix}.preset' "
                              "(build one)")
        if self.gguf_file and not self.name_or_path:
            raise ConfigError(f"'{prefix}.gguf_file' needs '{prefix}.name_or_path' (the directory holding it)")


@dataclass
class DataConfig:
    train: str = option("synthetic", "Training data: a file (.txt, .jsonl, .json, .parquet, .gz), a directory, "
                        "a `datasets` name ('name[:config][@split]') or 'synthetic[:N]' (the built-in corpus).")
    eval: str | None = option(None, "Held-out data in the same forms; default: a slice of data.train "
                              "(data.eval_fraction).")
    text_field: str = option("text", "Field holding the text in JSON/Parquet records.")
    block_size: int = option(256, "Tokens per training sequence (documents are packed into blocks).",
                             ge=8, le=TOKENS_MAX)
    eval_fraction: float = option(0.05, "Share of packed blocks held out for validation when data.eval is "
                                  "not set.", ge=0.0, le=0.5)
    streaming: bool = option(False, "Stream data.train instead of tokenising it into memory (for corpora "
                             "larger than RAM).")


@dataclass
class TrainConfig:
    max_steps: int = option(300, "Optimiser steps to train for.", ge=1, le=COUNT_MAX)
    batch_size: int = option(16, "Sequences per device per micro-batch.", ge=1, le=BATCH_MAX)
    grad_accum: int = option(1, "Micro-batches accumulated per optimiser step.", ge=1, le=BATCH_MAX)
    lr: float = option(3e-3, "Peak learning rate.", gt=0.0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Decay after warm-up.")
    warmup_steps: int = option(30, "Linear warm-up steps from 0 to train.lr; at most a tenth of train.max_steps "
                               "is used when it would leave no decay (a warning says so).", ge=0, le=COUNT_MAX)
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of train.lr (cosine/linear).",
                                 ge=0.0, le=1.0)
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (not applied to biases and norms).", ge=0.0)
    adam_betas: list[float] = option(default_factory=lambda: [0.9, 0.95], help="AdamW (beta1, beta2).")
    optimizer: Literal["adamw", "adamw_8bit"] = option(
        "adamw", "AdamW (torch, fused), or AdamW with its two moment estimates in 8 bits (bitsandbytes; about a "
        "quarter of the optimiser's memory).")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this; 0 disables clipping.", ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Mixed precision (autocast) for forward/backward; model.dtype decides the weights. auto: bf16 on "
        "CUDA devices with bf16 and on CPUs with AVX512-BF16 or AMX, fp32 elsewhere (resolved value in "
        "record.json). fp16 needs CUDA.")
    log_every: int = option(10, "Write metrics.jsonl and trackers every N steps.", ge=1, le=COUNT_MAX)
    eval_every: int = option(100, "Evaluate on held-out data every N steps (and at the end); 0 disables.",
                             ge=0, le=COUNT_MAX)
    eval_batches: int = option(20, "Cap on evaluation micro-batches per process; 0 evaluates all.", ge=0, le=COUNT_MAX)
    save_every: int = option(100, "Write a resumable checkpoint every N steps (and at the end).", ge=1, le=COUNT_MAX)
    keep_last: int = option(2, "Checkpoints kept on disk; older ones are deleted.", ge=1, le=COUNT_MAX)
    report_to: list[str] = option(default_factory=list, help="Extra trackers: tensorboard, wandb.")
    peak_tflops: float | None = option(None, "Per-device peak TFLOP/s for MFU; default: a datasheet table for "
                                       "known GPUs, a measured GEMM on CPU.", gt=0.0)
    power_watts: float | None = option(None, "Power this machine draws while training, in watts (a wall meter's "
                                       "or the provider's figure): the record's energy estimate where no RAPL or "
                                       "NVML counter can be read. Default: a per-core CPU model.", gt=0.0)

    def validate(self, prefix: str) -> None:
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"config key '{prefix}.adam_betas': {self.adam_betas!r} is not allowed; "
                              "expected two numbers in [0, 1), e.g. [0.9, 0.95]")


@dataclass
class PretrainConfig:
    """Causal-LM pretraining: a model learns to continue text."""

    output_dir: str = option("runs/pretrain", "Run directory; re-running on it resumes.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed for initialisation, data order and the held-out split.", ge=0, le=SEED_MAX)
    model: ModelConfig = option(default_factory=ModelConfig)
    data: DataConfig = option(default_factory=DataConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    kernels: Kernels = _kernels_option()


@dataclass
class ChatDataConfig:
    train: str = option("synthetic", "SFT examples: JSONL/JSON/Parquet files or a directory of them with "
                        "{'text'}, {'messages'} or {'prompt', 'completion'} records (README, Data formats), a "
                        "`datasets` name, or 'synthetic'.")
    eval: str | None = option(None, "Held-out conversations; default: a slice of data.train (data.eval_fraction).")
    eval_fraction: float = option(0.05, "Share of conversations held out when data.eval is not set.",
                                  ge=0.0, le=0.5)
    messages_field: str = option("messages", "Field holding a list of {role, content} messages.")
    prompt_field: str = option("prompt", "Field holding the prompt (text or messages) of prompt/completion records.")
    completion_field: str = option("completion", "Field holding the answer (text or messages).")
    max_length: int = option(512, "Tokens per row; longer conversations are handled by data.overlong.",
                             ge=16, le=TOKENS_MAX)
    overlong: Literal["truncate", "drop"] = option("truncate", "Cut conversations longer than data.max_length "
                                                   "from the right, or leave them out (counted either way).")
    packing: bool = option(True, "Put several conversations in one row with attention kept inside each.")


@dataclass
class LoraConfig:
    enabled: bool = option(False, "Train low-rank adapters (peft) instead of all weights.")
    r: int = option(16, "Adapter rank.", ge=1, le=65_536)
    alpha: int = option(32, "Adapter scale numerator (scale = alpha / r).", ge=1, le=1 << 20)
    dropout: float = option(0.0, "Dropout on the adapter input.", ge=0.0, le=0.9)
    target_modules: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"],
                                       help="Module names (suffixes) that get adapters.")
    merge: bool = option(True, "Save the adapters merged into the base weights (a plain model); false saves "
                         "the adapters alone in peft format.")
    load_in_4bit: bool = option(False, "QLoRA: keep the frozen base weights in 4-bit NF4 (bitsandbytes) under "
                                "the adapters.")

    def validate(self, prefix: str) -> None:
        if self.load_in_4bit and not self.enabled:
            raise ConfigError(f"config key '{prefix}.load_in_4bit' needs '{prefix}.enabled=true': a 4-bit base "
                              "can only train through adapters")
        if self.load_in_4bit and self.merge:
            raise ConfigError(f"config key '{prefix}.merge': merging adapters into a 4-bit base would save "
                              f"re-quantised weights; set {prefix}.merge=false with {prefix}.load_in_4bit")


@dataclass
class SFTConfig:
    """Supervised fine-tuning: a pretrained model learns to answer, with the loss on the answers only."""

    output_dir: str = option("runs/sft", "Run directory; re-running on it resumes.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed for data order, the held-out split and adapter initialisation.", ge=0, le=SEED_MAX)
    kernels: Kernels = _kernels_option()
    model: ModelConfig = option(default_factory=lambda: ModelConfig(preset=None))
    data: ChatDataConfig = option(default_factory=ChatDataConfig)
    train: TrainConfig = option(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=10, max_steps=200))
    lora: LoraConfig = option(default_factory=LoraConfig)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    sample_prompts: int = option(4, "Held-out prompts answered by greedy generation at every evaluation "
                                 "(written to samples.jsonl).", ge=0, le=10_000)
    sample_max_new_tokens: int = option(64, "Longest generated sample answer.", ge=1, le=TOKENS_MAX)


@dataclass
class PreferenceDataConfig:
    train: str = option("synthetic", "Preference records (pairs or rankings; see llmstack.data.preference) in "
                        "JSONL/JSON/Parquet files, a directory or a `datasets` name.")
    eval: str | None = option(None, "Held-out preferences; default: a slice of data.train (data.eval_fraction).")
    eval_fraction: float = option(0.1, "Share of rankings held out when data.eval is not set.", ge=0.0, le=0.5)
    format: Literal["auto", "hh", "oasst", "label_studio"] = option(
        "auto", "Record format: TRL's preference records and llmstack's rankings (README, Data formats), "
        "Anthropic HH dialogues, Open-Assistant trees, or a Label Studio JSON export (rankings or pairs).")
    max_length: int = option(512, "Tokens per prompt + response; longer ones keep their end.", ge=16, le=TOKENS_MAX)


@dataclass
class RewardConfig:
    """Reward modelling: a model learns to score the responses people preferred higher."""

    output_dir: str = option("runs/reward", "Run directory; re-running on it resumes.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed for the score head, data order and the held-out split.", ge=0, le=SEED_MAX)
    model: ModelConfig = option(default_factory=lambda: ModelConfig(preset=None))
    data: PreferenceDataConfig = option(default_factory=PreferenceDataConfig)
    train: TrainConfig = option(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=10, max_steps=200,
                                                                    batch_size=8))
    use_margins: bool = option(False, "Subtract each record's 'margin' inside the pairwise loss.")
    lora: LoraConfig = option(default_factory=LoraConfig, help="LoRA on the backbone; the score head trains "
                              "whole. Unmerged, model/ holds the adapters and the head in peft format.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    center_coef: float = option(0.0, "Weight of the reward-centering term mean(score^2).", ge=0.0)


@dataclass
class DPOSettings:
    beta: float = option(0.1, "Strength of the KL regularisation implied by DPO: the implicit reward is "
                         "beta x (log pi - log ref).", gt=0.0)
    loss: Literal["sigmoid", "ipo"] = option("sigmoid", "DPO's logistic loss (Rafailov et al. 2023) or IPO's "
                                             "squared one (Azar et al. 2023).")
    label_smoothing: float = option(0.0, "Conservative DPO: the share of preferences assumed flipped "
                                    "(Mitchell 2023); sigmoid loss only.", ge=0.0, lt=0.5)
    rankings: Literal["pairs", "plackett_luce"] = option(
        "pairs", "A K-way ranking as all its implied pairs, the ranking weighed once, or as one Plackett-Luce "
        "likelihood of the whole order.")
    kl_prompts: int = option(16, "Held-out prompts answered by the policy at every evaluation to measure the "
                             "KL to the reference (keeps the reference model loaded; 0 turns it off).", ge=0, le=10_000)
    kl_max_new_tokens: int = option(32, "Longest answer sampled for the KL measurement.", ge=1, le=TOKENS_MAX)


@dataclass
class DPOConfig:
    """DPO: the SFT model learns the people's preferences directly, with no reward model, regularised towards
    itself (the reference)."""

    output_dir: str = option("runs/dpo", "Run directory; re-running on it resumes.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed for data order, the held-out split and adapter initialisation.", ge=0, le=SEED_MAX)
    kernels: Kernels = _kernels_option()
    model: ModelConfig = option(default_factory=lambda: ModelConfig(preset=None),
                                help="The SFT policy; also the frozen reference.")
    data: PreferenceDataConfig = option(default_factory=PreferenceDataConfig)
    train: TrainConfig = option(default_factory=lambda: TrainConfig(lr=5e-7, warmup_steps=10, max_steps=200,
                                                                    batch_size=8, weight_decay=0.0))
    lora: LoraConfig = option(default_factory=LoraConfig, help="LoRA on the policy; the reference is then the "
                              "policy with its adapter disabled (no second copy).")
    dpo: DPOSettings = option(default_factory=DPOSettings)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")


@dataclass
class PromptDataConfig:
    train: str = option("synthetic", "Prompts: {'prompt'} (text or messages) or {'messages'} records in "
                        "JSONL/JSON/Parquet files, a `datasets` name, or 'synthetic[:N]' (built-in questions "
                        "with a gold reward).")
    prompt_field: str = option("prompt", "Field holding the prompt.")
    messages_field: str = option("messages", "Field holding a conversation to continue.")
    max_prompt_length: int = option(256, "Prompts longer than this (in tokens) keep their last tokens.",
                                    ge=8, le=TOKENS_MAX)
    ptx: str | None = option(None, "Pretraining text mixed into the policy updates when ppo.ptx_coef > 0, in "
                             "the forms pretraining takes.")


@dataclass
class ModelRef:
    name_or_path: str | None = option(None, "Hub name or local directory.")


@dataclass
class RolloutConfig:
    """How an RL step samples its responses; shared by the RL algorithms."""

    engine: Literal["auto", "hf", "static", "vllm"] = option(
        "auto", "Generation engine (llmstack.models.engines): 'hf' is Hugging Face generate (the reference); "
        "'static' a static KV cache and a plain decoding loop, the same tokens as 'hf', faster (compiled with "
        "CUDA graphs on CUDA); both read the policy's weights directly. 'auto' is 'static' on CUDA where the "
        "model's architecture supports a static cache, else 'hf' (CPU included: no measured win there). 'vllm' (CUDA, extra llmstack[vllm]) runs vLLM beside "
        "training with the weights pushed in before each rollout.")
    batch_size: int = option(16, "Prompts per process per RL step (one rollout).", ge=1, le=BATCH_MAX)
    max_new_tokens: int = option(32, "Longest response.", ge=1, le=TOKENS_MAX)
    temperature: float = option(1.0, "Sampling temperature, also used when log-probabilities are recomputed.",
                                gt=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass.", gt=0.0, le=1.0)
    samples_per_prompt: int = option(1, "Answers sampled per prompt (a group, G): group-relative estimators "
                                     "(grpo, rloo) compare a prompt's answers with each other; each answer is "
                                     "sampled from its own seed.", ge=1, le=1024)


@dataclass
class PPOSettings:
    # keys that moved to another section, relative to this section's parent: answered with the new name
    MOVED: ClassVar[dict[str, str]] = {"rollout_batch": "rollout.batch_size",
                                       "max_new_tokens": "rollout.max_new_tokens",
                                       "temperature": "rollout.temperature", "top_p": "rollout.top_p"}

    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = option(
        "gae", "Advantage estimator (llmstack.rl.estimators): 'gae' with a value model (PPO), 'grpo' (group mean, "
        "divided by the group's std unless ppo.scale_by_std=false), 'rloo' (leave-one-out baseline), "
        "'reinforce_pp' (REINFORCE++: global normalisation, KL in the reward). grpo and rloo need "
        "rollout.samples_per_prompt >= 2 and train no value model.")
    scale_by_std: bool = option(True, "grpo: divide each group's advantages by its standard deviation (false: "
                                "Dr. GRPO, Liu et al. 2025).")
    loss_aggregation: Literal["token_mean", "sequence_mean", "token_sum_constant"] = option(
        "token_mean", "How the policy's per-token losses become one (llmstack.rl.aggregation): the global token "
        "mean, each response's mean then the batch mean (original GRPO), or the token sum over sequences x "
        "rollout.max_new_tokens (Dr. GRPO).")
    epochs: int = option(2, "Passes over each rollout.", ge=1, le=10_000)
    clip: float = option(0.2, "Policy ratio clip epsilon.", gt=0.0, le=1.0)
    value_clip: float = option(0.2, "Value clip around the rollout's values.", gt=0.0)
    value_lr: float = option(1e-4, "Learning rate of the value model.", gt=0.0)
    gamma: float = option(1.0, "Discount over response tokens.", ge=0.0, le=1.0)
    lam: float = option(0.95, "GAE lambda.", ge=0.0, le=1.0)
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "Per-token KL estimator (see llmstack.rl.kl).")
    kl_in: Literal["reward", "loss"] = option("reward", "Where the KL penalty goes: into the per-token "
                                              "reward (InstructGPT) or as a loss term (GRPO-style).")
    kl_coef: float = option(0.05, "KL coefficient (the start value when ppo.kl_target is set).", ge=0.0)
    kl_target: float | None = option(6.0, "Target KL per sequence for the adaptive controller; null keeps "
                                     "ppo.kl_coef fixed.", gt=0.0)
    kl_horizon: int = option(10000, "Adaptive controller horizon in samples.", ge=1, le=COUNT_MAX)
    missing_eos_penalty: float | None = option(None, "Subtracted from the score of responses cut at "
                                               "rollout.max_new_tokens without EOS.", ge=0.0)
    normalize_rewards: bool = option(True, "Scale scores with the reward model's stored reward_mean/std.")
    reward_clip: float | None = option(None, "Clip (normalised) scores to [-c, c].", gt=0.0)
    whiten_advantages: bool = option(True, "Zero mean, unit variance advantages over the global batch.")
    ptx_coef: float = option(0.0, "PPO-ptx: weight of the next-token loss on data.ptx added to every policy "
                             "minibatch (Ouyang et al. 2022, eq. 2), against regressions on the pretraining "
                             "distribution.", ge=0.0)


@dataclass
class PPOConfig:
    """PPO with a KL penalty: the SFT policy learns to score higher under the reward model."""

    output_dir: str = option("runs/ppo", "Run directory; re-running on it resumes.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed for sampling, minibatch order and prompt order.", ge=0, le=SEED_MAX)
    kernels: Kernels = _kernels_option()
    model: ModelConfig = option(default_factory=lambda: ModelConfig(preset=None),
                                help="The SFT policy; also the frozen reference.")
    reward_model: ModelRef = option(default_factory=ModelRef, help="The reward stage's model/.")
    value_model: ModelRef = option(default_factory=ModelRef, help="Initial value model; default: the reward "
                                   "model.")
    lora: LoraConfig = option(default_factory=LoraConfig, help="LoRA on the policy; the reference is then the "
                              "policy with its adapter disabled (no second copy).")
    value_lora: LoraConfig = option(default_factory=LoraConfig, help="LoRA on the value model's backbone; its "
                                    "value head trains whole. value_model/ is saved merged unless "
                                    "value_lora.merge=false.")
    data: PromptDataConfig = option(default_factory=PromptDataConfig)
    train: TrainConfig = option(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=0, max_steps=100,
                                                                    batch_size=8, schedule="constant",
                                                                    log_every=1, eval_every=0))
    rollout: RolloutConfig = option(default_factory=RolloutConfig)
    ppo: PPOSettings = option(default_factory=PPOSettings)
    samples_per_step: int = option(4, "Rows appended to samples.jsonl at every logging step.", ge=0, le=10_000)
    gradient_checkpointing: bool = option(False, "Recompute the policy's and the value model's activations in "
                                          "the backward pass to save memory.")
    metrics: list[str] = option(default_factory=list, help="Functions logged at every step, each named "
                                "'package.module:function' and called as f(prompts, completions) -> one number "
                                "per response (e.g. llmstack.evaluation.builtin_task:gold_reward).")
    reward_funcs: list[str] = option(default_factory=list, help="Reward functions beside (or instead of) the "
                                     "reward model: built-in names (numeric_match, answer_format, length_penalty) "
                                     "or 'package.module:function', called as f(prompts, completions, **columns) "
                                     "-> one number per completion (llmstack.rl.reward_functions).")
    reward_weights: list[float] = option(default_factory=list, help="Weight of each reward source in the sum: "
                                         "the reward model first (when set), then reward_funcs in order; empty: "
                                         "all 1.")

    def validate(self, prefix: str) -> None:
        problems = []
        if not (self.reward_model.name_or_path or self.reward_funcs):
            problems.append("no reward: set 'reward_model.name_or_path' (the reward stage's model/ directory) "
                            "and/or 'reward_funcs' (Python reward functions)")
        if self.ppo.estimator == "gae" and not (self.value_model.name_or_path or self.reward_model.name_or_path):
            problems.append("config key 'ppo.estimator': gae trains a value model; set 'value_model.name_or_path' "
                            "(a reward model or the policy to start it from), or choose a critic-free estimator "
                            "(grpo, rloo, reinforce_pp)")
        if self.ppo.estimator == "grpo" and self.ppo.kl_in != "loss":
            problems.append("config key 'ppo.kl_in': the grpo estimator keeps the KL penalty out of the reward; "
                            "set ppo.kl_in=loss")
        if self.ppo.ptx_coef > 0 and not self.data.ptx:
            problems.append("config key 'ppo.ptx_coef' > 0 needs 'data.ptx': the pretraining text to mix in")
        if self.train.grad_accum != 1:
            problems.append("config key 'train.grad_accum': PPO takes minibatches of train.batch_size from each "
                            "rollout; set rollout.batch_size for more samples and keep grad_accum 1")
        if problems:
            raise ConfigError.of(problems)


@dataclass
class GRPOConfig(PPOConfig):
    """GRPO: the policy learns from groups of answers to the same prompt, each compared with its group's
    mean; no value model. The same RL loop as PPO with GRPO's defaults (llmstack.rl.estimators)."""

    rollout: RolloutConfig = option(default_factory=lambda: RolloutConfig(samples_per_prompt=4))
    ppo: PPOSettings = option(default_factory=lambda: PPOSettings(estimator="grpo", kl_in="loss", kl_estimator="k3",
                                                                  kl_coef=0.04, kl_target=None, epochs=1))


def _from_previous(cls):
    """A stage's defaults, starting from the previous pipeline stage's model (and, for RL, reward model)."""
    def build():
        changes = {"model": ModelConfig(name_or_path=PREVIOUS, preset=None)}
        if issubclass(cls, PPOConfig):
            changes["reward_model"] = ModelRef(PREVIOUS)
        return cls(**changes)
    return build


ROUTES = ("ppo", "ppo-no-kl", "grpo", "grpo-gold", "dpo")


@dataclass
class PipelineConfig:
    """The whole path in one command: curate -> pretrain -> SFT -> reward model -> PPO, each stage starting
    from the previous stage's model or data ('previous'), each in its own run directory, with a REPORT.md of
    the evidence. configs/tiny/pipeline.yaml is the built-in tiny run (the main job, `make run`)."""

    output_dir: str = option("runs/pipeline", "Pipeline directory; each stage runs in a folder inside it.")
    overwrite_output_dir: bool = overwrite_option()
    seed: int = option(0, "Seed given to every stage.", ge=0, le=SEED_MAX)
    start: Literal["curate", "sft"] = option(
        "curate", "Where the path begins: 'curate' (raw text, then a model pretrained from scratch) or 'sft' (a "
        "pretrained checkpoint named by sft.model.name_or_path, e.g. a Hub model; curation and pretraining are "
        "skipped and the report's 'before' is that checkpoint).")
    curate: CurateConfig = option(default_factory=CurateConfig)
    pretrain: PretrainConfig = option(default_factory=lambda: PretrainConfig(data=DataConfig(train=PREVIOUS)))
    sft: SFTConfig = option(default_factory=_from_previous(SFTConfig))
    reward: RewardConfig = option(default_factory=_from_previous(RewardConfig))
    ppo: PPOConfig = option(default_factory=_from_previous(PPOConfig))
    grpo: GRPOConfig = option(default_factory=_from_previous(GRPOConfig))
    dpo: DPOConfig = option(default_factory=_from_previous(DPOConfig))
    routes: list[Literal["ppo", "ppo-no-kl", "grpo", "grpo-gold", "dpo"]] = option(
        default_factory=lambda: list(ROUTES), help="Alignment routes run after SFT, each from the SFT model: "
        "'ppo' and 'grpo' on the reward model, 'ppo-no-kl' (PPO with the KL penalty off, to show "
        "over-optimisation), 'grpo-gold' (GRPO on the gold reward function itself), 'dpo' (on the preference "
        "data directly).")
    gold_reward: str = option("llmstack.evaluation.builtin_task:gold_reward", "The task's gold reward function "
                              "('package.module:function'): the grpo-gold route's reward and the report's measure.")

    def validate(self, prefix: str) -> None:
        if len(set(self.routes)) != len(self.routes):
            raise ConfigError(f"config key 'routes': {self.routes} names a route twice")
        if self.start == "sft" and self.sft.model.name_or_path in (PREVIOUS, None):
            raise ConfigError("config key 'start': with start=sft no stage runs before SFT; set "
                              "sft.model.name_or_path to the pretrained checkpoint to fine-tune (a Hub name or a "
                              "local directory)")
