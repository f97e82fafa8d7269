"""The harness end to end on the smoke suite, and its pieces."""

import dataclasses
import glob
import json
import os

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import optimizers
from benchmarks import protocol
from benchmarks import report
from benchmarks import run
from benchmarks import tasks
from harness import kfac_compat


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench')
  (path,) = run.main(['--suite', 'smoke', '--out', str(out)])
  with open(path) as f:
    return json.load(f), os.path.dirname(path)


def test_every_registered_optimizer_is_benchmarked(smoke):
  result, _ = smoke
  assert list(result['optimizers']) == list(optimizers.OPTIMIZERS)
  assert result['versions']['kfac_jax']
  assert result['command'].startswith('python -m benchmarks.run --suite smoke')


def test_sweep_picks_the_best_validation_accuracy(smoke):
  result, _ = smoke
  grid_size = run.SUITES['smoke'].grid_size
  for name, r in result['optimizers'].items():
    trials = r['sweep']['trials']
    grid = optimizers.get(name).learning_rates[:grid_size]
    assert [t['learning_rate'] for t in trials] == list(grid)
    best = max(trials, key=lambda t: t['final_accuracy'])
    assert r['learning_rate'] == best['learning_rate']
    assert all(
      run['learning_rate'] == best['learning_rate'] for run in r['seed_runs']
    )


def test_seed_runs_and_their_summary(smoke):
  result, _ = smoke
  task = tasks.get('smoke')
  steps = (
    run.SUITES['smoke'].max_examples[0] // task.batch_size * task.num_epochs
  )
  for r in result['optimizers'].values():
    runs = r['seed_runs']
    assert [x['seed'] for x in runs] == result['seeds']
    for x in runs:
      h = x['history']
      assert h[-1]['step'] == steps or x['diverged']
      assert np.all(np.diff([e['step'] for e in h]) > 0)
      assert np.all(np.diff([e['train_seconds'] for e in h]) >= 0)
      # First evaluation at or above each target, recomputed here.
      for a in task.targets:
        hits = [
          (e['step'], e['train_seconds']) for e in h if e['test_accuracy'] >= a
        ]
        expected = list(hits[0]) if hits else None
        assert x['to_target'][str(a)] == expected
    finals = [x['final_accuracy'] for x in runs]
    np.testing.assert_allclose(
      r['summary']['final_accuracy_mean'], np.mean(finals)
    )
    np.testing.assert_allclose(
      r['summary']['final_accuracy_std'], np.std(finals, ddof=1)
    )


def test_costs_are_side_by_side(smoke):
  result, _ = smoke
  costs = {n: r['cost'] for n, r in result['optimizers'].items()}
  assert costs['sgd']['ratio_to_sgd'] == 1.0
  for c in costs.values():
    assert c['step_seconds'] > 0
    np.testing.assert_allclose(
      c['ratio_to_sgd'], c['step_seconds'] / costs['sgd']['step_seconds']
    )
  # AdamW keeps two moments, SGD one: state sizes are real measurements.
  assert costs['adamw']['optimizer_state_bytes'] == pytest.approx(
    2 * costs['sgd']['optimizer_state_bytes'], rel=0.01
  )
  assert costs['sgd']['xla_step_bytes']['temporaries'] > 0
  assert costs['kfac']['xla_step_bytes'] is None


def test_report_from_the_json(smoke):
  result, folder = smoke
  with open(os.path.join(folder, 'summary.md')) as f:
    text = f.read()
  for name, r in result['optimizers'].items():
    s = r['summary']
    assert f'| {name} | ' in text
    assert (
      f'{s["final_accuracy_mean"]:.4f} ± {s["final_accuracy_std"]:.4f}' in text
    )
  assert os.path.getsize(os.path.join(folder, 'smoke.png')) > 10_000


