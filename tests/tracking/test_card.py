"""The model card and `llmstack report` on records: lineage as a graph, the people behind the data, curation,
the KL budget, the chain's time and energy, and no absolute path anywhere."""

import json
import re
from pathlib import Path

import pytest
import yaml

from llmstack.cli import main
from llmstack.data import synthetic
from llmstack.data.agreement import annotator_statistics
from llmstack.data.preference import to_group
from llmstack.tracking.card import write_model_card
from llmstack.tracking.lineage import format_lineage, format_report, lineage
from llmstack.tracking.record import RunRecord, find_parent

ABSOLUTE = re.compile(r"(^|[\s`(\[:=,'\"])/[\w.~-]")


def table_widths(markdown: str) -> list[set[int]]:
    """Number of cells per row, one set per table: a well-formed table has one width."""
    tables, current = [], None
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current = (current or set()) | {line.count("|")}
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def _finish(run_dir: Path, stage: str, parents: dict, wall: float, joules: float, method: str, **sections):
    """A finished run's record with a known wall time and energy, and its model/ directory."""
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_dir, stage, sections.pop("config", {}), sections.pop("inputs", {}),
                       next(iter(parents.values()), None))
    record.update(parents=parents, **sections)
    record.add_energy({"method": method, "joules": joules, "source": "RAPL" if method == "measured" else "CPU model"})
    record.finish("finished")
    data = RunRecord.load(run_dir)
    data["sessions"][0]["wall_time_s"] = data["wall_time_s"] = wall  # a known duration for the totals
    (run_dir / "record.json").write_text(json.dumps(data))
    return data


@pytest.fixture
def chain(tmp_path):
    """curate -> pretrain -> sft -> reward (on simulated annotators' rankings) -> ppo, as records only."""
    root = tmp_path / "pipeline"
    curate = root / "curate"
    (curate / "data").mkdir(parents=True)
    (curate / "data" / "part-0.jsonl").write_text("{}\n")
    _finish(curate, "curate", {}, 10.0, 100.0, "estimated",
            inputs={"train": {"spec": "synthetic-noisy:300", "generator": "llmstack.data.synthetic"}},
            data={"documents_in": 300, "documents_out": 240, "removed_by_rule": {"c4": 40, "exact_dedup": 20}})
    data_link = find_parent(str(curate / "data"))
    _finish(root / "pretrain", "pretrain", {"data": data_link}, 100.0, 1000.0, "measured",
            inputs={"train": {"spec": str(curate / "data"), "files": [
                {"path": str(curate / "data" / "part-0.jsonl"), "bytes": 3, "sha256": "cd" * 32}]}},
            config={"model": {"preset": "llama-1m"}, "data": {"train": str(curate / "data")}})
    _finish(root / "sft", "sft", {"model": find_parent(str(root / "pretrain" / "model"))}, 50.0, 500.0, "estimated",
            inputs={"train": {"spec": "synthetic:100", "generator": "llmstack.data.synthetic"}},
            config={"model": {"name_or_path": str(root / "pretrain" / "model")}})
    groups = [to_group(r, "prefs") for r in synthetic.preferences(40, seed=1)]
    stats = annotator_statistics(groups)
    _finish(root / "reward", "reward", {"backbone": find_parent(str(root / "sft" / "model"))}, 30.0, 300.0,
            "estimated", inputs={"train": {"spec": "synthetic:40", "generator": "llmstack.data.synthetic"}},
            annotators=stats, config={"model": {"name_or_path": str(root / "sft" / "model")}})
    sft_link, rm_link = find_parent(str(root / "sft" / "model")), find_parent(str(root / "reward" / "model"))
    _finish(root / "ppo", "ppo", {"model": sft_link, "reward_model": rm_link}, 70.0, 700.0, "estimated",
            inputs={"prompts": {"spec": "synthetic:32"}, "reward_model": rm_link},
            config={"model": {"name_or_path": str(root / "sft" / "model")},
                    "reward_model": {"name_or_path": str(root / "reward" / "model")},
                    "ppo": {"kl_target": 2.0, "kl_coef": 0.1}},
            metrics={"steps": 4, "final_kl": 1.5, "final_kl_coef": 0.08, "final_reward": 0.4},
            reward_sources=[{"name": "reward_model", "weight": 1.0}])
    for stage in ("curate", "pretrain", "sft", "reward", "ppo"):
        write_model_card(root / stage, RunRecord.load(root / stage))
    return root, stats


