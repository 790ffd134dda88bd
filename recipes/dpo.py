"""DPO: the SFT model learns the preference data directly, with no reward model.

    python recipes/dpo.py --config configs/tiny/dpo.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/dpo.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("dpo", argv)


if __name__ == "__main__":
    exit_process(main())