def test_band_takes_the_last_evaluation_before_each_time():
  runs = [
    {
      'history': [
        dict(t=0.0, test_accuracy=0.1),
        dict(t=2.0, test_accuracy=0.5),
      ]
    },
    {
      'history': [
        dict(t=0.0, test_accuracy=0.3),
        dict(t=1.0, test_accuracy=0.9),
      ]
    },
  ]
  mean, lo, hi = report._band(runs, 't', np.array([0.0, 1.5, 2.0]))
  np.testing.assert_allclose(lo, [0.1, 0.1, 0.5])
  np.testing.assert_allclose(hi, [0.3, 0.9, 0.9])
  np.testing.assert_allclose(mean, [0.2, 0.5, 0.7])


def test_validation_split_is_the_training_tail():
  data = tasks.subsample(tasks.get('smoke').load(None), 100, 10)
  val = tasks.validation_split(data, 0.2)
  np.testing.assert_array_equal(val.x_train, data.x_train[:80])
  np.testing.assert_array_equal(val.y_test, data.y_train[80:])
  with pytest.raises(ValueError, match='fraction'):
    tasks.validation_split(data, 1.0)


@pytest.mark.parametrize('name', list(optimizers.OPTIMIZERS))
def test_each_optimizer_fits_one_batch(name):
  """60 steps on one batch at the grid's middle rate cut its loss by 20%."""
  spec = optimizers.get(name)
  task = tasks.get('smoke')
  data = tasks.subsample(task.load(None), 64, 8)
  _, trainer, init, (x, y) = protocol.build(
    task,
    spec,
    data,
    spec.learning_rates[len(spec.learning_rates) // 2],
    0,
    1000,
  )
  state = init()
  losses = []
  for _ in range(60):
    state, loss = trainer.step(state, x, y)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses


def test_kfac_adaptive_damping_moves_from_its_start():
  task = tasks.get('smoke')
  data = tasks.subsample(task.load(None), 64, 8)
  _, trainer, init, (x, y) = protocol.build(
    task, optimizers.get('kfac_adaptive'), data, 1e-2, 0, 1000
  )
  state = init()
  assert float(state[2].damping) == pytest.approx(1e-3)
  for _ in range(12):  # two adaptations, at steps 5 and 10
    state, _ = trainer.step(state, x, y)
  damping = float(state[2].damping)
  assert 0 < damping and damping != pytest.approx(1e-3, rel=0.01)


def test_kfac_compat_evaluates_equations_like_jax():
  """The patched helper binds every equation kind to jax's own results."""
  from kfac_jax._src import tag_graph_matcher  # noqa: PLC0415

  kfac_compat.patch()
  assert tag_graph_matcher.eval_jaxpr_eqn is kfac_compat._eval_jaxpr_eqn

  @jax.jit
  def inner(a):
    return jnp.sin(a) @ a.T

  def f(a, b):
    c = jax.nn.relu(inner(a)) + b  # a nested jit (pjit) and a custom_jvp
    return jax.lax.conv_general_dilated(
      c[None, None], jnp.ones((1, 1, 2, 2)), (1, 1), 'SAME'
    )

  a, b = jnp.arange(6.0).reshape(2, 3) / 7, jnp.ones((2, 2))
  closed = jax.make_jaxpr(f)(a, b)
  env = dict(zip(closed.jaxpr.invars, (a, b)))
  for eqn in closed.jaxpr.eqns:
    ins = [
      v.val if isinstance(v, jex.core.Literal) else env[v] for v in eqn.invars
    ]
    for var, val in zip(eqn.outvars, kfac_compat._eval_jaxpr_eqn(eqn, ins)):
      env[var] = val
  np.testing.assert_allclose(env[closed.jaxpr.outvars[0]], f(a, b), rtol=1e-6)


def test_docs_block_is_generated_from_the_committed_results(monkeypatch):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(root)
  folder = os.path.join('benchmarks', 'results', 'cpu')
  page = os.path.join('docs', 'benchmarks.md')
  with open(page) as f:
    text = f.read()
  block = text.split(report.BEGIN)[1].split(report.END)[0]
  assert block.strip() == report.page_block(folder, page).strip()
  assert '../shared' not in block and 'path/to/mnist10k.npz' in block
  assert 'mnist10k' in block and 'mnist1d' in block and 'Step cost' in block


def test_family_pilot_records_every_rate(monkeypatch, tmp_path):
  from benchmarks import family_pilot  # noqa: PLC0415

  monkeypatch.setattr(family_pilot, 'WIDE_GRID', (0.01, 0.1))
  out = tmp_path / 'pilot.json'
  argv = ['--task', 'smoke', '--epochs', '1', '--optimizers', 'kfrog']
  result = family_pilot.main([*argv, '--out', str(out)])
  with open(out) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  trials = result['trials']['kfrog']
  assert [t['learning_rate'] for t in trials] == [0.01, 0.1]
  # The pilot trains on the sweep's held-out split, never on test.
  task = dataclasses.replace(tasks.get('smoke'), num_epochs=1)
  val = tasks.validation_split(task.load(None))
  again = protocol.train_run(task, optimizers.get('kfrog'), val, 0.1, seed=0)
  assert trials[1]['final_accuracy'] == again['final_accuracy']


def test_committed_results_record_no_absolute_paths():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  files = glob.glob(os.path.join(root, 'benchmarks', 'results', '**', '*.json'))
  files += glob.glob(os.path.join(root, 'examples', '*', 'results', '*.json'))
  commands = []
  for path in files:
    with open(path) as f:
      result = json.load(f)
    if isinstance(result, dict) and 'command' in result:
      commands.append(result['command'])
  assert commands
  for command in commands:
    absolute = [a for a in command.split() if a.startswith('/') or '=/' in a]
    assert not absolute, command


def _write_fashion_like(path, num_train=320, num_test=128):
  rng = np.random.default_rng(0)
  np.savez(
    path,
    train_images=rng.integers(0, 256, (num_train, 28, 28), np.uint8),
    train_labels=rng.integers(0, 10, num_train).astype(np.uint8),
    test_images=rng.integers(0, 256, (num_test, 28, 28), np.uint8),
    test_labels=rng.integers(0, 10, num_test).astype(np.uint8),
  )


def test_fashion_task_runs_in_pieces_on_data_of_its_shape(
  tmp_path, monkeypatch
):
  data = tmp_path / 'fashion_mnist.npz'
  _write_fashion_like(data)
  argv = ['--suite', 'smoke', '--tasks', 'fashion_convnet', '--data', str(data)]
  argv += ['--optimizers', 'frog,sgd', '--out', str(tmp_path / 'out')]
  (path,) = run.main(argv)
  with open(path) as f:
    first = json.load(f)
  task = tasks.get('fashion_convnet')
  assert first['targets'] == list(task.targets)
  assert 'not the official test split' in first['description']
  grid = run.SUITES['smoke'].grid_size
  frog = first['optimizers']['frog']
  assert frog['grid'] == list(task.grids['frog'][:grid])  # the task's grid
  assert first['optimizers']['sgd']['grid'] == list(
    optimizers.get('sgd').learning_rates[:grid]
  )
  pieces = os.path.join(os.path.dirname(path), 'pieces', 'fashion_convnet')
  assert sorted(os.listdir(pieces)) == ['frog.json', 'sgd.json']

  # A second call trains nothing: it reuses the pieces, and only the step
  # costs are measured again.
  def no_training(*args, **kwargs):
    raise AssertionError('a finished piece was trained again')

  monkeypatch.setattr(protocol, 'train_run', no_training)
  (path,) = run.main(argv)
  with open(path) as f:
    second = json.load(f)
  for name in ('frog', 'sgd'):
    a, b = first['optimizers'][name], second['optimizers'][name]
    assert a['seed_runs'] == b['seed_runs'] and a['sweep'] == b['sweep']
    assert b['cost']['step_seconds'] > 0


def test_a_task_without_its_data_file_is_skipped(tmp_path, capsys):
  argv = ['--suite', 'smoke', '--tasks', 'fashion_convnet', '--out']
  argv += [str(tmp_path), '--data', str(tmp_path / 'absent.npz')]
  assert run.main(argv) == []
  assert 'skipping fashion_convnet' in capsys.readouterr().out


def _fake_training(monkeypatch, trained, stop_after=None):
  """`protocol.train_run` replaced: logs (lr, 'sweep' or seed) in `trained`.

  Validation accuracy peaks at lr 0.03 and seed runs differ by seed; after
  `stop_after` runs it raises, as an interrupted call would.
  """

  def fake_run(task, spec, data, lr, seed, desc='', final_only=False):
    if stop_after is not None and len(trained) == stop_after:
      raise KeyboardInterrupt
    trained.append((lr, 'sweep' if final_only else seed))
    accuracy = 1.0 - abs(np.log10(lr / 0.03)) if final_only else 0.5 + seed
    return dict(
      learning_rate=lr,
      seed=seed,
      final_accuracy=accuracy,
      diverged=False,
      train_seconds=1.0,
      to_target={str(a): None for a in (0.5,)},
    )

  monkeypatch.setattr(protocol, 'train_run', fake_run)
  monkeypatch.setattr(tasks, 'validation_split', lambda data: data)
  return dataclasses.replace(tasks.get('smoke'), targets=(0.5,))


def test_an_extended_grid_trains_only_its_new_points(monkeypatch):
  trained = []
  task = _fake_training(monkeypatch, trained)
  spec = dataclasses.replace(optimizers.get('sgd'), learning_rates=(0.1, 0.3))
  old = protocol.run_optimizer(task, spec, None, seeds=(0, 1))
  assert old['learning_rate'] == 0.1  # the low edge of the old grid

  # The grid grows downwards: only 0.03 is new, and the pick moves to it,
  # so the seeds train again; the old points are not trained twice.
  trained.clear()
  wider = dataclasses.replace(spec, learning_rates=(0.03, 0.1, 0.3))
  new = protocol.run_optimizer(task, wider, None, (0, 1), previous=old)
  assert trained == [(0.03, 'sweep'), (0.03, 0), (0.03, 1)]
  assert new['sweep']['trials'][1:] == old['sweep']['trials']

  # A third seed at an unchanged pick trains that seed alone.
  trained.clear()
  more = protocol.run_optimizer(task, wider, None, (0, 1, 2), previous=new)
  assert trained == [(0.03, 2)]
  assert more['seed_runs'][:2] == new['seed_runs']

  # Another optimizer's piece (another description) lends nothing.
  trained.clear()
  other = dataclasses.replace(wider, description='something else')
  protocol.run_optimizer(task, other, None, (0,), previous=more)
  assert trained == [(0.03, 'sweep'), (0.1, 'sweep'), (0.3, 'sweep'), (0.03, 0)]


@pytest.mark.parametrize('stop_after', [2, 4])  # in the sweep, in the seeds
def test_an_interrupted_piece_resumes_where_it_stopped(
  monkeypatch, tmp_path, stop_after
):
  grid = (0.01, 0.03, 0.1)
  spec = dataclasses.replace(optimizers.get('sgd'), learning_rates=grid)
  pieces = str(tmp_path)
  trained = []
  task = _fake_training(monkeypatch, trained, stop_after)
  monkeypatch.setattr(protocol, 'step_costs', lambda *args: {})
  with pytest.raises(KeyboardInterrupt):
    protocol.run_task(task, [spec], None, (0, 1), 1, pieces=pieces)
  with open(os.path.join(pieces, 'sgd.json')) as f:
    saved = json.load(f)
  assert saved['unfinished'] and 'summary' not in saved
  before = list(trained)

  trained.clear()
  _fake_training(monkeypatch, trained)
  result = protocol.run_task(task, [spec], None, (0, 1), 1, pieces=pieces)
  everything = [(lr, 'sweep') for lr in grid] + [(0.03, 0), (0.03, 1)]
  assert before + trained == everything  # nothing trained twice
  entry = result['optimizers']['sgd']
  assert 'unfinished' not in entry and entry['learning_rate'] == 0.03
  with open(os.path.join(pieces, 'sgd.json')) as f:
    assert json.load(f) == entry
