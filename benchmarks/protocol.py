"""The benchmark protocol for one task.

1. Sweep: every optimizer trains once per learning rate of its grid (seed
   0) on the training split minus a held-out validation split, and keeps
   the learning rate with the best final validation accuracy.
2. Seeds: every optimizer trains at its chosen learning rate with each seed
   (initialisation and batch order) on the full training split, evaluated on
   the test split.
3. Cost: the jitted step of each optimizer, timed interleaved in this
   process on one batch (medians), its compile time and memory.

Training wall-clock counts steps only: compilation happens in a warm-up
before the clock starts, and evaluation is excluded.

A long task runs in pieces: with a `pieces` folder, each optimizer's sweep
and seeds are written there after each run and reused by a later call, so
an interrupted call resumes where it stopped, and a grid extended
by a point trains only that point (and the seeds, if the pick moves); the
step costs are always measured afresh, all optimizers interleaved in one
process.
"""

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import tasks as tasks_lib
from harness import loop
from harness import timing


def _batch(data, idx):
  return jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])


def build(task, spec, data, learning_rate, seed, total_steps):
  """Model, trainer and initial state of one run."""
  model = task.make_model(data.num_classes)
  x, y = _batch(data, np.arange(task.batch_size))
  variables = model.init(jax.random.key(seed), x[:2])
  schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
  trainer = spec.build(model, schedule, task)
  # A fresh copy per call: steps donate their state, and the warm-up state
  # must not delete the arrays the real run starts from.
  init = lambda: trainer.init(
    jax.tree.map(jnp.array, variables), jax.random.key(seed + 1), x, y
  )
  return model, trainer, init, (x, y)


def train_run(task, spec, data, learning_rate, seed, desc='', final_only=False):
  """One training run; returns its history and summary numbers.

  `final_only` evaluates only before the first and after the last step
  (the sweep compares final accuracies only).
  """
  steps_per_epoch = len(data.y_train) // task.batch_size
  total_steps = steps_per_epoch * task.num_epochs
  model, trainer, init, (x, y) = build(
    task, spec, data, learning_rate, seed, total_steps
  )
  accuracy = loop.make_accuracy(model)

  warm = init()
  t = time.perf_counter()
  for _ in range(timing.WARMUP_CALLS):
    warm, loss = trainer.step(warm, x, y)
  jax.block_until_ready(loss)
  warmup_seconds = time.perf_counter() - t
  del warm

  run = loop.train(
    trainer.step,
    init(),
    data,
    batch_size=task.batch_size,
    num_epochs=task.num_epochs,
    seed=seed,
    eval_every=total_steps if final_only else task.eval_every,
    evaluate=lambda state: accuracy(
      trainer.variables(state), data.x_test, data.y_test
    ),
    targets=task.targets,
    desc=desc,
  )
  return dict(
    learning_rate=learning_rate,
    seed=seed,
    history=run['history'],
    diverged=run['diverged'],
    final_accuracy=run['final_accuracy'],
    train_seconds=run['train_seconds'],
    warmup_seconds=warmup_seconds,
    to_target=run['to_target'],
  )


def sweep(task, spec, data, finished=(), on_trial=None):
  """Learning-rate sweep on the validation split; returns trials and pick.

  `finished` holds trials of an earlier sweep of the same optimizer: a
  learning rate found there is not trained again. `on_trial`, when given,
  is called with the trials so far after each one that trains.
  """
  val = tasks_lib.validation_split(data)
  done = {t['learning_rate']: t for t in finished}
  trials = []
  for lr in spec.learning_rates:
    trial = done.get(lr)
    if trial is None:
      run = train_run(
        task,
        spec,
        val,
        lr,
        seed=0,
        desc=f'{spec.name} lr={lr:g}',
        final_only=True,
      )
      trial = {
        k: run[k] for k in ('learning_rate', 'final_accuracy', 'diverged')
      }
      trials.append(trial)
      if on_trial:
        on_trial(list(trials))
    else:
      trials.append(trial)
  scores = [t['final_accuracy'] for t in trials]
  best = int(np.argmax(scores))
  return dict(
    trials=trials,
    chosen_learning_rate=spec.learning_rates[best],
    chosen_at_grid_edge=best in (0, len(scores) - 1),
  )


def _tree_bytes(tree) -> int:
  return int(
    sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, 'nbytes'))
  )


def step_costs(task, specs, data, learning_rates, rounds):
  """Interleaved step time, compile time and memory of each optimizer.

  Every optimizer keeps stepping its own state on one batch; the rounds
  take turns so machine noise hits all of them alike.
  """
  runs = {}
  for spec in specs:
    _, trainer, init, (x, y) = build(
      task, spec, data, learning_rates[spec.name], 0, 1000
    )
    state = init()
    variables_bytes = _tree_bytes(trainer.variables(state))
    runs[spec.name] = dict(
      trainer=trainer,
      state=state,
      state_bytes=_tree_bytes(state) - variables_bytes,
    )
  medians, spreads, first_calls = timing.interleaved_steps(runs, x, y, rounds)
  out = {}
  for name, run in runs.items():
    out[name] = dict(
      step_seconds=medians[name],
      step_seconds_mean=spreads[name]['mean'],
      step_seconds_iqr=spreads[name]['iqr'],
      compile_seconds=first_calls[name] - timing.WARMUP_CALLS * medians[name],
      optimizer_state_bytes=run['state_bytes'],
      xla_step_bytes=xla_bytes(run['trainer'], run['state'], x, y),
    )
  base = out.get('sgd', {}).get('step_seconds')
  for r in out.values():
    r['ratio_to_sgd'] = r['step_seconds'] / base if base else None
  return out


