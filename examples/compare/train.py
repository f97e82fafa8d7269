"""FROG vs momentum SGD vs AdamW, side by side on one small conv net.

`train_and_evaluate(config, workdir)` trains every optimizer of
`config.optimizers` from the same initialisation on the same batches, records
test accuracy against steps and against training wall-clock (evaluation
excluded), then measures the jitted step time of each optimizer interleaved
in one process, prints a table and writes `results.json` and
`accuracy_vs_time.png` to `workdir`.
"""

import json
import os
import platform
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import frog_optax as fo
from benchmarks import trainers
from examples.compare import input_pipeline
from examples.compare import models


def make_optimizer(
  name: str, config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """The optimizer `name` with a cosine-decayed learning rate."""
  hp = config[name]
  lr = optax.cosine_decay_schedule(hp.learning_rate, total_steps)
  if name == 'frog':
    return fo.frog(
      lr,
      momentum=hp.momentum,
      weight_decay=hp.weight_decay,
      damping=hp.damping,
      cg_iters=hp.cg_iters,
      exclude=tuple(hp.exclude),
      other_lr_ratio=hp.other_lr_ratio,
    )
  if name == 'sgd':
    return optax.chain(
      optax.add_decayed_weights(hp.weight_decay),
      optax.sgd(lr, momentum=hp.momentum, nesterov=True),
    )
  if name == 'adamw':
    return optax.adamw(lr, weight_decay=hp.weight_decay)
  raise ValueError(f'unknown optimizer {name!r}; known: frog, sgd, adamw')


def make_loss(model):
  """`(params, batch_stats, x, y) -> (loss, batch_stats)` under capture."""
  return trainers.classification_loss(fo.linen.capture(model.apply))


def make_train_step(model, tx, name: str, sample_size: int | None):
  """A jitted `(params, batch_stats, opt_state), x, y -> new, loss` step."""
  return jax.jit(
    trainers.optax_step(model, tx, sample_size if name == 'frog' else None)
  )


def make_eval(model):

  @jax.jit
  def predict(params, batch_stats, x):
    logits = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=False
    )
    return jnp.argmax(logits, -1)

  def accuracy(params, batch_stats, x, y, batch=1000):
    hits = 0
    for i in range(0, len(y), batch):
      pred = predict(params, batch_stats, x[i : i + batch])
      hits += int((np.asarray(pred) == y[i : i + batch]).sum())
    return hits / len(y)

  return accuracy


