"""CIFAR-10 ResNet-18 training: FROG or FROG's own baselines, with resume.

`train_and_evaluate(config, workdir)` writes, under `workdir`:
- `metrics.json`: per epoch the train loss, test accuracy, cumulative train
  seconds (compilation excluded, measured separately) and that epoch's
  evaluation seconds; at the end, the wall-clock to first reach each target
  accuracy. Rewritten after every epoch.
- `checkpoints/`: orbax checkpoints of the training state after every
  `checkpoint_every_epochs` epochs. A run started on a workdir that holds
  one resumes from the latest; batch order and augmentation are functions of
  (seed, step), so a resumed run continues exactly where it stopped.
- `accuracy_vs_time.png`: test accuracy against training wall-clock.
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
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

import frog_optax as fo
from examples.cifar10 import input_pipeline
from harness import record
from harness import resnet
from harness import trainers

OPTIMIZERS = ('frog', 'sgd', 'adamw')


def make_model(config: ml_collections.ConfigDict) -> resnet.ResNet18:
  return resnet.ResNet18(
    num_classes=input_pipeline.NUM_CLASSES,
    stage_features=tuple(config.stage_features),
    blocks_per_stage=config.blocks_per_stage,
    dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
  )


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The original FROG's step schedule: ×0.1 at each of `lr_drop_epochs`."""
  return optax.piecewise_constant_schedule(
    config.learning_rate,
    {int(e * steps_per_epoch): 0.1 for e in config.lr_drop_epochs},
  )


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  if config.optimizer == 'frog':
    return fo.frog(
      schedule,
      momentum=config.momentum,
      weight_decay=config.weight_decay,
      damping=config.damping,
      cg_iters=config.cg_iters,
      exclude=tuple(config.exclude),
      other_lr_ratio=config.other_lr_ratio,
    )
  if config.optimizer == 'sgd':  # torch.optim.SGD: coupled decay, no Nesterov
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum),
    )
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  raise ValueError(
    f'config.optimizer must be one of {OPTIMIZERS}; got {config.optimizer!r}.'
  )


def make_train_step(config, model, tx):
  """`(state, x_train, y_train, indices, key) -> (state, loss)`, jitted.

  The dataset arrays are arguments (not constants baked into the program);
  the state is donated.
  """
  sample_size = config.sample_size if config.optimizer == 'frog' else None
  step = trainers.optax_step(model, tx, sample_size)
  dtype = model.dtype

  def train_step(state, x_train, y_train, indices, key):
    images = input_pipeline.augment(key, x_train[indices])
    x = input_pipeline.normalize(images, dtype)
    return step(state, x, y_train[indices])

  return jax.jit(train_step, donate_argnums=0)


def make_accuracy(model, batch_size: int = 1000):
  @jax.jit
  def correct(params, batch_stats, images, labels):
    x = input_pipeline.normalize(images, model.dtype)
    logits = model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=False
    )
    return jnp.sum(jnp.argmax(logits, -1) == labels)

  def accuracy(state, images, labels):
    params, batch_stats, _ = state
    hits = sum(
      int(
        correct(
          params,
          batch_stats,
          images[i : i + batch_size],
          labels[i : i + batch_size],
        )
      )
      for i in range(0, len(labels), batch_size)
    )
    return hits / len(labels)

  return accuracy


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The batch order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def to_targets(history, targets) -> dict[str, Any]:
  """Train seconds (and epoch) when each target accuracy is first reached."""
  out = {}
  for target in targets:
    hit = next((h for h in history if h['test_accuracy'] >= target), None)
    out[f'{target:.2f}'] = (
      None
      if hit is None
      else dict(epoch=hit['epoch'], seconds=hit['train_seconds'])
    )
  return out


def target_table(metrics) -> str:
  rows = ['| target | epoch | train minutes |', '|---|---|---|']
  for target, hit in metrics['to_target'].items():
    if hit is None:
      rows.append(f'| {target} | never | never |')
    else:
      rows.append(f'| {target} | {hit["epoch"]} | {hit["seconds"] / 60:.2f} |')
  return '\n'.join(rows)


