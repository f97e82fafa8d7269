"""Jitted FROG step vs SGD/AdamW step on the example's conv net, and where
FROG's extra time goes.

All step functions are compiled first, then timed in interleaved rounds in one
process (the median of each), so the ratios are side by side. The breakdown
times FROG's pieces on the captured statistics of one step: capture (the
capture-enabled value_and_grad + SGD update vs the plain SGD step), the trace
normalisation, the CG's forward and weight-gradient (transpose) convolutions,
and the whole per-layer solve.

  python -m benchmarks.step_cost --out=benchmarks/results/step_cost_cpu.json
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import optax

import frog_optax as fo
from examples.compare import models
from examples.compare import train
from frog_optax._src import fisher


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--sample', type=int, default=32)
  p.add_argument('--cg-iters', type=int, default=4)
  p.add_argument('--image', type=int, default=28, help='input height=width')
  p.add_argument('--rounds', type=int, default=20)
  p.add_argument('--out', default='benchmarks/results/step_cost_cpu.json')
  p.add_argument(
    '--skip-rolled',
    action='store_true',
    help='skip the fori_loop CG variant (slow on CPU)',
  )
  return p.parse_args()


def layer_pieces(layer_stats, grads, cg_iters):
  """Zero-argument timers for FROG's pieces on one layer."""
  geom, x, dy = (
    layer_stats.geometry,
    layer_stats.inputs,
    layer_stats.output_grads,
  )
  trace = jax.jit(
    lambda x: fisher.patch_sq_norms(
      geom, x, grads['kernel'].shape, 'bias' in grads
    )
  )
  forward = jax.jit(lambda x, v: fisher.layer_forward(geom, x, v))
  transpose = jax.jit(lambda x, c: fisher.layer_transpose(geom, x, grads)(c))
  solve = jax.jit(
    lambda s, g: fo.precondition_layer(
      s, g, damping=1e-6, cg_iters=cg_iters, eps=1e-10
    )
  )
  return {
    'trace': lambda: trace(x),
    'cg_forward_conv': lambda: forward(x, grads),
    'cg_transpose_conv': lambda: transpose(x, dy),
    'solve_total': lambda: solve(layer_stats, grads),
  }


def main():
  args = parse_args()
  model = models.ConvNet()
  x = jax.random.normal(
    jax.random.key(0), (args.batch, args.image, args.image, 1)
  )
  y = jnp.arange(args.batch) % 10
  variables = model.init(jax.random.key(1), x[:2])
  params, batch_stats = variables['params'], variables['batch_stats']
  loss_fn = train.make_loss(model)
  frog_kw = dict(exclude=('head',), cg_iters=args.cg_iters)
  optimizers = {
    'sgd': ('sgd', optax.sgd(0.1, momentum=0.9, nesterov=True)),
    'adamw': ('adamw', optax.adamw(1e-3)),
    'frog': ('frog', fo.frog(0.1, **frog_kw)),
    # Capture cost alone: the FROG value_and_grad feeding an SGD update.
    'capture_only': (
      'frog',
      fo.frog(
        0.1,
        fallback=optax.sgd(0.1, 0.9),
        exclude=('conv0', 'conv1', 'conv2', 'head'),
      ),
    ),
  }
  if not args.skip_rolled:
    # The CG as a fori_loop (what a traced cg_iters gives): kept to show why
    # the solver unrolls static counts.
    optimizers['frog_rolled_loop'] = (
      'frog',
      optax.inject_hyperparams(fo.frog)(0.1, **frog_kw),
    )
  steps = {}
  for key, (kind, tx) in optimizers.items():
    step = train.make_train_step(model, tx, kind, args.sample)
    state = (params, batch_stats, tx.init(params))
    steps[key] = lambda step=step, state=state: step(state, x, y)
  step_seconds = train.interleaved(steps, args.rounds)

  # Breakdown on the statistics of one step.
  (_, _), grads, stats = jax.jit(
    fo.linen.value_and_grad(loss_fn, sample_size=args.sample, has_aux=True)
  )(params, batch_stats, x, y)
  parts = {
    name: train.interleaved(
      layer_pieces(stats[name], grads[name], args.cg_iters), args.rounds
    )
    for name in ('conv0', 'conv1', 'conv2')
  }
  totals = {
    k: sum(p[k] for p in parts.values()) for k in next(iter(parts.values()))
  }

  model_ratio = 1 + 2 * args.cg_iters * args.sample / (3 * args.batch)
  sgd = step_seconds['sgd']
  result = dict(
    train.environment(),
    setup=dict(
      net='examples.compare.models.ConvNet (32, 64, 64)',
      input=[args.batch, args.image, args.image, 1],
      batch=args.batch,
      sample_size=args.sample,
      cg_iters=args.cg_iters,
      rounds=args.rounds,
    ),
    step_seconds=step_seconds,
    ratio_to_sgd={k: v / sgd for k, v in step_seconds.items()},
    cost_model_ratio=model_ratio,
    breakdown_seconds_per_layer=parts,
    breakdown_seconds_total=dict(
      totals,
      capture=step_seconds['capture_only'] - sgd,
      cg_convs_per_step=args.cg_iters
      * (totals['cg_forward_conv'] + totals['cg_transpose_conv']),
    ),
  )
  print(
    f'B={args.batch} s={args.sample} k={args.cg_iters} '
    f'(cost model {model_ratio:.2f}x)'
  )
  for k, v in step_seconds.items():
    print(f'  {k:>17}: {v * 1e3:8.1f} ms  {v / sgd:5.2f}x SGD')
  print('  breakdown of the extra FROG time (ms per step):')
  for k, v in result['breakdown_seconds_total'].items():
    print(f'    {k:>20}: {v * 1e3:8.2f}')
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.splitext(args.out)[0] + '.png')
  print(f'wrote {args.out}')


def plot(result, path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  names = list(result['step_seconds'])
  a.bar(names, [result['ratio_to_sgd'][n] for n in names])
  a.axhline(
    result['cost_model_ratio'],
    color='k',
    ls='--',
    label=f'cost model {result["cost_model_ratio"]:.2f}x',
  )
  a.set_ylabel('step time / SGD step')
  a.tick_params(axis='x', rotation=20)
  a.legend()
  parts = result['breakdown_seconds_total']
  keys = ['capture', 'trace', 'cg_convs_per_step', 'solve_total']
  b.bar(keys, [parts[k] * 1e3 for k in keys])
  b.set_ylabel('ms per step')
  b.set_title('where FROG spends its extra time')
  s = result['setup']
  fig.suptitle(
    f'B={s["batch"]} s={s["sample_size"]} k={s["cg_iters"]}, '
    f'{result["machine"]["processor"]}'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  main()
