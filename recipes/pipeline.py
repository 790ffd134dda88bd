"""The whole path: pretrain -> SFT -> reward model -> PPO, with REPORT.md.

    python recipes/pipeline.py --config configs/tiny/pipeline.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/pipeline.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("pipeline", argv)


if __name__ == "__main__":
    exit_process(main())
