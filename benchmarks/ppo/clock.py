"""Per-step phase times of a PPO run, taken from outside the trainer by wrapping two of its own functions
(the calls and their results are passed through untouched). Standard library and `benchmarks.memory` only: both
workers use it.

A step runs from the start of one rollout's generation to the start of the next, so whatever a trainer
does between steps (metrics, logging, garbage collection) counts in the step that did it; the last step
run has no end mark and is not reported. Phases: generation (sampling the responses), scoring (the
no-grad forward passes for log-probabilities, reference log-probabilities, values and rewards, and the
advantages), and update (the PPO epochs' forward/backward/optimiser steps, plus the step's bookkeeping).
Each step also gets the process's CPU time (all its threads): beside the wall time it shows how much of
a slow step was spent waiting for a core that other work held.
"""

from __future__ import annotations

import json
import time

from benchmarks.memory import peak_rss_mib


class Clock:
    def __init__(self, now=time.perf_counter, cpu=time.process_time):
        self.now, self.cpu = now, cpu
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []
        self.generated: list[float] = []
        self.scored: list[float] = []
        self.tokens: list[int] = []
        self.lengths: list[float] = []

    def generation(self, fn, describe):
        """`fn` timed as one rollout's generation; `describe(result, *args)` gives (token positions
        generated, mean response length up to and including the end-of-sequence token)."""
        def timed(*args, **kwargs):
            start, cpu_start = self.now(), self.cpu()
            out = fn(*args, **kwargs)
            self.starts.append(start)
            self.cpu_starts.append(cpu_start)
            self.generated.append(self.now())
            tokens, length = describe(out, *args)
            self.tokens.append(int(tokens))
            self.lengths.append(float(length))
            return out
        return timed

    def scoring_end(self, fn):
        """`fn` called once per step, as the scoring's last act."""
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.scored.append(self.now())
            return out
        return timed

    def steps(self) -> dict[str, list]:
        n = len(self.starts) - 1
        if len(self.scored) < n:
            raise RuntimeError(f"{len(self.starts)} generations but {len(self.scored)} scoring marks: the wrapped "
                               "functions were not called once per step")
        step = [self.starts[i + 1] - self.starts[i] for i in range(n)]
        generation = [self.generated[i] - self.starts[i] for i in range(n)]
        scoring = [self.scored[i] - self.generated[i] for i in range(n)]
        return {"step_s": step, "step_cpu_s": [self.cpu_starts[i + 1] - self.cpu_starts[i] for i in range(n)],
                "generation_s": generation, "scoring_s": scoring,
                "update_s": [s - g - c for s, g, c in zip(step, generation, scoring)],
                "generated_tokens": self.tokens[:n], "response_length": self.lengths[:n]}


def report(clock: Clock, rewards: list[float], kls: list[float]) -> None:
    """The worker's one line of results on stdout (the last line it prints), with the reward-model score
    and the KL to the reference (summed over a response's tokens) averaged over each step's rollout."""
    print(json.dumps({**clock.steps(), "reward": rewards, "kl": kls, "peak_rss_mib": peak_rss_mib()}), flush=True)
