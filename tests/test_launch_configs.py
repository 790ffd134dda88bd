"""The launcher configs and the README's launch commands: every file they name exists, accelerate reads
each config, and every GPU config has a CPU twin with the same engine settings (the twins are what
tests/trainers/test_two_processes.py runs)."""

import json
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
GPU_TO_CPU = {"ddp.yaml": "cpu-2proc.yaml", "fsdp.yaml": "cpu-2proc-fsdp.yaml",
              "deepspeed-zero2.yaml": "cpu-2proc-zero2.yaml", "deepspeed-zero3.yaml": "cpu-2proc-zero3.yaml",
              "deepspeed-zero3-offload.yaml": "cpu-2proc-zero3-offload.yaml"}


def readme_launches() -> list[list[str]]:
    section = (REPO / "README.md").read_text().split("### Multi-process", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip().startswith("accelerate launch")]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_config_is_read_by_accelerate_and_names_existing_files():
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config_from_file(str(path)).to_dict()
        ds_file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            json.loads((REPO / ds_file).read_text())  # valid JSON, relative to the repository root
            # accelerate refuses a launcher setting that the DeepSpeed file decides (precision among them)
            assert "mixed_precision" not in config, path.name


def test_every_gpu_config_has_a_cpu_twin_with_the_same_engine_settings():
    assert sorted(GPU_TO_CPU) == sorted(p.name for p in CONFIGS.glob("*.yaml")
                                        if not p.name.startswith(("cpu-", "single")))
    for gpu, cpu in GPU_TO_CPU.items():
        g, c = (load_config_from_file(str(CONFIGS / name)).to_dict() for name in (gpu, cpu))
        assert cpu in (CONFIGS / gpu).read_text(), f"{gpu} should name its CPU twin {cpu}"
        assert c["distributed_type"] == g["distributed_type"], (gpu, cpu)
        assert c["num_processes"] == 2 and g["num_processes"] >= 2
        assert c.get("fsdp_config") == g.get("fsdp_config"), (gpu, cpu)
        if g.get("deepspeed_config"):
            gpu_ds = json.loads((REPO / g["deepspeed_config"]["deepspeed_config_file"]).read_text())
            cpu_ds = json.loads((REPO / c["deepspeed_config"]["deepspeed_config_file"]).read_text())
            assert gpu_ds["zero_optimization"]["stage"] == cpu_ds["zero_optimization"]["stage"]
            for key in ("offload_optimizer", "offload_param"):
                assert (key in gpu_ds["zero_optimization"]) == (key in cpu_ds["zero_optimization"]), (gpu, key)
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
                assert gpu_ds[key] == cpu_ds[key] == "auto", (gpu, key)


def test_the_readme_launch_commands_name_existing_configs_and_recipes():
    commands = readme_launches()
    named = {Path(option(argv, "--config_file")).name for argv in commands}
    assert set(GPU_TO_CPU) | set(GPU_TO_CPU.values()) <= named, "every layout needs its command in the README"
    for argv in commands:
        assert (REPO / option(argv, "--config_file")).is_file(), argv
        recipe = next(a for a in argv if a.startswith("recipes/"))
        assert (REPO / recipe).is_file(), argv
        assert (REPO / option(argv, "--config")).is_file(), argv


@pytest.mark.parametrize("argv", [a for a in readme_launches() if "--num_machines" in a], ids=lambda a: "multinode")
def test_the_multinode_command_sets_every_rendezvous_option(argv):
    for name in ("--num_machines", "--num_processes", "--machine_rank", "--main_process_ip", "--main_process_port"):
        assert name in argv
    assert int(option(argv, "--num_processes")) % int(option(argv, "--num_machines")) == 0
