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
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import frog_optax as fo
from harness import data as data_lib
from harness import loop
from harness import models
from harness import record
from harness import timing
from harness import trainers


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


def train_one(name, config, data, model, variables):
  """Trains one optimizer; returns its history and summary numbers."""
  steps_per_epoch = len(data.y_train) // config.batch_size
  total_steps = steps_per_epoch * config.num_epochs
  tx = make_optimizer(name, config, total_steps)
  sample_size = config.frog.sample_size if name == 'frog' else None
  step = make_train_step(model, tx, name, sample_size)
  accuracy = loop.make_accuracy(model)
  params, batch_stats = variables['params'], variables['batch_stats']
  state = (params, batch_stats, tx.init(params))

  x0 = jnp.asarray(data.x_train[: config.batch_size])
  y0 = jnp.asarray(data.y_train[: config.batch_size])
  t = time.perf_counter()
  compiled = step.lower(state, x0, y0).compile()
  compile_seconds = time.perf_counter() - t

  run = loop.train(
    compiled,
    state,
    data,
    batch_size=config.batch_size,
    num_epochs=config.num_epochs,
    seed=config.seed,
    eval_every=config.eval_every,
    evaluate=lambda s: accuracy(
      {'params': s[0], 'batch_stats': s[1]}, data.x_test, data.y_test
    ),
    targets=config.target_accuracies,
    desc=f'{name:>6}',
  )
  if run['diverged']:
    print(f'warning: {name} diverged (loss {run["history"][-1]["train_loss"]})')
  return dict(
    history=run['history'],
    compile_seconds=compile_seconds,
    final_test_accuracy=run['final_accuracy'],
    train_seconds=run['train_seconds'],
    steps=total_steps,
    diverged=run['diverged'],
    to_target=run['to_target'],
    step_fn=compiled,
    state=state,
  )


def interleaved_step_times(runs, x, y, rounds):
  """Median jitted step seconds, the optimizers taking turns every round."""
  return timing.median_seconds(
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
  data = data_lib.load(config.dataset, config.data_path or None)
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
    record.environment(),
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
