"""Pretraining data curation: rules (rules.py, quality.py, dedup.py), the pipeline that runs them
(pipeline.py), the audit (audit.py, report.py). `llmstack.data.curate.curate` runs a whole stage."""

from llmstack.data.curation.audit import Audit
from llmstack.data.curation.pipeline import RULES, Pipeline, build_rule, evaluate

__all__ = ["RULES", "Audit", "Pipeline", "build_rule", "evaluate"]
