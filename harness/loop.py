"""The training loop: epochs of shuffled batches, evaluation, time-to-target.

Training wall-clock counts steps only: compile before calling `train` (or
warm the step up), and evaluation is excluded.
"""

import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from harness import data as data_lib


def epoch_batches(
  rng: np.random.Generator, num_examples: int, batch_size: int
) -> Iterator[np.ndarray]:
  """Indices of one epoch's full batches, in a fresh random order."""
  order = rng.permutation(num_examples)
  for i in range(num_examples // batch_size):
    yield order[i * batch_size : (i + 1) * batch_size]


def make_accuracy(model, batch_size: int = 1000):
  """`(variables, x, y) -> accuracy` in eval mode (`train=False`)."""

  @jax.jit
  def predict(variables, x):
    return jnp.argmax(model.apply(variables, x, train=False), -1)

  def accuracy(variables, x, y):
    hits = 0
    for i in range(0, len(y), batch_size):
      pred = predict(variables, x[i : i + batch_size])
      hits += int((np.asarray(pred) == y[i : i + batch_size]).sum())
    return hits / len(y)

  return accuracy


def first_reach(history: Sequence[dict], target: float):
  """`(step, seconds)` of the first evaluation at or above `target`."""
  for h in history:
    if h['test_accuracy'] >= target:
      return h['step'], h['train_seconds']
  return None


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation over seeds (0 for one seed)."""
  values = np.asarray(values, dtype=float)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return float(values.mean()), std


def crossings_over_seeds(hits: Sequence[tuple | None]) -> dict[str, Any]:
  """One target's `first_reach` results over seeds, summarised.

  Returns how many seeds reached it (`reached` of `of`), their `steps` and
  `seconds`, and the medians over the seeds that reached it (None if none).
  """
  steps = [h[0] for h in hits if h is not None]
  seconds = [h[1] for h in hits if h is not None]
  median = lambda v: float(np.median(v)) if v else None
  return dict(
    reached=len(steps),
    of=len(hits),
    steps=steps,
    seconds=seconds,
    steps_median=median(steps),
    seconds_median=median(seconds),
  )


def train(
  step: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array]],
  state: Any,
  data: data_lib.Dataset,
  *,
  batch_size: int,
  num_epochs: int,
  seed: int,
  eval_every: int,
  evaluate: Callable[[Any], float],
  targets: Sequence[float] = (),
  desc: str = '',
) -> dict[str, Any]:
  """Trains `num_epochs` epochs; stops early if the loss turns non-finite.

  Args:
    step: `(state, x, y) -> (state, loss)`, already compiled.
    state: the initial state.
    data: the dataset; batches come from the training split.
    batch_size: examples per step.
    num_epochs: passes over the training split.
    seed: the batch order's seed.
    eval_every: steps between evaluations (the last step is evaluated too).
    evaluate: `state -> test accuracy`.
    targets: accuracies whose first crossing is reported.
    desc: the progress bar's label.

  Returns:
    `history` (one entry per evaluation: step, train seconds, train loss,
    test accuracy; step 0 first), `train_seconds`, `diverged`,
    `final_accuracy`, `to_target` (`{str(target): (step, seconds) or None}`)
    and the final `state`.
  """
  total_steps = len(data.y_train) // batch_size * num_epochs
  history = [
    dict(
      step=0, train_seconds=0.0, train_loss=None, test_accuracy=evaluate(state)
    )
  ]
  rng = np.random.default_rng(seed)
  train_seconds, count, diverged = 0.0, 0, False
  with tqdm(total=total_steps, desc=desc, leave=False) as bar:
    for _ in range(num_epochs):
      for idx in epoch_batches(rng, len(data.y_train), batch_size):
        x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
        start = time.perf_counter()
        state, loss = step(state, x, y)
        loss = float(loss)  # waits for the step
        train_seconds += time.perf_counter() - start
        count += 1
        bar.update(1)
        diverged = not np.isfinite(loss)
        if diverged or count % eval_every == 0 or count == total_steps:
          acc = evaluate(state)
          history.append(
            dict(
              step=count,
              train_seconds=train_seconds,
              train_loss=loss,
              test_accuracy=acc,
            )
          )
          bar.set_postfix(loss=f'{loss:.3f}', acc=f'{acc:.4f}')
        if diverged:
          break
      if diverged:
        break
  return dict(
    history=history,
    train_seconds=train_seconds,
    diverged=diverged,
    final_accuracy=history[-1]['test_accuracy'],
    to_target={str(a): first_reach(history, a) for a in targets},
    state=state,
  )
