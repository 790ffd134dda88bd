"""PPO with a KL penalty against the SFT model.

    python recipes/ppo.py --config configs/tiny/ppo.yaml [key=value ...]
    accelerate launch --config_file configs/accelerate/<setup>.yaml recipes/ppo.py --config ...
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("ppo", argv)


if __name__ == "__main__":
    exit_process(main())
