"""The sweep behind `fo.frog`'s defaults: rank damping and the fallback rate.

Three models a user would bring, each with a layer whose row Fisher is
rank-deficient at s = 16 (so where a fixed small damping is unsafe):

- `wide_head`: two convolutions, then a Dense head on the flattened
  14×14×16 feature map (D = 3137 entries per row, 16 samples);
- `resnet_bn`: a small ResNet (BatchNorm, three stages, global pooling);
- `mlp`: 784-256-256-10 (every layer rank-deficient).

For each, `fo.frog(lr)` as a new user would write it (nothing excluded, the
default fallback for BatchNorm) at three learning rates and three
`rank_damping` values (0 = the old default: damping 1e-3 only); then, with
the head excluded, the default fallback at two `other_lr_ratio`s; and SGD
with momentum at the same learning rates for reference. Every run trains on
the first 80% of the MNIST-10k training split and is scored on the last 20%
(never the test split).

  python -m benchmarks.defaults_sweep --data ../path/to/mnist10k.npz

writes `benchmarks/results/defaults_sweep.json` and `.md`; without the data
file it says so and exits 0.
"""

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import frog_optax as fo
from harness import data as data_lib
from harness import trainers

RESULTS = os.path.join(os.path.dirname(__file__), 'results')
LEARNING_RATES = (0.03, 0.1, 0.3)
RANK_DAMPINGS = (0.0, 0.1, 1.0)
OTHER_LR_RATIOS = (0.25, 1.0)


