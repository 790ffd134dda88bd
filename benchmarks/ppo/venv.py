"""TRL 1.12's own virtual environment, made on first use.

TRL dropped its PPO trainer after 1.12 (1.12 keeps it as `trl.experimental.ppo`), so it cannot share
llmstack's environment. It gets the same torch, transformers and accelerate versions as this one, so
both contenders run the same model code and kernels and differ only in their trainers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRL_VERSION = "1.12.*"


def _pins() -> list[str]:
    import accelerate
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"accelerate=={accelerate.__version__}"]


def _run(command: list[str]) -> None:
    print(f"[ppo] $ {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def ensure_trl_venv(path: Path) -> Path:
    """The environment's python, creating the environment first when it is missing or half-made."""
    path = Path(path).resolve()
    python, done = path / "bin" / "python", path / ".complete"
    if done.is_file():
        return python
    print(f"[ppo] making TRL {TRL_VERSION}'s virtual environment at {path} (once; about a minute)",
          file=sys.stderr)
    _run([sys.executable, "-m", "venv", "--clear", str(path)])
    pins = _pins()
    # a constraints file keeps pip from swapping torch for another build while it resolves TRL's needs
    constraints = path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints), *pins, f"trl=={TRL_VERSION}"])
    _run([str(python), "-c", "import trl, trl.experimental.ppo; print('trl', trl.__version__)"])
    done.write_text("\n".join(pins) + "\n")
    return python


def trl_environment(python: Path) -> str:
    """One line naming the versions the TRL contender ran with (the machine line names this environment's)."""
    versions = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(', '.join(f'{p} ' + "
                               "m.version(p) for p in ('trl', 'torch', 'transformers', 'accelerate')))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    return f"TRL contender: its own environment (`--trl-venv`), with {versions}."
