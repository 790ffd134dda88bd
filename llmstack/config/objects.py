"""Python objects given to a stage in place of a path: a model, a tokenizer, a dataset, a reward function.

A configuration holds strings only (it is saved as YAML beside every run and read back on resume), so an object
is registered here and the configuration names it `memory:<kind>:<fingerprint>`; the loaders of `data/` and
`models/` resolve such a name back to the object. The fingerprint is a content hash, so the same records give
the same name (and the same record entry) whether they came as a file, a list of dicts or a `datasets.Dataset`,
and a resumed run in the same process finds its objects again. The registry lives for the process only: a
`memory:` name in a saved config cannot be resumed from a fresh process, and says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

PREFIX = "memory:"

_objects: dict[str, Any] = {}
_descriptions: dict[str, dict] = {}


def is_memory(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def register(obj: Any, kind: str, fingerprint: str, description: dict) -> str:
    """Name `obj` for a configuration; `description` is what the run record keeps about it."""
    spec = f"{PREFIX}{kind}:{fingerprint[:16]}"
    _objects[spec] = obj
    _descriptions[spec] = {"given_in": "python", "kind": kind, **description}
    return spec


def lookup(spec: str) -> Any:
    if spec not in _objects:
        raise LookupError(f"{spec} names a Python object given to an earlier process; it cannot be read from "
                          "here: pass the object again (the Python API) or point the key at a file or directory")
    return _objects[spec]


def fresh_copy(spec: str) -> Any:
    """A copy of a registered model, so the caller's object is never trained in place or frozen by a stage,
    and a reference model loaded from the same name is a separate copy."""
    return copy.deepcopy(lookup(spec))


def describe(spec: str) -> dict:
    lookup(spec)
    return dict(_descriptions[spec])


def canonical_record(record: dict) -> str:
    """One line of JSON independent of key order and formatting: the unit of a dataset's fingerprint."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def records_sha256(records) -> tuple[str, int]:
    """(sha256, count) over records in order, each as `canonical_record` plus a newline."""
    digest, count = hashlib.sha256(), 0
    for record in records:
        digest.update(canonical_record(record).encode())
        digest.update(b"\n")
        count += 1
    return digest.hexdigest(), count


def weights_sha256(model) -> tuple[str, int]:
    """(sha256, parameter count) over a model's state dict: names, dtypes, shapes and bytes, in name order."""
    import torch  # the configuration layer is read without torch (`--help`); only a model brings it in

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), sum(p.numel() for p in model.parameters())