def test_the_policy_card_names_its_reward_model_annotators_curation_and_the_chain_cost(chain):
    root, stats = chain
    card = (root / "ppo" / "MODEL_CARD.md").read_text()
    tree = card.split("```text\n")[1].split("```")[0]
    # the whole graph: the SFT model is reached twice (the policy's start, the reward model's backbone)
    assert tree.splitlines()[0].startswith("ppo run `ppo` [finished]")
    assert "├─ model: sft run `sft`" in tree and "reward_model: reward run `reward`" in tree
    assert "backbone: sft run `sft` [finished]" in tree and "(drawn above)" in tree
    assert "data: curate run `curate`" in tree and "train: synthetic-noisy:300" in tree
    judged = card.split("## Optimised against")[1].split("\n## ")[0]
    assert "80 rankings of 40 ranked prompts (200 responses) by 3 annotators" in judged
    for who, n in stats["annotators"].items():
        assert f"{who} {n / stats['rankings']:.0%}" in judged
        assert f"{who} {stats['agreement_with_majority'][who]:.0%}" in judged
    assert f"Krippendorff's alpha {stats['krippendorff_alpha']:.3f}" in judged
    assert "simulated" in judged and "1.5 nats" in judged and "(75% of it)" in judged
    assert "removed per rule (the first rule, in order, that removed each): c4 40, exact_dedup 20" in card
    # 10 + 100 + 50 + 30 + 70 s, and 100 + 1000 + 500 + 300 + 700 J, of which 1000 J measured (pretrain)
    assert "The whole chain (5 runs" in card and "wall time 4 min 20 s" in card
    assert "energy 0.722 Wh (measured 0.278 Wh, estimated 0.444 Wh" in card  # 2600, 1000, 1600 J / 3600
    assert all(len(widths) == 1 for widths in table_widths(card))


def test_the_reward_model_card_has_a_human_judgements_section(chain):
    root, stats = chain
    card = (root / "reward" / "MODEL_CARD.md").read_text()
    section = card.split("## Human judgements")[1].split("\n## ")[0]
    records = synthetic.preferences(40, seed=1)
    ties = sum(any(isinstance(tier, list) for tier in r["ranking"]) for r in records)
    prompts = len({json.dumps(r["prompt"]) for r in records})
    assert (f"80 rankings of 40 ranked prompts, each shown with its own answers (200 responses in all, {prompts} "
            f"distinct prompt texts); {ties} rankings hold a tie") in section
    n = sum(stats["annotators"].values())
    assert n == stats["rankings"] == 80  # two judges per prompt
    for who, count in stats["annotators"].items():
        assert f"| {who} | {count} | {count / n:.1%} | {stats['agreement_with_majority'][who]:.1%} |" in section
    assert f"{stats['krippendorff_alpha']:.3f}" in section and "Pairwise agreement" in section


def test_no_absolute_path_in_any_card_or_report(chain, tmp_path, capsys):
    root, _ = chain
    outputs = {f"{stage}/MODEL_CARD.md": (root / stage / "MODEL_CARD.md").read_text()
               for stage in ("curate", "pretrain", "sft", "reward", "ppo")}
    outputs["report"] = format_report(root / "ppo")
    outputs["lineage"] = format_lineage(lineage(root / "ppo"))
    with pytest.raises(SystemExit) as done:
        main(["report", str(root / "ppo")])
    assert done.value.code == 0
    outputs["llmstack report"] = printed = capsys.readouterr().out
    for name, text in outputs.items():
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, name
        assert not ABSOLUTE.search(text), f"{name}: {ABSOLUTE.search(text).group()!r}"
    assert "reward_model: reward run `reward`" in printed and "5 runs" in printed
    # the links still resolve after the pipeline directory moves
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert [r["stage"] for r in lineage(moved / "ppo")] == ["ppo", "sft", "pretrain", "curate"]
    assert [r["stage"] for r in lineage(moved / "reward")] == ["reward", "sft", "pretrain", "curate"]


