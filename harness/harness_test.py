"""The shared harness: the timer's rounds, the loop, and who imports whom."""

import ast
import pathlib

import numpy as np
import pytest

from harness import data as data_lib
from harness import loop
from harness import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_modules(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


@pytest.mark.parametrize(
  'folder, forbidden',
  [
    ('benchmarks', ('examples',)),
    ('examples', ('benchmarks',)),
    ('harness', ('examples', 'benchmarks')),
  ],
)
def test_one_import_direction_and_public_api_only(folder, forbidden):
  offenders = []
  for path in sorted((ROOT / folder).rglob('*.py')):
    for name in _imported_modules(path):
      top = name.split('.')[0]
      if top in forbidden or name.startswith('frog_optax._src'):
        offenders.append(f'{path.relative_to(ROOT)}: {name}')
  assert not offenders


def test_shuffled_rounds_time_every_call_each_round_in_varying_order():
  trace = []
  calls = {k: (lambda k=k: trace.append(k) or 0) for k in 'abcd'}
  seconds, warmup = timing.shuffled_rounds(calls, rounds=6)
  assert sorted(seconds) == sorted(warmup) == list('abcd')
  assert all(len(v) == 6 for v in seconds.values())
  timed = trace[len(calls) * timing.WARMUP_CALLS :]
  rounds = [tuple(timed[i : i + 4]) for i in range(0, len(timed), 4)]
  assert all(sorted(r) == list('abcd') for r in rounds)
  assert len(set(rounds)) > 1  # the order changes between rounds


def test_shuffled_rounds_refuses_no_rounds():
  with pytest.raises(ValueError, match='rounds'):
    timing.shuffled_rounds({'a': lambda: 0}, rounds=0)


def _toy_data(n=12):
  x = np.arange(n, dtype=np.float32).reshape(n, 1)
  return data_lib.Dataset('toy', x, np.zeros(n, np.int32), x, np.zeros(n))


def test_train_evaluates_and_reports_first_crossings():
  # The "accuracy" is the number of steps taken so far divided by 10.
  step = lambda state, x, y: (state + 1, np.float32(1.0))
  run = loop.train(
    step,
    0,
    _toy_data(),
    batch_size=4,
    num_epochs=2,
    seed=0,
    eval_every=2,
    evaluate=lambda s: s / 10,
    targets=(0.2, 0.5, 0.9),
  )
  assert [h['step'] for h in run['history']] == [0, 2, 4, 6]
  assert run['final_accuracy'] == 0.6 and run['state'] == 6
  assert run['to_target']['0.2'][0] == 2
  assert run['to_target']['0.5'][0] == 6
  assert run['to_target']['0.9'] is None
  assert not run['diverged']


def test_train_stops_at_the_first_non_finite_loss():
  step = lambda s, x, y: (s + 1, np.float32(np.nan if s == 2 else 1.0))
  run = loop.train(
    step,
    0,
    _toy_data(),
    batch_size=4,
    num_epochs=5,
    seed=0,
    eval_every=100,
    evaluate=lambda s: 0.0,
  )
  assert run['diverged'] and run['state'] == 3
  assert run['history'][-1]['step'] == 3


def test_epoch_batches_cover_each_example_at_most_once():
  batches = list(loop.epoch_batches(np.random.default_rng(0), 10, 3))
  flat = np.concatenate(batches)
  assert len(batches) == 3 and len(set(flat.tolist())) == 9


def test_recorded_commands_hold_no_machine_specific_paths(
  monkeypatch, tmp_path
):
  from harness import record  # noqa: PLC0415

  monkeypatch.chdir(tmp_path)
  inside = tmp_path / 'results' / 'out.json'
  monkeypatch.setattr(
    'sys.argv',
    [
      str(tmp_path / 'bench.py'),
      '--out',
      str(inside),
      f'--data={tmp_path.parent / "elsewhere" / "mnist.npz"}',
      '--rounds',
      '3',
    ],
  )
  assert record.environment()['command'] == (
    'bench.py --out results/out.json --data=path/to/mnist.npz --rounds 3'
  )
