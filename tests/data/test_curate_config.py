"""The curation config: shipped files load, the library takes every rule and parameter the schema names, and
mistakes fail at start-up naming the key and what is allowed."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from llmstack.config import ConfigError, describe, load_config
from llmstack.config.curate import RULE_NAMES, CurateConfig, RulesConfig
from llmstack.data.curation import RULES

REPO = Path(__file__).resolve().parents[2]
WORDS = str(REPO / "llmstack/data/blocklist.txt")


def test_shipped_configs_load():
    tiny = load_config(CurateConfig, REPO / "configs/tiny/curate.yaml", [f"rules.wordlist.path={WORDS}"])
    assert tiny.rules.order[0] == "language" and tiny.rules.c4.min_sentences == 3
    web = load_config(CurateConfig, REPO / "configs/examples/curate-web.yaml")
    assert (web.workers, web.format, web.data.text_field) == (16, "parquet", "text")


def test_every_schema_rule_and_parameter_reaches_the_library():
    assert set(RULE_NAMES) == set(RULES)
    for name in RULE_NAMES:
        section = [f.name for f in dataclasses.fields(getattr(RulesConfig(), name))]
        accepted = set(inspect.signature(RULES[name]).parameters) - {"seed"}
        assert set(section) == accepted, name


def test_rules_become_ordered_name_and_parameter_pairs():
    cfg = load_config(CurateConfig, None, ["rules.order=[pii,exact_dedup]", "rules.pii.phone=false"])
    assert cfg.rules.as_list() == [("pii", {"email": True, "ipv4": True, "phone": False}), ("exact_dedup", {})]


@pytest.mark.parametrize("override, message", [
    ("rules.order=[language,gopher_qualty]", "config key 'rules.order[1]': 'gopher_qualty' is not allowed; "
                                             "allowed: 'gutenberg', 'pii', 'paragraphs', 'language', 'c4', "
                                             "'gopher_quality', 'gopher_repetition', 'wordlist', 'exact_dedup', "
                                             "'near_dedup'. Did you mean 'gopher_quality'?"),
    ("rules.c4.min_sentence=3", "unknown config key 'rules.c4.min_sentence' in command-line override "
                                "'rules.c4.min_sentence=3'. Did you mean 'rules.c4.min_sentences'?"),
    ("rules.language.threshold=0.5", "Keys allowed at 'rules.language': languages, min_score"),
    ("rules.near_dup.threshold=0.5", "unknown config key 'rules.near_dup'"),
    ("rules.order=[c4,c4]", "config key 'rules.order[1]': rule 'c4' is listed twice"),
    ("rules.order=[language,paragraphs]", "'language' comes before 'paragraphs'; only gutenberg, pii may run"),
    ("rules.order=[wordlist]", "config key 'rules.wordlist.path' is required when 'wordlist' is in rules.order"),
    ("rules.language.min_score=1.5", "config key 'rules.language.min_score': 1.5 is out of range; allowed: <= 1.0"),
    ("rules.near_dedup.bands=3", "config key 'rules.near_dedup.bands': 3 does not divide rules.near_dedup.num_perm"),
    ("rules.gopher_repetition.top_ngram_chars=[0.2]", "'rules.gopher_repetition.top_ngram_chars': [0.2] is not "
                                                      "allowed; expected 3 shares"),
    ("rules.gopher_quality.min_words=200000", "'rules.gopher_quality.min_words': 200000 is more than"),
    ("format=csv", "config key 'format': 'csv' is not allowed; allowed: 'jsonl', 'parquet'"),
    ("data.shard_index=2", "config key 'data.shard_index': 2 is out of range; allowed: < data.num_shards (1)"),
    ("workers=0", "config key 'workers': 0 is out of range; allowed: >= 1"),
])
def test_config_errors_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CurateConfig, None, [override])
    assert message in str(err.value)


def test_missing_word_list_file_fails_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="config key 'rules.wordlist.path': file not found: .*nope.txt"):
        load_config(CurateConfig, None, ["rules.order=[wordlist]", f"rules.wordlist.path={tmp_path / 'nope.txt'}"])


def test_help_lists_rule_parameters():
    lines = "\n".join(describe(CurateConfig))
    assert "rules.near_dedup.threshold = 0.8" in lines and "rules.c4.min_sentences = 5" in lines
