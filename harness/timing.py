"""The one step timer: candidates take turns, in a new order every round.

Ratios between optimizers are measured side by side in one process, never
across runs: every candidate runs once per round, and the order is shuffled
each round, because a step runs slower right after a heavy one (kfac-jax's,
say), so no candidate may always follow the same one.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

# Calls run before timing: compilation, and kfac-jax compiles a second step
# variant (the one that refreshes its inverses) on its second step.
WARMUP_CALLS = 2


def shuffled_rounds(
  calls: dict[str, Callable[[], Any]], rounds: int, *, seed: int = 0
) -> tuple[dict[str, list[float]], dict[str, float]]:
  """Times zero-argument calls in `rounds` shuffled rounds.

  Each call must return what it computed (it is waited for). Every call runs
  `WARMUP_CALLS` times untimed first.

  Returns:
    `(seconds, warmup_seconds)`: each call's per-round seconds, and the
    seconds of its warm-up calls (compilation included).
  """
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}.')
  warmup = {}
  for name, call in calls.items():
    start = time.perf_counter()
    for _ in range(WARMUP_CALLS):
      out = call()
    jax.block_until_ready(out)
    warmup[name] = time.perf_counter() - start
  seconds = {name: [] for name in calls}
  order, rng = list(calls), np.random.default_rng(seed)
  for _ in tqdm(range(rounds), desc='interleaved timing', leave=False):
    rng.shuffle(order)
    for name in order:
      start = time.perf_counter()
      jax.block_until_ready(calls[name]())
      seconds[name].append(time.perf_counter() - start)
  return seconds, warmup


def median_seconds(
  calls: dict[str, Callable[[], Any]], rounds: int
) -> dict[str, float]:
  """The median seconds of each zero-argument call (`shuffled_rounds`)."""
  seconds, _ = shuffled_rounds(calls, rounds)
  return {name: float(np.median(v)) for name, v in seconds.items()}


def interleaved_steps(runs: dict[str, dict[str, Any]], x, y, rounds: int):
  """Times each run's training step on `(x, y)` (`shuffled_rounds`).

  `runs[name]` holds a `trainer` (`harness.trainers.Trainer`) and its
  `state`, replaced by the state each step returns (steps donate their
  input).

  Returns:
    `(medians, spreads, warmup_seconds)`: the median step seconds; the mean
    and interquartile range (kfac-jax's mean includes its periodic inverse
    refreshes, its median does not); the warm-up seconds per run.
  """

  def step_of(run):
    def call():
      run['state'], loss = run['trainer'].step(run['state'], x, y)
      return loss

    return call

  seconds, warmup = shuffled_rounds(
    {name: step_of(run) for name, run in runs.items()}, rounds
  )
  medians = {k: float(np.median(v)) for k, v in seconds.items()}
  spreads = {
    k: dict(
      mean=float(np.mean(v)),
      iqr=[float(q) for q in np.percentile(v, [25, 75])],
    )
    for k, v in seconds.items()
  }
  return medians, spreads, warmup
