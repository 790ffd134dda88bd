"""The paths a configuration names, checked before any work starts: `~` and `$VARIABLES` expanded, empty
values refused, and every local-looking input that does not exist reported with its key, so a typo fails at
once instead of as a Hub lookup or after a tokenizer has been trained.

A value looks local when it starts with `.`, `/`, `~` or `$`, has more than one `/` (a Hub id is
`namespace/name`), or ends in a data file's suffix. A bare name or a `namespace/name` that is not on disk is
left to the Hub or `datasets`, whose failure the loaders turn into a one-line error of their own.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from llmstack.config.loading import ConfigError, option

# (section, key) pairs naming an input, wherever the section sits (a pipeline nests whole stage configs)
INPUTS = {("data", "train"), ("data", "eval"), ("data", "ptx"), ("model", "name_or_path"), ("model", "tokenizer"),
          ("reward_model", "name_or_path"), ("value_model", "name_or_path"), ("wordlist", "path")}
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".gz")
PREVIOUS = "previous"  # a pipeline stage's input: the model (or data) of the stage before it
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def overwrite_option():
    """`overwrite_output_dir`, the same key in every stage."""
    return option(False, "Write into an output_dir that is not empty and holds no llmstack run (llmstack's own "
                  "files there are replaced; nothing else is deleted). Off: such a directory is refused.")


def looks_local(value: str) -> bool:
    if value.startswith((".", "/", "~", "$")) or os.sep != "/" and os.sep in value:
        return True
    return value.count("/") >= 2 or value.lower().endswith(DATA_SUFFIXES)


def expand(key: str, value: str) -> str:
    """`value` with `~` and environment variables expanded; an unset variable is an error, not a literal."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = _VARIABLE.search(expanded)
    if unset:
        raise ConfigError(f"config key '{key}': {value!r} uses the environment variable {unset.group(0)}, "
                          "which is not set; set it or write the path out")
    return expanded


def output_dir(value: str, key: str = "output_dir") -> str:
    """The run directory named by `value`, expanded; empty is refused (it would mean the working directory)."""
    if not value or not value.strip():
        raise ConfigError(f"config key '{key}' is empty; give the run a directory of its own, e.g. "
                          f"{key}=runs/my-run")
    return expand(key, value.strip())


def checked(cfg, prefix: str = ""):
    """`cfg` with its output directory and inputs expanded; raises ConfigError for an empty value or a
    local-looking input that does not exist. Nested sections are checked under their dotted names."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            new = checked(value, f"{prefix}{f.name}.")
        elif f.name == "output_dir" and not prefix:
            new = output_dir(value)
        elif isinstance(value, str) and (prefix.rstrip(".").rpartition(".")[2], f.name) in INPUTS:
            new = _input(f"{prefix}{f.name}", value)
        else:
            continue
        if new != value:
            changes[f.name] = new
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    if not prefix and hasattr(cfg, "output_dir"):
        _apart(cfg)
    return cfg


def _apart(cfg) -> None:
    """A stage's inputs and its run directory must not overlap: the run would overwrite an input inside it
    (a model/ it saves), or read its own files back from an input directory around it."""
    out = Path(cfg.output_dir).resolve()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        for g in dataclasses.fields(section):
            value = getattr(section, g.name)
            if (f.name, g.name) not in INPUTS or not isinstance(value, str) or not Path(value).exists():
                continue
            path, key = Path(value).resolve(), f"{f.name}.{g.name}"
            if path == out or out in path.parents:
                raise ConfigError(f"config key '{key}': {value} is inside output_dir {cfg.output_dir}, where the "
                                  "run writes; move the input out or choose another output_dir")
            if path in out.parents:
                raise ConfigError(f"config key 'output_dir': {cfg.output_dir} is inside {key}={value}, so the run "
                                  "would read its own files as input; choose an output_dir outside it")


def _input(key: str, value: str) -> str:
    if not value.strip():
        raise ConfigError(f"config key '{key}' is empty; name a file, a directory or a Hub name, or set it to "
                          "null where it is optional")
    if value == PREVIOUS or not looks_local(value):
        return value
    path = expand(key, value)
    if not Path(path).exists():
        shown = value if path == value else f"{value} (= {path})"
        where = "" if Path(path).is_absolute() else f" (relative to {os.getcwd()})"
        producer = producing_config(path)
        todo = f"it is written by another run: run `{producer}` first" if producer else "check the path"
        raise ConfigError(f"config key '{key}': no such file or directory: {shown}{where}; {todo}")
    return path


def producing_config(path: str, configs: str = "configs") -> str | None:
    """The command whose run writes `path` (its `model/`, or the run directory itself), found among the
    YAML configurations under `configs/` of the working directory (the repository's tiny and example configs),
    or None. Stages read the previous stage's output by path, so a missing one usually means that stage has
    not run yet."""
    import yaml

    wanted = Path(path).resolve()
    for config in sorted(Path(configs).glob("*/*.yaml")):
        try:
            settings = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        out = settings.get("output_dir") if isinstance(settings, dict) else None
        if isinstance(out, str) and wanted in (Path(out).resolve(), (Path(out) / "model").resolve()):
            stage = config.stem.split("-")[0]
            return f"llmstack {stage} --config {config}"
    return None
