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
import numpy as np
import optax

import frog_optax as fo
from examples.compare import report
from examples.compare import verdict as verdict_lib
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


def train_one(name, config, data, model, variables, seed):
  """Trains one optimizer from `variables` with batch order `seed`."""
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
    seed=seed,
    eval_every=config.eval_every,
    evaluate=lambda s: accuracy(
      {'params': s[0], 'batch_stats': s[1]}, data.x_test, data.y_test
    ),
    targets=config.target_accuracies,
    desc=f'{name:>6} seed {seed}',
  )
  if run['diverged']:
    print(f'warning: {name} diverged (loss {run["history"][-1]["train_loss"]})')
  return dict(
    seed=seed,
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


def aggregate(runs: list[dict], targets) -> dict[str, Any]:
  """One optimizer over its seeds: accuracy mean ± std, median crossings."""
  mean, std = loop.mean_and_std([r['final_test_accuracy'] for r in runs])
  return dict(
    runs=[
      {k: v for k, v in r.items() if k not in ('step_fn', 'state')}
      for r in runs
    ],
    steps=runs[0]['steps'],
    final_test_accuracy=mean,
    final_test_accuracy_std=std,
    compile_seconds=float(np.median([r['compile_seconds'] for r in runs])),
    to_target={
      str(a): loop.crossings_over_seeds([r['to_target'][str(a)] for r in runs])
      for a in targets
    },
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


ROUTING_TITLE = """Which parameters FROG preconditions (fo.describe):
  route: frog = preconditioned, fallback = the fallback optimizer;
  D: entries per row (the bias counted); samples: (example, location) pairs
  behind each row's Fisher; "rank-deficient": fewer samples than D, so the
  layer is damped by damping + rank_damping·D/samples."""


def frog_routing(model, variables, data, config) -> str:
  """Which parameters FROG preconditions, with a legend (printed, kept)."""
  _, _, stats = fo.linen.value_and_grad(
    make_loss(model), sample_size=config.frog.sample_size, has_aux=True
  )(
    variables['params'],
    variables['batch_stats'],
    jnp.asarray(data.x_train[: config.batch_size]),
    jnp.asarray(data.y_train[: config.batch_size]),
  )
  table = fo.describe(variables['params'], stats, tuple(config.frog.exclude))
  text = f'{ROUTING_TITLE}\n\n```\n{table}\n```'
  print(text)
  return text


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains all optimizers over the seeds; prints the table and verdict.

  Writes `results.json`, `summary.md` (table and verdict) and
  `accuracy_vs_time.png` (accuracy and training loss against wall-clock and
  steps) to `workdir`.
  """
  if config.num_seeds < 1:
    raise ValueError(f'num_seeds must be >= 1, got {config.num_seeds}.')
  data = data_lib.load(config.dataset, config.data_path or None)
  model = models.ConvNet(
    features=tuple(config.features), num_classes=data.num_classes
  )
  seeds = [config.seed + i for i in range(config.num_seeds)]
  # Every optimizer starts from the same initialisation and batch order of
  # each seed.
  inits = {
    seed: model.init(jax.random.key(seed), jnp.asarray(data.x_train[:2]))
    for seed in seeds
  }
  print(f'{data.name}: train {data.x_train.shape}, test {data.x_test.shape}')
  routing = None
  if 'frog' in config.optimizers:
    routing = frog_routing(model, inits[seeds[0]], data, config)

  seed_runs = {name: [] for name in config.optimizers}
  for seed, variables in inits.items():
    for name in config.optimizers:
      seed_runs[name].append(
        train_one(name, config, data, model, variables, seed)
      )
  x = jnp.asarray(data.x_train[: config.batch_size])
  y = jnp.asarray(data.y_train[: config.batch_size])
  first = {name: runs[0] for name, runs in seed_runs.items()}
  results = dict(
    record.environment(),
    config=config.to_dict(),
    num_seeds=len(seeds),
    step_seconds=interleaved_step_times(first, x, y, config.timing_rounds),
    routing=routing,
  )
  results['optimizers'] = {
    name: aggregate(runs, config.target_accuracies)
    for name, runs in seed_runs.items()
  }
  write_outputs(results, workdir)
  return results


def write_outputs(results: dict[str, Any], workdir: str) -> None:
  """Adds the verdict; prints it with the table; writes JSON, table, plot."""
  targets = results['config']['target_accuracies']
  results['verdict'] = verdict_lib.verdict(results, targets)
  text = f'{report.summary_table(results, targets)}\n\n{results["verdict"]}'
  print(text)
  if results.get('routing'):
    text = f'{results["routing"]}\n\n{text}'

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(text + '\n')
  report.plot(results, os.path.join(workdir, 'accuracy_vs_time.png'))
  print(f'wrote {workdir}/results.json, summary.md, accuracy_vs_time.png')