def plot(metrics, path: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  history = metrics['history']
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(
    [h['train_seconds'] / 60 for h in history],
    [h['test_accuracy'] for h in history],
    marker='.',
    label=metrics['config']['optimizer'],
  )
  for target in metrics['config']['target_accuracies']:
    ax.axhline(target, color='grey', lw=0.5, ls=':')
  ax.set(xlabel='training wall-clock (minutes)', ylabel='test accuracy')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _write_json(path, payload):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains `config.optimizer` and evaluates after every epoch.

  Returns:
    The metrics written to `workdir/metrics.json`.
  """
  os.makedirs(workdir, exist_ok=True)
  data = input_pipeline.load(config)
  num_train = int(data.y_train.shape[0])
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f'batch_size {config.batch_size} exceeds the {num_train} training'
      ' examples.'
    )
  model = make_model(config)
  key = jax.random.key(config.seed)
  init_key, augment_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((2, *input_pipeline.IMAGE_SHAPE)))
  tx = make_optimizer(config, learning_rate_schedule(config, steps_per_epoch))
  state = (
    variables['params'],
    variables['batch_stats'],
    tx.init(variables['params']),
  )

  checkpoints = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')),
    options=ocp.CheckpointManagerOptions(max_to_keep=2),
  )
  metrics_path = os.path.join(workdir, 'metrics.json')
  history = []
  start_epoch = checkpoints.latest_step() or 0
  if start_epoch:
    state = checkpoints.restore(
      start_epoch, args=ocp.args.StandardRestore(state)
    )
    with open(metrics_path) as f:
      history = json.load(f)['history'][:start_epoch]
    print(f'resumed from the checkpoint after epoch {start_epoch}')

  train_step = make_train_step(config, model, tx)
  accuracy = make_accuracy(model)
  batch = lambda i: jnp.asarray(np.arange(config.batch_size) + i)
  compile_start = time.perf_counter()
  train_step = train_step.lower(
    state, data.x_train, data.y_train, batch(0), augment_key
  ).compile()
  compile_seconds = time.perf_counter() - compile_start

  metrics = dict(
    record.environment(),
    config=config.to_dict(),
    compile_seconds=compile_seconds,
    history=history,
  )
  train_seconds = history[-1]['train_seconds'] if history else 0.0
  for epoch in range(start_epoch, config.num_epochs):
    order = epoch_order(config.seed, epoch, num_train)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}', leave=False)
    for i in bar:
      indices = order[i * config.batch_size : (i + 1) * config.batch_size]
      step_key = jax.random.fold_in(augment_key, epoch * steps_per_epoch + i)
      state, loss = train_step(
        state, data.x_train, data.y_train, jnp.asarray(indices), step_key
      )
      losses.append(loss)
    train_loss = float(jnp.mean(jnp.stack(losses)))  # waits for the epoch
    train_seconds += time.perf_counter() - start
    eval_start = time.perf_counter()
    test_accuracy = accuracy(state, data.x_test, data.y_test)
    eval_seconds = time.perf_counter() - eval_start
    history.append(
      dict(
        epoch=epoch + 1,
        step=(epoch + 1) * steps_per_epoch,
        train_loss=train_loss,
        test_accuracy=test_accuracy,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
      )
    )
    print(
      f'epoch {epoch + 1}: loss {train_loss:.4f}, test accuracy'
      f' {test_accuracy:.4f}, train {train_seconds:.1f}s'
    )
    metrics['to_target'] = to_targets(history, config.target_accuracies)
    _write_json(metrics_path, metrics)
    last = epoch + 1 == config.num_epochs
    if last or (epoch + 1) % config.checkpoint_every_epochs == 0:
      checkpoints.save(epoch + 1, args=ocp.args.StandardSave(state))
  checkpoints.wait_until_finished()
  checkpoints.close()
  metrics['to_target'] = to_targets(history, config.target_accuracies)
  _write_json(metrics_path, metrics)
  print(target_table(metrics))
  plot(metrics, os.path.join(workdir, 'accuracy_vs_time.png'))
  return metrics
