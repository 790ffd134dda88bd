"""Reward modelling from ranked human preferences.

    python recipes/reward.py --config configs/tiny/reward.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/reward.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("reward", argv)


if __name__ == "__main__":
    exit_process(main())
