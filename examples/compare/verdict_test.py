"""The verdict is computed from the numbers it is given."""

import pytest

from examples.compare import verdict


def _opt(acc, std, seconds, steps, of=3):
  hit = dict(
    reached=len(seconds),
    of=of,
    seconds=seconds,
    steps=steps,
    seconds_median=sorted(seconds)[len(seconds) // 2] if seconds else None,
    steps_median=sorted(steps)[len(steps) // 2] if steps else None,
  )
  return dict(
    final_test_accuracy=acc, final_test_accuracy_std=std, to_target={'0.9': hit}
  )


def _results(n=3, **optimizers):
  return dict(
    num_seeds=n, optimizers=optimizers, step_seconds={'frog': 3.0, 'sgd': 2.0}
  )


def test_names_the_winners_margins_and_noise():
  text = verdict.verdict(
    _results(
      frog=_opt(0.98, 0.001, [1.0, 1.1, 1.2], [10, 10, 20]),
      sgd=_opt(0.95, 0.002, [2.0, 2.2, 2.4], [30, 40, 50]),
    ),
    [0.9],
  )
  assert 'frog ends with the best test accuracy (0.9800 ± 0.0010' in text
  assert '3.00 points above sgd (0.9500): beyond seed noise' in text
  assert "first in wall-clock: frog (1.10 s against sgd's 2.20 s, 2.00×" in text
  assert "first in steps: frog (10 against sgd's 40, 4.00× fewer" in text
  assert 'One FROG step costs 1.50× an SGD step' in text


def test_names_the_last_of_three():
  text = verdict.verdict(
    _results(
      frog=_opt(0.90, 0.001, [1.0], [10], of=1),
      sgd=_opt(0.95, 0.002, [1.0], [10], of=1),
      adamw=_opt(0.93, 0.002, [1.0], [10], of=1),
    ),
    [],
  )
  assert text.startswith('sgd ends with the best')
  assert 'frog is last (0.9000 ± 0.0010).' in text


def test_overlapping_seeds_are_within_noise_and_ties_are_ties():
  text = verdict.verdict(
    _results(
      frog=_opt(0.950, 0.01, [1.0, 1.5, 3.0], [10, 20, 30]),
      sgd=_opt(0.949, 0.01, [1.2, 2.0, 2.5], [10, 20, 30]),
    ),
    [0.9],
  )
  assert '0.10 points above sgd (0.9490): within seed noise' in text
  assert 'sooner; within seed noise' in text
  assert 'tied with' in text


def test_one_seed_says_noise_cannot_be_judged_and_misses_are_named():
  text = verdict.verdict(
    _results(
      n=1,
      frog=_opt(0.9, 0.0, [], [], of=1),
      sgd=_opt(0.8, 0.0, [], [], of=1),
    ),
    [0.9],
  )
  assert 'seed noise cannot be judged' in text
  assert 'Nobody reached 90% test accuracy in every seed.' in text


@pytest.mark.parametrize('reached', [1, 2])
def test_only_optimizers_that_reached_in_every_seed_compete(reached):
  text = verdict.verdict(
    _results(
      frog=_opt(0.9, 0.0, [5.0, 5.0, 5.0], [50, 50, 50]),
      sgd=_opt(0.9, 0.0, [1.0] * reached, [5] * reached),
    ),
    [0.9],
  )
  assert 'first in wall-clock: frog (5.00 s, the only one' in text
