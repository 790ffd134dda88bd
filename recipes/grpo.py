"""GRPO: groups of answers to each prompt, each compared with its group; no value model.

    python recipes/grpo.py --config configs/tiny/grpo.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/grpo.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("grpo", argv)


if __name__ == "__main__":
    exit_process(main())
