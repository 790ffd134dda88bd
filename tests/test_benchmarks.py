"""The benchmark harness on a minimal size: both contenders run in their own processes from the same start,
and the results table is written. The SFT and reward contenders run in this process on a tiny model and
data made here: llmstack and TRL must start from the same weights and see the same batches, so their losses
agree step by step."""

import argparse
import gzip
import json

import pytest

from benchmarks import common, precision_contenders, reward_contenders, run, sft_contenders
from benchmarks.run import main
from llmstack.data import chat, text
from llmstack.losses import IGNORE_INDEX


@pytest.mark.slow
def test_pretrain_comparison_starts_both_contenders_from_the_same_weights(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"The fox number {i} sees the owl near the river." for i in range(400)))
    main(["pretrain", "--data", str(corpus), "--preset", "llama-1m", "--vocab", "300", "--seq", "32", "--batch",
          "2", "--steps", "3", "--warmup", "1", "--repeats", "1", "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "results")])
    table = (tmp_path / "results" / "pretrain.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| llmstack") or line.startswith("| hf-trainer")}
    assert set(rows) == {"llmstack", "hf-trainer"}
    # same initial weights and the same first batch: the first step's loss agrees across the two processes
    # (to the 4 decimals printed; the next batches of this corpus start 0.1 higher)
    assert rows["llmstack"][4] == rows["hf-trainer"][4]
    assert all(float(r[5]) > 0 for r in rows.values())
    assert all(0 < float(r[2].rstrip("%")) < 100 for r in rows.values())  # MFU


SEQ, BATCH, STEPS = 64, 4, 3


def _settings(data, seq=SEQ):
    return argparse.Namespace(data=str(data), model="fresh", preset="llama-1m", vocab=400, tokenizer_text=None,
                              seq=seq)


def _train_all(module, work, facts, names):
    steps, scores = {}, {}
    for name in names:
        out = work / name
        steps[name] = module.CONTENDERS[name](str(work / "init"), facts["data"], str(out), SEQ, BATCH, STEPS)
        scores[name] = module.quality(str(work / "init"), facts["data"], str(out / "model"), SEQ)
    return steps, scores


def test_sft_contenders_train_identically_on_the_same_batches(tmp_path):
    conversations = [[{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                      {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}." + " Sure." * (i % 5)}]
                     for i in range(60)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    facts = sft_contenders.prepare(_settings(data), tmp_path)
    steps, scores = _train_all(sft_contenders, tmp_path, facts, list(sft_contenders.CONTENDERS))

    ours, trl = steps["llmstack"], steps["trl"]
    # same weights, batches, masks and learning rates: every step's loss agrees, and so does the model reached
    assert ours.losses == pytest.approx(trl.losses, abs=1e-4)
    assert scores["llmstack"]["held_out_loss"] == pytest.approx(scores["trl"]["held_out_loss"], abs=1e-4)
    # the same real tokens per step, and both run each batch padded to its longest conversation only
    assert ours.tokens == trl.tokens
    assert ours.positions == trl.positions
    assert all(t < p < BATCH * SEQ for t, p in zip(trl.tokens, trl.positions))
    # packed, each packs its own way: both train, and TRL's padding-free rows hold no padding
    assert steps["trl-packed"].positions == steps["trl-packed"].tokens
    for name in ("llmstack-packed", "trl-packed"):
        assert steps[name].losses[-1] < steps[name].losses[0]
        assert scores[name]["held_out_loss"] < ours.losses[0]


def test_sft_template_marks_the_answers_for_trl_without_changing_llmstack_text():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"},
                    {"role": "assistant", "content": "Still here."}]
    tokenizer = text.train_tokenizer([m["content"] for m in conversation] * 20, 300)
    tokenizer.chat_template = chat.DEFAULT_CHAT_TEMPLATE
    plain = tokenizer.apply_chat_template(conversation, tokenize=False)
    tokenizer.chat_template = sft_contenders.CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == plain
    # TRL's assistant mask (what `assistant_only_loss` trains on) is exactly llmstack's answer labels
    marked = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = chat.tokenize_conversation(tokenizer, conversation)
    assert marked["input_ids"] == ids
    assert [t if m else IGNORE_INDEX for t, m in zip(ids, marked["assistant_masks"])] == labels


def test_oasst_trees_become_human_paths_cut_back_to_their_last_answer(tmp_path):
    def message(role, content, *replies, synthetic=False):
        return {"role": role, "text": content, "synthetic": synthetic, "replies": list(replies)}

    tree = message("prompter", "Q", message("assistant", "A1", message("prompter", "Q2")),
                   message("assistant", "A2", message("prompter", "Q3", message("assistant", "A3"))),
                   message("assistant", "bot", synthetic=True))
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps({"message_tree_id": "t", "prompt": tree}) + "\n")
    conversations, source = sft_contenders.read_conversations(str(path))
    assert source == sft_contenders.TREE_SOURCE
    assert [[m["content"] for m in c] for c in conversations] == [["Q", "A1"], ["Q", "A2", "Q3", "A3"]]
    assert conversations[0][0]["role"] == "user" and conversations[0][1]["role"] == "assistant"


def test_reward_contenders_train_identically_on_the_same_pairs(tmp_path):
    pairs = [{"chosen": f"\n\nHuman: What is {i} plus {i % 7}?\n\nAssistant: It is {i + i % 7}.",
              "rejected": f"\n\nHuman: What is {i} plus {i % 7}?\n\nAssistant: No idea" + "!" * (i % 4)}
             for i in range(60)]
    pairs.append({"chosen": "\n\nHuman: Say a lot.\n\nAssistant: " + "word " * 200,
                  "rejected": "\n\nHuman: Say a lot.\n\nAssistant: No."})
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as fh:
        fh.write("".join(json.dumps(p) + "\n" for p in pairs))
    facts = reward_contenders.prepare(_settings(data), tmp_path)
    # the pair over SEQ tokens is left out for both (TRL would drop it, llmstack would cut it)
    assert (facts["read"], facts["pairs"]) == (61, 60)
    steps, scores = _train_all(reward_contenders, tmp_path, facts, ["llmstack", "trl"])

    ours, trl = steps["llmstack"], steps["trl"]
    assert ours.losses == pytest.approx(trl.losses, abs=1e-4)
    # the same scored sequences; llmstack runs each pair's prompt once, TRL once per response
    assert ours.tokens == trl.tokens and ours.items == trl.items == [BATCH] * STEPS
    assert all(o < t for o, t in zip(ours.positions, trl.positions))
    assert scores["llmstack"] == pytest.approx(scores["trl"], abs=1e-4)


def test_a_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "test.jsonl.gz"
    with pytest.raises(SystemExit, match=str(missing)):
        main(["reward", "--data", str(missing), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_a_real_model_is_refused_where_the_comparison_has_none(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The fox sees the owl.")
    with pytest.raises(SystemExit, match="--model smollm2 is for reward only"):
        main(["pretrain", "--data", str(corpus), "--model", "smollm2", "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_each_comparison_writes_its_own_columns_and_the_pairwise_ratios(tmp_path):
    def result(speed, memory):
        return {"tokens_per_s": speed, "items_per_s": speed / 100, "peak_rss_mib": memory, "first_loss": 10.0,
                "tokens_per_step": 3000, "padding_share": 0.25, "positions_per_step": 4000, "held_out_loss": 9.0,
                "held_out_accuracy": 0.5,
                "load": 1.0, "mfu": speed / 10000}

    results = {"llmstack": [result(1300, 1000), result(1500, 1000)], "trl": [result(1000, 2000)] * 2,
               "llmstack-packed": [result(2000, 1000)], "trl-packed": [result(1000, 1000)]}
    args = argparse.Namespace(comparison="sft", preset="p", vocab=32000, seq=512, batch=8, steps=12, warmup=4,
                              repeats=2)
    facts = {"conversations": 547, "held_out": 27, "vocabulary": 17921, "source": "s", "lr": 1e-4, "also": "",
             "peak_gflops": 80.0, "threads": 2}
    table = run.write_table(args, run.COMPARISONS["sft"], results, facts, tmp_path / "sft.md", "command")
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| contender"))
    assert "| real tokens/s (median, min-max) | speed vs llmstack |" in header and "memory vs llmstack" in header
    assert lines[lines.index(header) + 2].startswith("| llmstack | 1,400 (1,300-1,500) | 1.00x | 14.0% |")
    assert "- llmstack / trl: speed 1.40x, peak memory 0.50x" in lines
    assert "- llmstack-packed / trl-packed: speed 2.00x, peak memory 1.00x" in lines
    assert "547 conversations" in table
    args.comparison = "pretrain"
    pretrain = run.write_table(args, run.COMPARISONS["pretrain"], {"llmstack": results["llmstack"]}, facts,
                               tmp_path / "pretrain.md", "command")
    assert ("| contender | tokens/s (median, min-max) | speed vs llmstack | MFU | peak RSS (MiB) | first loss | "
            "held-out loss | load (1-min average at the end) |") in pretrain.splitlines()
    assert "(80 GFLOP/s, 2 threads)" in pretrain


def _precision_result(speed, memory, held_out=None, losses=(10.0, 9.0, 8.0)):
    result = {"tokens_per_s": speed, "peak_rss_mib": memory, "first_loss": losses[0], "last_loss": losses[-1],
              "losses": list(losses), "load": 1.5}
    return result if held_out is None else {**result, "held_out_loss": held_out}


def test_precision_table_sets_each_row_against_its_own_stage_in_fp32(tmp_path):
    results = {"pretrain-fp32": [_precision_result(1000, 2000, 8.0), _precision_result(1200, 2000, 8.0)],
               "pretrain-bf16": [_precision_result(2090, 1800, 8.04)] * 2,
               "ppo-fp32": [_precision_result(500, 1900)], "ppo-bf16": [_precision_result(800, 1805)],
               "ppo-bf16-fp32weights": [_precision_result(790, 1900)]}
    args = argparse.Namespace(comparison="precision", preset="p", vocab=32000, seq=256, batch=8, steps=10,
                              warmup=3, repeats=2, precision=None)
    facts = {"vocabulary": 32000, "data_name": "gutenberg", "pairs": 400, "held_out_pairs": 40}
    table = run.write_table(args, run.COMPARISONS["precision"], results, facts, tmp_path / "precision.md", "cmd")
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| contender"))
    assert "| speed vs fp32 |" in header and "| held-out loss vs fp32 |" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if line.startswith("| pretrain") or line.startswith("| ppo")}
    # 2090 / median(1000, 1200) = 1.90; 8.04 / 8.0 - 1 = +0.50%; PPO has no held-out loss: empty cells
    assert rows["pretrain-bf16"][:2] == ["2,090 (2,090-2,090)", "1.90x"] and rows["pretrain-bf16"][-2] == "+0.50%"
    assert rows["pretrain-fp32"][1] == "1.00x" and rows["pretrain-fp32"][-2] == "+0.00%"
    assert rows["ppo-bf16"][1] == "1.60x" and rows["ppo-bf16"][-3:-1] == ["", ""]
    assert "- pretrain-bf16 / pretrain-fp32: speed 1.90x, peak memory 0.90x" in lines
    assert "- ppo-bf16 / ppo-bf16-fp32weights: speed 1.01x, peak memory 0.95x" in lines


def test_precision_plot_overlays_both_precisions_in_one_panel_per_stage(tmp_path, monkeypatch):
    from llmstack.evaluation import plots

    results = {"sft-fp32": [_precision_result(1, 1, losses=(3.0, 2.0))],
               "sft-bf16": [_precision_result(1, 1, losses=(3.0, 2.1)), _precision_result(1, 1, losses=(9.0, 9.0))],
               "ppo-bf16-fp32weights": [_precision_result(1, 1, losses=(0.5, 0.4))]}
    drawn = {}
    monkeypatch.setattr(plots, "plot_panels", lambda path, panels, title: drawn.update(panels=panels))
    precision_contenders.plot(results, tmp_path / "p.png")
    # the first repeat of each, stages in pipeline order, labelled by what follows the stage's name
    assert drawn["panels"] == [("sft training loss", {"fp32": ([1, 2], [3.0, 2.0]), "bf16": ([1, 2], [3.0, 2.1])}),
                               ("ppo training loss", {"bf16-fp32weights": ([1, 2], [0.5, 0.4])})]
    monkeypatch.undo()
    path = precision_contenders.plot(results, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_precision_flag_reaches_every_contender_and_keeps_the_fp32_table(tmp_path, monkeypatch):
    data = tmp_path / "hh.jsonl.gz"
    data.write_bytes(b"")
    commands = []

    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps({**_precision_result(100, 100, 0.7), "items_per_s": 1.0, "positions_per_step": 10,
                             "held_out_accuracy": 0.5})

    monkeypatch.setattr(run, "prepare", lambda comparison, args, work: {
        "data": "d", "read": 2, "pairs": 2, "held_out": 1, "backbone": "b", "lr": 1e-5})
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd) or Done())
    main(["reward", "--data", str(data), "--tokenizer-text", "", "--precision", "bf16", "--repeats", "1",
          "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "results")])
    assert [c[-1] for c in commands] == ["bf16", "bf16"] and [c[3] for c in commands] == ["llmstack", "trl"]
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["reward-bf16.md"]
    assert ", bf16, lr 1e-05" in (tmp_path / "results" / "reward-bf16.md").read_text()
    with pytest.raises(SystemExit, match="--precision is for the comparisons with other trainers"):
        main(["precision", "--data", str(data), "--precision", "bf16", "--work", str(tmp_path / "work")])
    # the peers' own switch: bf16 autocast in the Trainer and TRL as in llmstack
    from transformers import TrainingArguments
    assert common.trainer_arguments(TrainingArguments, str(tmp_path), 2, 3, 1e-4, 0, precision="bf16").bf16
    assert not common.trainer_arguments(TrainingArguments, str(tmp_path), 2, 3, 1e-4, 0).bf16


def test_peak_memory_is_a_high_water_mark_of_this_process():
    before = common.peak_rss_mib()
    block = bytearray(256 * 2**20)  # zero-filled: every page is touched, so all of it becomes resident
    del block
    # freed again, yet the mark keeps it (page size and the allocator's own pages blur it by well under 8 MiB)
    assert common.peak_rss_mib() >= before + 256 - 8
