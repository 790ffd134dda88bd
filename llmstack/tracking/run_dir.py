"""Owning a run directory: one run at a time, and never someone else's files.

Every stage (and the pipeline) runs through `owns_output_dir`, which before any work
- checks the configuration's paths (`llmstack.config.paths.checked`: `~` and `$VARIABLES` expanded, an empty
  output_dir or a missing local input refused);
- refuses a non-empty directory that holds no llmstack run, unless `overwrite_output_dir` is set (then
  llmstack's own files there are replaced; nothing else is deleted);
- takes an exclusive lock (`fcntl.flock` on `.llmstack.lock` inside the directory) for the run's life, so a
  second run on the same directory stops at once, naming the first one's process and host. The lock file
  stays as the directory's mark of ownership; the kernel releases the lock when the process ends, however it
  ends, so a killed run never leaves a stale lock.

In a multi-process run only the process of global rank 0 takes the lock: the others write nothing of their
own there, and a launcher stops them when rank 0 leaves.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import time
from pathlib import Path

from llmstack.config.loading import ConfigError
from llmstack.config.paths import checked

LOCK_FILE = ".llmstack.lock"
RECORD_FILE = "record.json"


class RunDirError(ConfigError):
    """The output directory cannot be used as it is; the message says why and what to do."""


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def is_llmstack_dir(directory: Path) -> bool:
    """Whether an llmstack run has claimed `directory` (its lock file) or left its record there (a run directory
    from before lock files: a JSON object naming its stage; another tool's record.json does not count)."""
    if (directory / LOCK_FILE).is_file():
        return True
    try:
        record = json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "stage" in record


def _foreign_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class RunDirLock:
    """The held lock of one run directory; `release()` (or process exit) gives it up."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _unwritable(directory: Path, err: OSError) -> RunDirError:
    why = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
           errno.ENOTDIR: "a part of the path is a file"}.get(err.errno, err.strerror or str(err))
    return RunDirError(f"output_dir {directory} cannot be written: {why}; choose a writable output_dir")


def claim(directory: str | Path, stage: str, overwrite: bool = False) -> RunDirLock:
    """Make `directory` this run's: create it, refuse it when it holds something else (see the module
    docstring), and lock it. Raises RunDirError naming the problem."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"output_dir {directory} is a file, not a directory; choose a directory for the run")
    if directory.is_dir() and not overwrite and not is_llmstack_dir(directory):
        found = _foreign_entries(directory)
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise RunDirError(f"output_dir {directory} is not empty and holds no llmstack run (it has {shown}); "
                              "choose a new or empty directory, or set overwrite_output_dir=true to write into it "
                              "(llmstack's own files there are replaced, nothing else is deleted)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unwritable(directory, err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(f"output_dir {directory} is in use by another llmstack run ({holder}); wait for it to "
                          "end or choose another output_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
    except OSError as err:
        os.close(fd)
        raise _unwritable(directory, err) from err
    return RunDirLock(directory, fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its details are not written yet"
    return f"{info.get('stage', '?')}, pid {info.get('pid', '?')} on host {info.get('host', '?')}, " \
           f"since {info.get('since', '?')}"


def owns_output_dir(stage):
    """Decorate a stage function `stage(cfg, ...)`: the configuration's paths are checked and expanded, and
    the run directory is claimed (`claim`) for as long as the function runs."""
    @functools.wraps(stage)
    def run(cfg, *args, **kwargs):
        cfg = checked(cfg)
        lock = claim(cfg.output_dir, stage.__name__, cfg.overwrite_output_dir) if _is_main_process() else None
        try:
            return stage(cfg, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()
    return run


def read_run_record(run_dir: Path, stage: str) -> dict | None:
    """The llmstack record in `run_dir` (None when there is none), refused when it cannot be read, is not a
    record, or belongs to another stage: a directory holds one run."""
    path = Path(run_dir) / "record.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path} is not a readable run record ({err}); it was not written by this version of "
                          "llmstack or was damaged: move it away, or choose another output_dir") from err
    if not isinstance(record, dict):
        raise RunDirError(f"{path} is not a run record (a JSON {type(record).__name__}); move it away, or choose "
                          "another output_dir")
    if record.get("stage") not in (None, stage):
        raise RunDirError(f"output_dir {run_dir} holds a {record.get('stage')} run; a {stage} run needs an "
                          "output_dir of its own")
    return record