class WideHead(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    return nn.Dense(10, name='head')(x.reshape(x.shape[0], -1))


class Block(nn.Module):
  features: int
  strides: int

  @nn.compact
  def __call__(self, x, train):
    norm = lambda: nn.BatchNorm(use_running_average=not train)
    y = nn.relu(norm()(nn.Conv(self.features, (3, 3), self.strides)(x)))
    y = norm()(nn.Conv(self.features, (3, 3))(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.features, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNetBN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(
      nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x))
    )
    for features, strides in ((16, 1), (32, 2), (64, 2)):
      x = Block(features, strides)(x, train)
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


class ResNet18(nn.Module):
  """ImageNet-style ResNet-18: 7×7/2 stem, max pool, 64-512 channels.

  On 28×28 inputs its last stage runs at 1×1, so those convolutions see
  n = s samples for D = 2305 entries per row: rank-deficient.
  """

  @nn.compact
  def __call__(self, x, train=True):
    norm = lambda: nn.BatchNorm(use_running_average=not train)
    x = nn.relu(norm()(nn.Conv(64, (7, 7), 2, use_bias=False)(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), 'SAME')
    for i, features in enumerate((64, 128, 256, 512)):
      for j in range(2):
        x = Block(features, 2 if i and not j else 1)(x, train)
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10, name='head')(x)


MODELS = {
  'wide_head': WideHead,
  'resnet_bn': ResNetBN,
  'mlp': MLP,
  'resnet18': ResNet18,
}


def configs(model_name):
  """`(label, optimizer settings)` of every run for one model."""
  if model_name == 'resnet18':  # slow on a CPU: the decisive runs only
    return [
      dict(opt='frog', lr=0.1, rank_damping=0.0),
      dict(opt='frog', lr=0.1, rank_damping=1.0),
      dict(opt='sgd', lr=0.1),
    ]
  out = []
  for lr in LEARNING_RATES:
    for rank_damping in RANK_DAMPINGS:
      out.append(dict(opt='frog', lr=lr, rank_damping=rank_damping))
    for ratio in OTHER_LR_RATIOS:
      out.append(dict(opt='frog', lr=lr, exclude='head', other_lr_ratio=ratio))
    out.append(dict(opt='sgd', lr=lr))
  return out


def make_tx(cfg, steps):
  schedule = optax.cosine_decay_schedule(cfg['lr'], steps)
  if cfg['opt'] == 'sgd':
    return optax.sgd(schedule, momentum=0.9)
  kwargs = {
    k: cfg.get(k) for k in ('rank_damping', 'exclude', 'other_lr_ratio')
  }
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  return fo.frog(schedule, **kwargs)


def run(model, cfg, data, *, steps, batch, sample_size, seed):
  x_train, y_train, x_val, y_val = data
  tx = make_tx(cfg, steps)
  trainer = trainers.optax_trainer(
    model, tx, sample_size if cfg['opt'] == 'frog' else None
  )
  variables = model.init(jax.random.key(seed), x_train[:2])
  state = trainer.init(variables, None, None, None)
  rng = np.random.default_rng(seed)
  losses = []
  start = time.perf_counter()
  for _ in range(steps):
    idx = rng.integers(0, len(y_train), batch)
    state, loss = trainer.step(state, x_train[idx], y_train[idx])
    losses.append(float(loss))
  seconds = time.perf_counter() - start
  v = trainer.variables(state)
  logits = model.apply(
    {'params': v['params'], 'batch_stats': v['batch_stats']},
    x_val,
    train=False,
  )
  val_acc = float(jnp.mean(jnp.argmax(logits, -1) == y_val))
  finite = bool(np.all(np.isfinite(losses)))
  return dict(
    **cfg,
    val_acc=val_acc if finite else 0.0,
    final_loss=float(np.mean(losses[-20:])),
    max_loss=float(np.max(losses)),
    first_loss=losses[0],
    finite=finite,
    seconds=seconds,
  )


def summary(results, meta):
  lines = [
    '# The sweep behind the defaults',
    '',
    f'`{meta["command"]}` on {meta["machine"]}, jax {meta["jax"]}.'
    f' {meta["steps"]} steps, batch {meta["batch"]}, s = {meta["sample_size"]},'
    ' cosine decay; validation = last 20% of the MNIST-10k training split.'
    ' A run whose loss became non-finite scores 0.',
  ]
  for model_name in dict.fromkeys(r['model'] for r in results):
    rows = [r for r in results if r['model'] == model_name]
    lines += [
      '',
      f'## {model_name}',
      '',
      '| optimizer | lr | rank_damping | head | other_lr_ratio | val acc'
      ' | max train loss | final train loss |',
      '|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
      frog = r['opt'] == 'frog'
      head = 'excluded' if r.get('exclude') else 'FROG'
      cells = [
        r['opt'],
        r['lr'],
        r.get('rank_damping', 1.0) if frog else '',
        head if frog else '',
        r.get('other_lr_ratio', 0.25) if frog else '',
        f'{r["val_acc"]:.4f}',
        f'{r["max_loss"]:.3g}',
        f'{r["final_loss"]:.3g}',
      ]
      lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default='../shared/data/mnist10k.npz')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--sample_size', type=int, default=16)
  parser.add_argument(
    '--models', default='wide_head,resnet_bn,mlp', help=f'of {list(MODELS)}'
  )
  parser.add_argument('--out', default=os.path.join(RESULTS, 'defaults_sweep'))
  args = parser.parse_args(argv)
  if not os.path.exists(args.data):
    print(f'{args.data} not found: pass --data path/to/mnist10k.npz; skipped.')
    return None
  ds = data_lib.load('mnist10k', args.data)
  split = int(0.8 * len(ds.y_train))
  data = (
    ds.x_train[:split],
    ds.y_train[:split],
    ds.x_train[split:],
    ds.y_train[split:],
  )
  results = []
  for model_name in args.models.split(','):
    model = MODELS[model_name]()
    for cfg in configs(model_name):
      r = run(
        model,
        cfg,
        data,
        steps=args.steps,
        batch=args.batch,
        sample_size=args.sample_size,
        seed=0,
      )
      r['model'] = model_name
      results.append(r)
      print(json.dumps(r), flush=True)
  meta = dict(
    command='python -m benchmarks.defaults_sweep',
    machine=f'{platform.machine()} CPU, {os.cpu_count()} cores',
    jax=jax.__version__,
    steps=args.steps,
    batch=args.batch,
    sample_size=args.sample_size,
  )
  with open(args.out + '.json', 'w') as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  with open(args.out + '.md', 'w') as f:
    f.write(summary(results, meta))
  return results


if __name__ == '__main__':
  main()