def xla_bytes(trainer, state, x, y) -> dict[str, int] | None:
  """XLA's memory plan of a jitted step (None for kfac-jax's own step)."""
  if not hasattr(trainer.step, 'lower'):
    return None
  stats = trainer.step.lower(state, x, y).compile().memory_analysis()
  if stats is None:
    return None
  return dict(
    arguments=int(stats.argument_size_in_bytes),
    outputs=int(stats.output_size_in_bytes),
    temporaries=int(stats.temp_size_in_bytes),
  )


def aggregate(seed_runs, targets) -> dict[str, Any]:
  """Mean ± std of the final accuracy and the per-target crossings."""
  mean, std = loop.mean_and_std([r['final_accuracy'] for r in seed_runs])
  return dict(
    final_accuracy_mean=mean,
    final_accuracy_std=std,
    train_seconds_mean=float(np.mean([r['train_seconds'] for r in seed_runs])),
    to_target={
      str(a): loop.crossings_over_seeds(
        [r['to_target'][str(a)] for r in seed_runs]
      )
      for a in targets
    },
  )


def run_optimizer(
  task, spec, data, seeds, learning_rate=None, previous=None, save=None
):
  """One optimizer's sweep (unless `learning_rate` is given) and seeds.

  `previous` is an earlier entry of the same optimizer (same description)
  on another grid or seeds, or one left unfinished: its sweep points on
  the new grid are reused, and so are its seed runs at the learning rate
  chosen now. `save`, when given, is called with the unfinished entry
  (marked `'unfinished': True`) after each run that trains, so that an
  interrupted call loses one run at most.
  """
  entry = dict(description=spec.description, grid=list(spec.learning_rates))
  entry['unfinished'] = True
  reusable = previous if _same_optimizer(previous, spec) else {}

  def keep_trials(trials):
    entry['sweep'] = dict(trials=trials)
    if save:
      save(entry)

  if learning_rate is None:
    finished = (reusable.get('sweep') or {}).get('trials', ())
    entry['sweep'] = sweep(task, spec, data, finished, keep_trials)
    learning_rate = entry['sweep']['chosen_learning_rate']
  else:
    entry['sweep'] = None
  entry['learning_rate'] = learning_rate
  done = {}
  if reusable.get('learning_rate') == learning_rate:
    done = {r['seed']: r for r in reusable['seed_runs']}
  entry['seed_runs'] = []
  for seed in seeds:
    run = done.get(seed)
    if run is None:
      run = train_run(
        task, spec, data, learning_rate, seed, desc=f'{spec.name} seed {seed}'
      )
      entry['seed_runs'].append(run)
      if save:
        save(entry)
    else:
      entry['seed_runs'].append(run)
  del entry['unfinished']
  entry['summary'] = aggregate(entry['seed_runs'], task.targets)
  return entry


def _write_piece(folder, path, entry):
  os.makedirs(folder, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(entry, f, indent=1)


def _same_optimizer(entry, spec) -> bool:
  return bool(entry) and entry['description'] == spec.description


def _piece_matches(entry, spec, seeds) -> bool:
  """A saved piece is reused whole only for the same grid and seeds."""
  return (
    _same_optimizer(entry, spec)
    and not entry.get('unfinished')
    and entry['grid'] == list(spec.learning_rates)
    and [r['seed'] for r in entry['seed_runs']] == list(seeds)
  )


def run_task(
  task, specs, data, seeds, timing_rounds, learning_rates=None, pieces=None
):
  """Sweep (unless `learning_rates` is given), seeds, costs: the task's JSON.

  Args:
    task: the task.
    specs: the optimizers.
    data: the task's data.
    seeds: seeds of the final runs.
    timing_rounds: rounds of the interleaved step timer.
    learning_rates: `{optimizer: rate}` that skip the sweep.
    pieces: a folder for one JSON per optimizer, written after each run
      and reused when finished (same grid and seeds), so that a long task
      runs over several calls. A piece on another grid or seeds, or one
      left unfinished, lends its finished sweep points and seed runs (see
      `run_optimizer`).
  """
  result = dict(task=task.name, description=task.description, optimizers={})
  for spec in specs:
    path = pieces and os.path.join(pieces, f'{spec.name}.json')
    entry = previous = None
    if path and os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
      if _piece_matches(previous, spec, seeds):
        entry = previous
    if entry is None:
      entry = run_optimizer(
        task,
        spec,
        data,
        seeds,
        (learning_rates or {}).get(spec.name),
        previous,
        save=path and functools.partial(_write_piece, pieces, path),
      )
      if path:
        _write_piece(pieces, path, entry)
    result['optimizers'][spec.name] = entry
    print(
      f'{task.name} {spec.name}: lr {entry["learning_rate"]:g}, test accuracy'
      f' {entry["summary"]["final_accuracy_mean"]:.4f}'
      f' ± {entry["summary"]["final_accuracy_std"]:.4f}'
    )
  chosen = {n: e['learning_rate'] for n, e in result['optimizers'].items()}
  costs = step_costs(task, specs, data, chosen, timing_rounds)
  for name, c in costs.items():
    result['optimizers'][name]['cost'] = c
  return result
