"""The import rules of docs/ARCHITECTURE.md, checked on the source: every import statement of every module
(function-level ones included) is read with `ast`, so a rule broken anywhere fails here with the file and
line that broke it."""

import ast
import sys
import typing
from pathlib import Path

import pytest

from llmstack.config.schema import RolloutConfig

PACKAGE = Path(__file__).resolve().parents[1] / "llmstack"

# lowest first; a module may import its own layer's modules (each rule below narrows that) and lower layers
LAYERS = [
    {"llmstack", "llmstack.config", "llmstack.kernels", "llmstack.tracking"},
    {"llmstack.losses", "llmstack.rl"},
    {"llmstack.data", "llmstack.models"},
    {"llmstack.evaluation"},
    {"llmstack.trainers"},
    {"llmstack.pipeline", "llmstack.cli", "llmstack.api", "llmstack.smoke"},
]
STAGE_MODULES = {"pretrain", "sft", "reward", "ppo", "dpo"}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: llmstack.trainers.ppo -> llmstack.trainers."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if _unit(module) in units)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; `from a import b` counts as a and as a.b."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _check(rule) -> None:
    """Fail naming every import, with its file and line, for which `rule(module, imported)` gives a reason."""
    bad = []
    for module, path in _modules().items():
        for imported, line in _imports(path):
            problem = rule(module, imported)
            if problem:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}: {problem}")
    assert not bad, "\n".join(sorted(set(bad)))


def _own(name: str) -> bool:
    return name == "llmstack" or name.startswith("llmstack.")


def test_nothing_imports_a_higher_layer():
    def rule(module, imported):
        if _own(imported) and imported in _modules() and _layer(imported) > _layer(module):
            return f"{_unit(imported)} is above {_unit(module)}"
    _check(rule)


def test_data_and_models_do_not_import_each_other():
    def rule(module, imported):
        pair = {_unit(module), _unit(imported)}
        if pair == {"llmstack.data", "llmstack.models"}:
            return "data/ and models/ are side by side: what both need lives below them"
    _check(rule)


def test_rl_and_kernels_import_torch_and_themselves_only():
    def rule(module, imported):
        unit = _unit(module)
        if unit in ("llmstack.rl", "llmstack.kernels"):
            top = imported.split(".")[0]
            if _own(imported) and _unit(imported) != unit:
                return f"{unit} stays pure: torch and its own modules only"
            if not _own(imported) and top not in ("torch", "triton") and top not in sys.stdlib_module_names:
                return f"{unit} stays pure: torch and its own modules only"
    _check(rule)


def test_only_models_touch_hugging_face_models_and_adapters():
    """Outside models/, transformers is used for tokenizers only (data/ trains and wraps them); peft and
    bitsandbytes (adapters, 4-bit bases) and vLLM are models/' business alone."""
    tokenizers = {"transformers.PreTrainedTokenizerFast", "transformers.AutoTokenizer"}

    def rule(module, imported):
        if _unit(module) == "llmstack.models":
            return None
        top = imported.split(".")[0]
        if top in ("peft", "bitsandbytes", "vllm"):
            return "adapters, quantised bases and engines are loaded in llmstack/models/"
        if top == "transformers" and imported != "transformers" and imported not in tokenizers:
            return "Hugging Face model classes are reached through llmstack/models/"
    _check(rule)


def test_stages_do_not_import_each_other_or_the_built_in_task():
    def rule(module, imported):
        parts = module.split(".")
        if parts[:2] != ["llmstack", "trainers"]:
            return None
        if len(parts) == 3 and parts[2] in STAGE_MODULES and _unit(imported) == "llmstack.trainers" \
                and imported.split(".")[2:3] and imported.split(".")[2] in STAGE_MODULES - {parts[2]}:
            return "a stage does not import another stage: shared code lives below them"
        if imported.startswith(("llmstack.data.synthetic", "llmstack.evaluation.builtin_task")):
            return "trainers take metric functions; the built-in task is named in configs, not imported"
    _check(rule)


def test_deepspeed_and_accelerate_stay_in_the_trainers():
    def rule(module, imported):
        top = imported.split(".")[0]
        if top == "deepspeed" and module != "llmstack.trainers.distributed":
            return "DeepSpeed is set up in trainers/distributed.py"
        # the run record names the versions of the stack it ran on, accelerate's among them
        if top == "accelerate" and _unit(module) != "llmstack.trainers" and module != "llmstack.tracking.record":
            return "the accelerator is built and driven in trainers/"
    _check(rule)


def test_every_engine_the_config_offers_is_registered_and_the_other_way_round():
    from llmstack.models.engines import ENGINES

    offered = set(typing.get_args(typing.get_type_hints(RolloutConfig)["engine"]))
    assert offered == set(ENGINES)


@pytest.mark.parametrize("rule", [test_nothing_imports_a_higher_layer,
                                  test_only_models_touch_hugging_face_models_and_adapters])
def test_the_rules_catch_a_planted_import(rule, monkeypatch, tmp_path):
    """Each rule fails on a module that breaks it: a copy of the package with one bad line added."""
    planted = {test_nothing_imports_a_higher_layer: ("rl/kl.py", "from llmstack.trainers.base import log\n"),
               test_only_models_touch_hugging_face_models_and_adapters:
                   ("trainers/sft.py", "from transformers import AutoModelForCausalLM\n")}[rule]
    copy = tmp_path / "llmstack"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    target = copy / planted[0]
    target.write_text(target.read_text() + planted[1])
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    with pytest.raises(AssertionError, match=planted[0]):
        rule()

