"""Supervised fine-tuning.

    python recipes/sft.py --config configs/tiny/sft.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/sft.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("sft", argv)


if __name__ == "__main__":
    exit_process(main())
