"""The `precision` comparison: every llmstack stage (pretrain, SFT, reward, DPO, PPO) in fp32 and in bf16 on the
same work; each contender, STAGE-PRECISION, runs alone in this process (see run.py) and prints one JSON line of
results. The contender's name sets its precision (the PRECISION argument is not used).

    python -m benchmarks.precision_contenders NAME INIT_DIR DATA_DIR OUT_DIR SEQ BATCH STEPS WARMUP PRECISION
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import common, contenders, dpo_contenders, reward_contenders, sft_contenders
from llmstack.data import sources, text
from llmstack.data.formats import chat_text
from llmstack.data.preference import import_hh, render
from llmstack.models.causal_lm import build_from_preset, save_model

# what the other stages read, in the folder that holds --data (the pretraining text)
OASST, HH = Path("oasst_en100") / "en_100_tree.jsonl", Path("hh_rlhf_harmless_base") / "test.jsonl.gz"
PRETRAIN_CHARS, PAIRS = 500_000, 200  # enough for every step and a held-out slice, small enough to load fast
PPO_PROMPT_TOKENS, PPO_NEW_TOKENS, PPO_LR, PPO_KL = 64, 32, 1e-5, 0.05
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")

DESCRIPTION = (
    "Work: preset {preset}, vocabulary {vocabulary:,} (one byte-level BPE trained on `{data_name}`, the "
    "conversations and the dialogues), the same initial weights for every stage (for reward, llmstack's score "
    "head on them; for PPO, the policy and reference are those weights and the reward and value models the "
    "reward stage's initial model). Per stage, the same data in the same order for fp32 and bf16: pretrain "
    "{batch} x {seq}-token blocks of the first " + f"{PRETRAIN_CHARS:,}" + " characters of `{data_name}`; sft "
    "{batch} OASST conversations of at most {seq} tokens per step, unpacked; reward and dpo {batch} Anthropic HH "
    "harmless-base pairs per step (the first {pairs} that fit {seq} tokens, {held_out_pairs} held out); PPO "
    "rollouts of {batch} HH prompts (at most " + str(PPO_PROMPT_TOKENS) + " tokens) with up to "
    + str(PPO_NEW_TOKENS) + " new tokens each, 1 epoch of 2 minibatches, lr " + f"{PPO_LR:g}" + ", KL "
    + f"{PPO_KL:g}" + ". {steps} steps each; rates are medians over the steps after the first {warmup}; "
    "{repeats} repeats, interleaved, every contender in its own process. fp32: `train.precision=fp32`. bf16: "
    "`train.precision=bf16` (autocast over fp32 master weights) with `model.dtype=auto`, so PPO's frozen reward "
    "model loads in bf16 (its reference shares the policy's fp32 weights); `ppo-bf16-fp32weights` is the same "
    "run with `model.dtype=fp32`, every model in fp32, which isolates what the bf16 frozen model saves. Tokens: "
    "pretrain every position; sft the real (non-padding) tokens; reward and dpo the tokens of every (prompt + "
    "response); PPO llmstack's own count of the rollout's tokens over the whole step (generation, scoring, "
    "update). Peak memory: the process's resident-set high-water mark. Held-out loss: each stage's own measure "
    "of the saved model in fp32 (next-token loss, answer-token loss, Bradley-Terry loss, DPO loss against the "
    "starting model), the same function for both precisions; PPO has none. `vs fp32`: against the same stage's "
    "fp32 row."
)

NOTES = """Notes:
- Where bf16 loses (torch.profiler over the whole pretraining stage call, 2 steps of 4 x 256 tokens, llama-25m,
  2026-12-02, at a 1-minute load of about 10 on 2 cores, before the fix below): self CPU time 95.9 s in fp32
  and 64.9 s in bf16, 1.48x.
  The matmuls (`aten::mm`) fall from 39.0 s to 14.1 s and the elementwise ops (`mul`, `mul_`, `add`, `add_`,
  `fill_`, `sum`, `neg`, `pow`: norms, rotary embeddings, SiLU, the loss's reductions) from 37.2 s to 20.5 s.
- What takes the gain back is `aten::copy_`: 3.7 s over 550 calls in fp32, 16.2 s over 1,196 in bf16, the
  dtype conversions autocast makes around fp32 master weights (each weight cast to bf16 at every use, results
  cast back for the ops autocast keeps in fp32). The fused AdamW step runs in fp32 on the master weights in
  both (4.0 s and 5.5 s).
- Against the target (bf16 >= 1.8x fp32 in every stage, held-out loss within 1%), on an idle machine (load
  1.4-1.7, 2026-12-02): the losses hold (every stage within 0.01%); pretraining (1.98x) and reward (1.80x)
  reach the speed, SFT (1.67x), DPO (1.43x) and PPO (1.26x) do not. An earlier run the same day read
  pretraining 1.43x and SFT 1.47x: the fused loss's LM head, applied outside the model's forward, ran in fp32
  in bf16 training (fixed: the step now runs the whole loss under the run's autocast). DPO and PPO keep their
  log-probability heads in fp32 on purpose (`llmstack/models/forward.py` says why: bf16 logits put an error
  the size of the KL signal into every summed log-probability), and PPO's step is also generation, whose
  products run in bf16 too but whose sampling and cache work do not shrink. What is left in the other stages
  is the profile above: autocast's casts of the fp32 master weights and the elementwise ops.
- Read the load column first: other work on the machine slows whichever contender it overlaps, so speed ratios
  are only as good as the loads they were taken at; the held-out losses do not depend on it."""


def _pairs(groups, tokenizer, seq: int) -> list:
    fitting = []
    for group in groups:
        if all(len(render(tokenizer, group.prompt, r)) <= seq for r in group.responses):
            fitting.append(group)
        if len(fitting) == PAIRS:
            break
    return fitting


def prepare(args, work: Path) -> dict:
    """One tokenizer and one initial model for every stage, the reward stage's initial model, and each stage's
    data under `work`/data."""
    from llmstack.models.reward_model import load_reward_model

    oasst, hh = (Path(args.data).resolve().parent / name for name in (OASST, HH))
    for needed in (oasst, hh):
        if not needed.exists():
            raise SystemExit(f"python -m benchmarks precision: data file not found: {needed} (it is read from "
                             "the folder that holds --data; see benchmarks/README.md)")
    conversations, _ = sft_contenders.read_conversations(str(oasst))
    groups = list(import_hh(str(hh)))
    texts = ([m["content"] for c in conversations for m in c]
             + [piece for g in groups for piece in [m["content"] for m in g.prompt] + g.responses])
    tokenizer = text.train_tokenizer(common.tokenizer_texts(texts, args.data), args.vocab)
    tokenizer.chat_template = sft_contenders.CHAT_TEMPLATE
    save_model(build_from_preset(args.preset, tokenizer, max(args.seq, PPO_PROMPT_TOKENS + PPO_NEW_TOKENS),
                                 seed=common.SEED), tokenizer, work / "init")
    data = work / "data"
    data.mkdir(exist_ok=True)
    corpus = "".join(sources.iter_documents(args.data))[:PRETRAIN_CHARS]
    (data / "pretrain.txt").write_text(corpus)
    common.write_split(conversations, sft_contenders.HELD_OUT_FRACTION, lambda c: {"messages": c}, data / "sft")
    pairs = _pairs(groups, tokenizer, args.seq)
    held_out = common.write_split(pairs, reward_contenders.HELD_OUT_FRACTION,
                                  lambda g: {"prompt": g.prompt, "chosen": g.responses[0],
                                             "rejected": g.responses[1]}, data / "reward")
    common.write_split(pairs, dpo_contenders.HELD_OUT_FRACTION,
                       lambda g: {"prompt": chat_text(tokenizer, g.prompt, prompt=True),
                                  "chosen": g.responses[0], "rejected": g.responses[1]}, data / "dpo")
    save_model(load_reward_model(str(work / "init"), tokenizer, common.SEED), tokenizer, data / "reward-init")
    prompts = [g.prompt[0]["content"] for g in groups
               if len(tokenizer(g.prompt[0]["content"])["input_ids"]) <= PPO_PROMPT_TOKENS]
    (data / "ppo").mkdir(exist_ok=True)
    (data / "ppo" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"data": str(data), "vocabulary": len(tokenizer), "data_name": Path(args.data).name,
            "pairs": len(pairs), "held_out_pairs": held_out}


def _ppo(init, data, out, seq, batch, steps, precision, weights) -> common.Steps:
    from llmstack.config import PPOConfig, load_config
    from llmstack.trainers.ppo import ppo

    reward = str(Path(data) / "reward-init")
    cfg = load_config(PPOConfig, None, [
        f"output_dir={out}", f"seed={common.SEED}", f"model.name_or_path={init}", f"model.dtype={weights}",
        f"reward_model.name_or_path={reward}", f"value_model.name_or_path={reward}",
        f"data.train={Path(data) / 'ppo' / 'prompts.jsonl'}", f"data.max_prompt_length={PPO_PROMPT_TOKENS}",
        f"train.max_steps={steps}", f"train.batch_size={batch // 2}", f"train.lr={PPO_LR}",
        f"train.precision={precision}", "train.log_every=1", f"train.save_every={steps}", "train.keep_last=1",
        f"rollout.batch_size={batch}", f"rollout.max_new_tokens={PPO_NEW_TOKENS}", "ppo.epochs=1",
        f"ppo.kl_coef={PPO_KL}", "ppo.kl_target=null", "samples_per_step=0"])
    ppo(cfg)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["time_generate"] + r["time_score"] + r["time_update"] for r in rows]
    return common.Steps(seconds=seconds, tokens=[round(r["tokens_per_s"] * s) for r, s in zip(rows, seconds)],
                        losses=[r["loss"] for r in rows])


def _stage_paths(stage: str, init: str, data: str) -> tuple[str, str]:
    """(initial model, data) of `stage` inside the prepared work."""
    if stage == "pretrain":
        return init, str(Path(data) / "pretrain.txt")
    if stage == "reward":
        return str(Path(data) / "reward-init"), str(Path(data) / "reward")
    return init, str(Path(data) / stage)


RUNS = {"pretrain": contenders.llmstack_run, "sft": sft_contenders.llmstack_run(False),
        "reward": reward_contenders.llmstack_run, "dpo": dpo_contenders.llmstack_run}
QUALITY = {"pretrain": contenders.quality, "sft": sft_contenders.quality, "reward": reward_contenders.quality,
           "dpo": dpo_contenders.quality}


def contender(stage: str, mode: str, weights: str = "auto"):
    """`stage` in precision `mode` with `model.dtype=weights` (PPO's only: the other stages' defaults are
    auto); the precision run.py passes is the same for every contender and not used."""

    def run(init, data, out, seq, batch, steps, precision=None) -> common.Steps:
        if stage == "ppo":
            return _ppo(init, data, out, seq, batch, steps, mode, weights)
        return RUNS[stage](*_stage_paths(stage, init, data), out, seq, batch, steps, precision=mode)

    return run


def quality(stage: str):
    def score(init: str, data: str, model_dir: str, seq: int) -> dict:
        return QUALITY[stage](*_stage_paths(stage, init, data), model_dir, seq) if stage in QUALITY else {}

    return score


CONTENDERS = {f"{stage}-{mode}": contender(stage, mode) for stage in STAGES for mode in ("fp32", "bf16")}
CONTENDERS["ppo-bf16-fp32weights"] = contender("ppo", "bf16", "fp32")


def plot(results: dict[str, list[dict]], path: Path) -> Path:
    """The training loss of every step, one panel per stage, each precision's first repeat overlaid."""
    from llmstack.evaluation.plots import plot_panels

    panels = []
    for stage in STAGES:
        curves = {name.split("-", 1)[1]: (list(range(1, len(runs[0]["losses"]) + 1)), runs[0]["losses"])
                  for name, runs in results.items() if name.split("-")[0] == stage}
        if curves:
            panels.append((f"{stage} training loss", curves))
    return plot_panels(path, panels, "training loss per step, fp32 and bf16 (first repeat)")


if __name__ == "__main__":
    common.main(sys.argv[1:], CONTENDERS, quality(sys.argv[1].split("-")[0]))
