"""Pretraining data curation: filters, deduplication and masking with a per-rule audit.

    python recipes/curate.py --config configs/tiny/curate.yaml [key=value ...]
    python recipes/curate.py --config configs/examples/curate-web.yaml data.shard_index=0 data.num_shards=8
"""

from llmstack.cli import exit_process, run_stage


def main(argv=None) -> int:
    return run_stage("curate", argv)


if __name__ == "__main__":
    exit_process(main())