def test_model_card_states_data_metrics_setup_and_lineage(tmp_path):
    pretrain = tmp_path / "pretrain"
    (pretrain / "model").mkdir(parents=True)
    RunRecord(pretrain, "pretrain", {}, {"train": {"spec": "corpus.txt"}}, None).finish("finished")
    sft = tmp_path / "sft"
    (sft / "model").mkdir(parents=True)
    RunRecord(sft, "sft", {}, {"train": {"spec": "chats.jsonl"}}, find_parent(str(pretrain / "model"))).finish("finished")

    digest = "ab" * 32
    child = RunRecord(tmp_path / "reward", "reward", {"seed": 3, "train": {"lr": 1e-5, "max_steps": 9}},
                      {"train": {"spec": "prefs.jsonl", "files": [{"path": "prefs.jsonl", "bytes": 2048,
                                                                   "sha256": digest}]},
                       "eval": {"spec": "Anthropic/hh-rlhf", "revision": "abc123"}},
                      find_parent(str(sft / "model")))
    child.update(metrics={"steps": 9, "train_loss": 0.61234, "initial_eval_loss": 0.6931, "final_eval_loss": 0.5012,
                          "tokens_seen": 123456},
                 model={"class": "Qwen2ForSequenceClassification", "parameters": 2_000_000},
                 data={"dropped_pairs": 4})
    child.add_energy({"method": "measured", "cpu_joules": 5.4e6, "gpu_joules": 1.8e6, "joules": 7.2e6,
                      "source": "RAPL + NVML", "note": "whole devices"})
    child.set_compute(2, device="cpu")
    child.finish("finished")
    write_model_card(tmp_path / "reward", RunRecord.load(tmp_path / "reward"))
    card = (tmp_path / "reward" / "MODEL_CARD.md").read_text()

    assert "| eval_loss | 0.6931 | 0.5012 |" in card and "| train_loss | 0.6123 |" in card
    assert f"`{digest}`" in card and "2,048 bytes" in card and "revision=abc123" in card
    assert "| `train.lr` | 1e-05 |" in card and "| `seed` | 3 |" in card
    assert "2.00M parameters" in card and "123,456 training tokens" in card and "2 process(es) on `cpu`" in card
    tree = card.split("## Lineage")[1].split("##")[0]
    assert tree.index("reward run") < tree.index("model: sft run `sft`") < tree.index("model: pretrain run")
    assert "corpus.txt" in tree and "chats.jsonl" in tree
    assert "Energy: 2 kWh, measured (RAPL + NVML; whole devices)." in card
    assert "not been evaluated for safety" in card
    assert all(len(widths) == 1 for widths in table_widths(card))


def test_model_card_of_a_fresh_run_with_no_metrics(tmp_path):
    record = RunRecord(tmp_path, "pretrain", {}, {}, None)
    record.update(data={"tokenizer": {"source": "trained", "vocab_size": 384}}, energy={"unmeasured": "no counters"})
    record.finish("finished")
    write_model_card(tmp_path, RunRecord.load(tmp_path))
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "freshly initialised weights" in card and "No metrics were recorded." in card
    assert "Energy was not measured: no counters." in card
    assert "No inputs were recorded." in card and "- tokenizer\n  - source: trained\n  - vocab_size: 384\n" in card


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body.lstrip("\n")


def test_the_model_directory_holds_the_card_under_a_hub_header(chain):
    root, _ = chain
    meta, body = _front_matter((root / "ppo" / "model" / "README.md").read_text())
    assert body == (root / "ppo" / "MODEL_CARD.md").read_text()
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["llmstack", "ppo", "rlhf"]
    # nothing in this lineage came from the Hub, and no license was recorded: neither is claimed
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert _front_matter((root / "reward" / "model" / "README.md").read_text())[0]["pipeline_tag"] == \
        "text-classification"


def test_hub_metadata_names_a_hub_base_model_and_hub_datasets(tmp_path):
    run = tmp_path / "sft"
    (run / "model").mkdir(parents=True)
    record = RunRecord(run, "sft", {}, {"train": {"spec": "HuggingFaceH4/ultrachat_200k@train_sft",
                                                  "dataset": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}},
                       find_parent("HuggingFaceTB/SmolLM2-135M"))
    record.update(license="apache-2.0")
    record.finish("finished")
    write_model_card(run, RunRecord.load(run))
    meta, _ = _front_matter((run / "model" / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["llmstack", "sft"]
    # weights from a local directory outside llmstack are no Hub repository: no base_model is claimed
    (tmp_path / "downloaded" / "weights").mkdir(parents=True)
    local = RunRecord(tmp_path / "local", "sft", {}, {}, find_parent(str(tmp_path / "downloaded" / "weights")))
    local.finish("finished")
    (tmp_path / "local" / "model").mkdir()
    write_model_card(tmp_path / "local", RunRecord.load(tmp_path / "local"))
    assert "base_model" not in _front_matter((tmp_path / "local" / "model" / "README.md").read_text())[0]
