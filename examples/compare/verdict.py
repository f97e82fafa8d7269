"""The main job's answer in one paragraph, computed from its own numbers.

For the final test accuracy and for each accuracy target, it names the
optimizer that did best (highest mean accuracy; first to the target by the
median over seeds, in wall-clock and in steps), by how much, and whether
the gap is within seed noise: for accuracies, when it is no larger than the
two standard deviations combined; for crossings, when the two optimizers'
ranges over the seeds overlap. With one seed it says that noise cannot be
judged.
"""

from collections.abc import Sequence
from typing import Any


def _noise(n: int, overlap: bool) -> str:
  if n < 2:
    return 'one seed, so seed noise cannot be judged'
  return 'within seed noise' if overlap else 'beyond seed noise'


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
  return min(a) <= max(b) and min(b) <= max(a)


def _final_accuracy(optimizers: dict[str, Any], n: int) -> str:
  ranked = sorted(
    optimizers, key=lambda k: -optimizers[k]['final_test_accuracy']
  )
  best = optimizers[ranked[0]]
  text = (
    f'{ranked[0]} ends with the best test accuracy'
    f' ({best["final_test_accuracy"]:.4f}'
    f' ± {best["final_test_accuracy_std"]:.4f} over {n} seed'
    f'{"s" if n > 1 else ""})'
  )
  if len(ranked) < 2:
    return text + '.'
  second = optimizers[ranked[1]]
  gap = best['final_test_accuracy'] - second['final_test_accuracy']
  combined = best['final_test_accuracy_std'] + second['final_test_accuracy_std']
  text = (
    f'{text}, {100 * gap:.2f} points above {ranked[1]}'
    f' ({second["final_test_accuracy"]:.4f}): {_noise(n, gap <= combined)}.'
  )
  if len(ranked) > 2:
    last = optimizers[ranked[-1]]
    text += (
      f' {ranked[-1]} is last ({last["final_test_accuracy"]:.4f}'
      f' ± {last["final_test_accuracy_std"]:.4f}).'
    )
  return text


def _first(reached: dict[str, Any], key: str, n: int, unit: str) -> str:
  """Who of `reached` (every seed got there) crossed first by `key`."""
  ranked = sorted(reached, key=lambda k: reached[k][f'{key}_median'])
  w = reached[ranked[0]]
  fmt = (lambda v: f'{v:.2f} s') if unit == 's' else (lambda v: f'{v:g}')
  text = f'{ranked[0]} ({fmt(w[f"{key}_median"])}'
  if len(ranked) < 2:
    return text + ', the only one to get there in every seed)'
  r = reached[ranked[1]]
  overlap = _overlap(w[key], r[key])
  if r[f'{key}_median'] == w[f'{key}_median']:
    return f'{text}, tied with {ranked[1]}; {_noise(n, overlap)})'
  ratio = r[f'{key}_median'] / max(w[f'{key}_median'], 1e-12)
  return (
    f"{text} against {ranked[1]}'s {fmt(r[f'{key}_median'])},"
    f' {ratio:.2f}× {"sooner" if unit == "s" else "fewer"};'
    f' {_noise(n, overlap)})'
  )


def _target(optimizers: dict[str, Any], target: float, n: int) -> str:
  hits = {k: r['to_target'][str(target)] for k, r in optimizers.items()}
  everywhere = {k: h for k, h in hits.items() if h['reached'] == n}
  never = [k for k, h in hits.items() if h['reached'] == 0]
  if not everywhere:
    return f'Nobody reached {target:.0%} test accuracy in every seed.'
  text = (
    f'To {target:.0%}, first in wall-clock: '
    f'{_first(everywhere, "seconds", n, "s")}; first in steps: '
    f'{_first(everywhere, "steps", n, "steps")}.'
  )
  if never:
    text += f' Never reached: {", ".join(never)}.'
  return text


def verdict(results: dict[str, Any], targets: Sequence[float]) -> str:
  """One paragraph: best final accuracy, then who reached each target first.

  Args:
    results: the main job's results (`optimizers`, `num_seeds`,
      `step_seconds`).
    targets: the accuracy targets, in order.
  """
  optimizers = results['optimizers']
  n = results['num_seeds']
  parts = [_final_accuracy(optimizers, n)]
  parts += [_target(optimizers, a, n) for a in targets]
  steps = results.get('step_seconds', {})
  if 'frog' in steps and 'sgd' in steps:
    parts.append(
      f'One FROG step costs {steps["frog"] / steps["sgd"]:.2f}× an SGD step'
      ' here (interleaved medians).'
    )
  return ' '.join(parts)
