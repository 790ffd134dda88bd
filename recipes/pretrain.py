"""Causal-LM pretraining.

    python recipes/pretrain.py --config configs/tiny/pretrain.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/pretrain.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("pretrain", argv)


if __name__ == "__main__":
    exit_process(main())
