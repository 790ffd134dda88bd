"""The Python API: objects in, the same run as the command line out.

The expectations are independent of the API's own code: a model object and the same weights saved to a
directory train to the same losses; the same records as a file, a list and a `datasets.Dataset` get one
fingerprint; the caller's model object is left as it was; the examples reload with plain transformers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmstack import ConfigError, SFTTrainer
from llmstack.config import objects
from llmstack.data import sources
from llmstack.data.text import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECORDS = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}."} for a in range(6) for b in range(6)]
SETTINGS = {"data": {"max_length": 48}, "train": {"batch_size": 4, "max_steps": 2, "log_every": 1,
                                                  "eval_every": 0, "save_every": 2}, "sample_prompts": 0}


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer((r["prompt"] + r["completion"] for r in RECORDS), vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=64))
    return model, tokenizer


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


def test_a_model_object_trains_as_the_same_weights_from_a_directory_and_is_left_as_it_was(tmp_path, tiny):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    from_object = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=RECORDS, config=SETTINGS,
                             output_dir=tmp_path / "object").train()
    from_dir = SFTTrainer(model=tmp_path / "saved", train_dataset=RECORDS, config=SETTINGS,
                          output_dir=tmp_path / "dir").train()
    assert losses(tmp_path / "object") == losses(tmp_path / "dir") and len(losses(tmp_path / "dir")) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not trained in place
    trained = from_object.model.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    assert from_object.status == from_dir.status == "finished"
    parent = json.loads((tmp_path / "object/record.json").read_text())["parent"]
    digest, params = objects.weights_sha256(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"))
    assert (parent["class"], parent["parameters"], parent["weights_sha256"]) == ("LlamaForCausalLM", params, digest)
    assert "run_dir" not in parent and "path" not in json.dumps(parent)  # no path it did not read


def test_the_same_records_get_one_fingerprint_as_a_file_a_list_or_a_dataset(tmp_path):
    import datasets

    path = tmp_path / "records.jsonl"
    # another key order and spacing than the canonical form: the fingerprint is of the records, not the bytes
    path.write_text("".join(json.dumps({"completion": r["completion"], "prompt": r["prompt"]}, indent=None) + "\n"
                            for r in RECORDS))
    from_file = sources.describe_source(str(path))
    trainer_list = SFTTrainer(train_dataset=[dict(r) for r in RECORDS], config=SETTINGS)
    trainer_dataset = SFTTrainer(train_dataset=datasets.Dataset.from_list(RECORDS), config=SETTINGS)
    described = [sources.describe_source(t._data["data"]["train"]) for t in (trainer_list, trainer_dataset)]
    assert from_file["records"] == len(RECORDS)
    assert from_file["records_sha256"] == described[0]["records_sha256"] == described[1]["records_sha256"]
    changed = SFTTrainer(train_dataset=RECORDS[:-1], config=SETTINGS)._data["data"]["train"]
    assert sources.describe_source(changed)["records_sha256"] != from_file["records_sha256"]


def test_a_save_to_disk_directory_and_a_dataset_dict_are_read_with_their_held_out_split(tmp_path, tiny):
    import datasets

    model, tokenizer = tiny
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                                   "test": datasets.Dataset.from_list(RECORDS[:8])})
    splits["train"].save_to_disk(tmp_path / "saved_train")
    read = [record for _, record in sources.iter_records(str(tmp_path / "saved_train"))]
    assert read == RECORDS
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=splits, config=SETTINGS)
    held_out = trainer._data["data"]["eval"]
    assert [record for _, record in sources.iter_records(held_out)] == RECORDS[:8]


def test_settings_as_a_dataclass_a_dict_or_a_yaml_file_resolve_alike(tmp_path):
    import yaml

    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(SETTINGS))
    as_dict = SFTTrainer(model="some/model", config=SETTINGS).config
    as_yaml = SFTTrainer(model="some/model", config=tmp_path / "sft.yaml").config
    as_object = SFTTrainer(model="some/model", config=as_dict).config
    assert as_dict == as_yaml == as_object and as_dict.train.max_steps == 2
    with pytest.raises(ConfigError, match="here it is 'train.lr'"):
        SFTTrainer(model="some/model", config={"learning_rate": 1e-5}).config
    with pytest.raises(ConfigError, match="tokenizer="):
        SFTTrainer(model=AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(ConfigError, match="takes a SFTConfig"):
        from llmstack import RewardConfig

        SFTTrainer(config=RewardConfig())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "reward", "ppo"])
def test_each_example_trains_stops_at_step_3_and_reloads_with_plain_transformers(tmp_path, name):
    script = REPO / "examples" / f"{name}.py"
    assert len(script.read_text().splitlines()) <= 25
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].split()[0] == "stopped"  # the script's own line, printed last
    record = json.loads((tmp_path / f"runs/example-{name}/record.json").read_text())
    assert (record["status"], record["stop_reason"]) == ("stopped", "three steps are enough for an example")
    assert record["metrics"]["steps"] == 3