def epoch_batches(rng, num_examples, batch_size):
  order = rng.permutation(num_examples)
  for i in range(num_examples // batch_size):
    yield order[i * batch_size : (i + 1) * batch_size]


def first_reach(history, target):
  """(step, seconds) of the first evaluation at or above `target`."""
  for h in history:
    if h['test_accuracy'] >= target:
      return h['step'], h['train_seconds']
  return None


def train_one(name, config, data, model, variables):
  """Trains one optimizer; returns its history and summary numbers."""
  steps_per_epoch = len(data.y_train) // config.batch_size
  total_steps = steps_per_epoch * config.num_epochs
  tx = make_optimizer(name, config, total_steps)
  sample_size = config.frog.sample_size if name == 'frog' else None
  step = make_train_step(model, tx, name, sample_size)
  accuracy = make_eval(model)
  params, batch_stats = variables['params'], variables['batch_stats']
  state = (params, batch_stats, tx.init(params))

  rng = np.random.default_rng(config.seed)
  x0 = jnp.asarray(data.x_train[: config.batch_size])
  y0 = jnp.asarray(data.y_train[: config.batch_size])
  t = time.perf_counter()
  compiled = step.lower(state, x0, y0).compile()
  compile_seconds = time.perf_counter() - t

  history = [
    dict(
      step=0,
      train_seconds=0.0,
      train_loss=None,
      test_accuracy=accuracy(params, batch_stats, data.x_test, data.y_test),
    )
  ]
  train_seconds, count = 0.0, 0
  with tqdm(total=total_steps, desc=f'{name:>6}', leave=True) as bar:
    for _ in range(config.num_epochs):
      for idx in epoch_batches(rng, len(data.y_train), config.batch_size):
        t = time.perf_counter()
        state, loss = compiled(
          state, jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
        )
        loss = float(loss)  # waits for the step
        train_seconds += time.perf_counter() - t
        count += 1
        bar.update(1)
        if count % config.eval_every == 0 or count == total_steps:
          acc = accuracy(state[0], state[1], data.x_test, data.y_test)
          history.append(
            dict(
              step=count,
              train_seconds=train_seconds,
              train_loss=loss,
              test_accuracy=acc,
            )
          )
          bar.set_postfix(loss=f'{loss:.3f}', test_acc=f'{acc:.4f}')
  if not np.isfinite(history[-1]['train_loss']):
    print(f'warning: {name} diverged (loss {history[-1]["train_loss"]})')
  return dict(
    history=history,
    compile_seconds=compile_seconds,
    final_test_accuracy=history[-1]['test_accuracy'],
    train_seconds=train_seconds,
    steps=total_steps,
    to_target={
      str(a): first_reach(history, a) for a in config.target_accuracies
    },
    step_fn=compiled,
    state=state,
  )


def interleaved(fns, rounds):
  """Median seconds of each zero-argument function, taking turns per round.

  Each function runs once untimed first (compilation, first-call costs).
  """
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def interleaved_step_times(runs, x, y, rounds):
  """Median jitted step seconds, the optimizers taking turns every round."""
  return interleaved(
    {
      name: lambda run=run: run['step_fn'](run['state'], x, y)
      for name, run in runs.items()
    },
    rounds,
  )


def summary_table(results, targets) -> str:
  names = list(results['optimizers'])
  base = results['step_seconds'].get('sgd')
  header = (
    ['optimizer', 'final test acc']
    + [f'to {a:.0%}: steps / s' for a in targets]
    + ['step ms', 'vs SGD', 'compile s']
  )
  rows = [header]
  for name in names:
    r = results['optimizers'][name]
    cells = [name, f'{r["final_test_accuracy"]:.4f}']
    for a in targets:
      hit = r['to_target'][str(a)]
      cells.append('never' if hit is None else f'{hit[0]} / {hit[1]:.1f}')
    ms = results['step_seconds'][name] * 1e3
    cells += [
      f'{ms:.1f}',
      f'{results["step_seconds"][name] / base:.2f}x' if base else '-',
      f'{r["compile_seconds"]:.1f}',
    ]
    rows.append(cells)
  lines = ['| ' + ' | '.join(row) + ' |' for row in rows]
  lines.insert(1, '|' + '---|' * len(header))
  return '\n'.join(lines)


def plot(results, path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in results['optimizers'].items():
    h = r['history']
    acc = [e['test_accuracy'] for e in h]
    ax_t.plot([e['train_seconds'] for e in h], acc, label=name)
    ax_s.plot([e['step'] for e in h], acc, label=name)
  lo = min(results['config']['target_accuracies']) - 0.05
  for ax, xlabel in (
    (ax_t, 'training wall-clock (s, eval excluded)'),
    (ax_s, 'steps'),
  ):
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('test accuracy')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(
    f'{results["config"]["dataset"]}: test accuracy '
    f'({results["machine"]["processor"]})'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def environment() -> dict[str, Any]:
  return dict(
    # Relative to the working directory: no machine-specific paths.
    command=' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    machine=dict(
      platform=platform.platform(),
      processor=f'{jax.devices()[0].device_kind} ({os.cpu_count()} cores)',
      backend=jax.default_backend(),
    ),
    versions=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      optax=optax.__version__,
      flax=flax.__version__,
      frog_optax=fo.__version__,
    ),
  )


def print_frog_routing(model, variables, data, config):
  """Shows which parameters FROG preconditions (fo.describe)."""
  _, _, stats = fo.linen.value_and_grad(
    make_loss(model), sample_size=config.frog.sample_size, has_aux=True
  )(
    variables['params'],
    variables['batch_stats'],
    jnp.asarray(data.x_train[: config.batch_size]),
    jnp.asarray(data.y_train[: config.batch_size]),
  )
  print(fo.describe(variables['params'], stats, tuple(config.frog.exclude)))


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains all optimizers, prints the table, writes JSON and a plot."""
  data = input_pipeline.load(config.dataset, config.data_path or None)
  model = models.ConvNet(
    features=tuple(config.features), num_classes=data.num_classes
  )
  variables = model.init(
    jax.random.key(config.seed), jnp.asarray(data.x_train[:2])
  )
  print(f'{data.name}: train {data.x_train.shape}, test {data.x_test.shape}')
  if 'frog' in config.optimizers:
    print_frog_routing(model, variables, data, config)

  runs = {
    name: train_one(name, config, data, model, variables)
    for name in config.optimizers
  }
  x = jnp.asarray(data.x_train[: config.batch_size])
  y = jnp.asarray(data.y_train[: config.batch_size])
  results = dict(
    environment(),
    config=config.to_dict(),
    step_seconds=interleaved_step_times(runs, x, y, config.timing_rounds),
  )
  results['optimizers'] = {
    name: {k: v for k, v in run.items() if k not in ('step_fn', 'state')}
    for name, run in runs.items()
  }

  table = summary_table(results, config.target_accuracies)
  print(table)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(table + '\n')
  plot(results, os.path.join(workdir, 'accuracy_vs_time.png'))
  print(f'wrote {workdir}/results.json, summary.md, accuracy_vs_time.png')
  return results
