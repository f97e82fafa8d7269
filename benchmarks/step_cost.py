"""FROG/SGD step-time ratio over batch size B, sample size s and CG
iterations k, against the cost model 1 + 2ks/(3B), and where FROG's extra
time goes.

For each B, every FROG (s, k) step, the SGD step and the AdamW step are
compiled, then timed in interleaved rounds in one process (medians), so the
ratios are side by side. The breakdown, at one (B, s, k), times FROG's
pieces summed over the preconditioned layers: capture (the capture-enabled
step feeding a plain SGD update, minus the SGD step), the trace
normalisation (its windowed sum, and beside it the all-ones convolution
it replaced), the CG's forward and transpose (weight-gradient)
convolutions, and the whole per-layer solve.

  python -m benchmarks.step_cost --width 0.25 \
    --out benchmarks/results/cpu/step_cost_resnet18.json

On CPU the default batches are small (32, 64, 128) with s scaled alike
(4, 8, 16), keeping the s/B ratios of B in {128, 256, 512}, s in
{16, 32, 64} (the cost model depends on ks/B only); the committed CPU run
also narrows the net (`--width 0.25`), since a full-width ResNet-18 step
takes tens of seconds on 2 cores. On a GPU pass
`--batches 128,256,512 --samples 16,32,64`.
"""

import argparse
import functools
import json
import operator
import os

import jax
import jax.numpy as jnp
import optax

import frog_optax as fo
from benchmarks import report
from harness import models as compare_models
from harness import record
from harness import resnet
from harness import timing
from harness import trainers

NETS = {
  'resnet18': ('CIFAR ResNet-18', resnet.ResNet18, (32, 32, 3)),
  'convnet': (
    'harness ConvNet (32, 64, 64)',
    compare_models.ConvNet,
    (28, 28, 1),
  ),
}


def _ints(text):
  return tuple(int(v) for v in text.split(','))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--net', choices=sorted(NETS), default='resnet18')
  p.add_argument('--batches', type=_ints, default=(32, 64, 128))
  p.add_argument('--samples', type=_ints, default=(4, 8, 16))
  p.add_argument('--cg-iters', type=_ints, default=(2, 4, 8))
  p.add_argument(
    '--breakdown',
    type=_ints,
    default=None,
    help='B,s,k of the breakdown (default: the middle of each list)',
  )
  p.add_argument(
    '--width',
    type=float,
    default=1.0,
    help='ResNet-18 channel multiplier (0.25: 16-32-64-128 channels)',
  )
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument(
    '--kfac',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='also time kfac-jax (float32 only)',
  )
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  p.add_argument(
    '--out', default='benchmarks/results/cpu/step_cost_resnet18.json'
  )
  return p.parse_args(argv)


def cost_model(batch, sample_size, cg_iters):
  """FROG/SGD step ratio predicted by the cost model 1 + 2ks/(3B)."""
  return 1 + 2 * cg_iters * sample_size / (3 * batch)


def frog_tx(cg_iters, exclude=('head',), **kw):
  return fo.frog(
    0.01, weight_decay=1e-5, cg_iters=cg_iters, exclude=exclude, **kw
  )


def layer_pieces(layer_stats, grads, cg_iters):
  """Zero-argument timers for FROG's pieces on one layer.

  The stats are cast to the parameters' dtype first, as the solve does.
  """
  dtype = grads['kernel'].dtype
  geom, x, dy = (
    layer_stats.geometry,
    layer_stats.inputs.astype(dtype),
    layer_stats.output_grads.astype(dtype),
  )
  trace = jax.jit(
    lambda x: geom.patch_sq_norms(x, grads['kernel'].shape, 'bias' in grads)
  )
  forward = jax.jit(geom.forward)
  transpose = jax.jit(lambda x, c: geom.transpose(x, grads)(c))
  solve = jax.jit(
    lambda s, g: fo.precondition_layer(
      s, g, damping=1e-3, cg_iters=cg_iters, eps=1e-10
    )
  )
  pieces = {
    'trace': lambda: trace(x),
    'cg_forward_conv': lambda: forward(x, grads),
    'cg_transpose_conv': lambda: transpose(x, dy),
    'solve_total': lambda: solve(layer_stats, grads),
  }
  if isinstance(geom, fo.ConvGeometry):
    # The same patch norms as an all-ones convolution with one output
    # channel per group, the way FROG computed them before the windowed sum.
    groups = geom.feature_group_count
    ones = jnp.ones(grads['kernel'].shape[:-1] + (groups,), dtype)
    trace_as_conv = jax.jit(lambda x: geom.conv(jnp.square(x), ones))
    pieces['trace_as_conv'] = lambda: trace_as_conv(x)
  return pieces


def capture_only_tx(params):
  """FROG's capture and SGD's update: every layer on the SGD fallback.

  The update reads every captured statistic once (a sum, times 0), or XLA
  would drop a capture nothing uses; for floats it does not fold `x * 0`.
  """
  frog = frog_tx(
    1,
    fallback=optax.sgd(0.01, 0.9),
    exclude=tuple(fo.preconditioned_modules(params)),
  )

  def update_fn(updates, state, params=None, *, frog_stats, **extra):
    seen = 0.0 * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(frog_stats))
    updates, state = frog.update(
      updates, state, params, frog_stats=frog_stats, **extra
    )
    return jax.tree.map(lambda u: u + seen.astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(frog.init, update_fn)


def breakdown(model, variables, x, y, batch, sample_size, cg_iters, rounds):
  """Capture cost and FROG's pieces (seconds per step, all layers)."""
  capture_only = capture_only_tx(variables['params'])
  runs = {
    'sgd': optax_run(model, variables, optax.sgd(0.01, 0.9), None, x, y),
    'capture_only': optax_run(
      model, variables, capture_only, sample_size, x, y
    ),
  }
  medians, _, _ = timing.interleaved_steps(runs, x, y, rounds)
  loss_fn = trainers.classification_loss(fo.linen.capture(model.apply))
  (_, _), grads, stats = jax.jit(
    fo.linen.value_and_grad(loss_fn, sample_size=sample_size, has_aux=True)
  )(variables['params'], variables['batch_stats'], x, y)
  totals = {}
  # The layers FROG preconditions (the head is excluded, as in frog_tx).
  for name in fo.preconditioned_modules(variables['params'], ('head',)):
    keys = name.split('/')
    layer_grads = functools.reduce(operator.getitem, keys, grads)
    layer_stats = functools.reduce(operator.getitem, keys, stats)
    times = timing.median_seconds(
      layer_pieces(layer_stats, layer_grads, cg_iters), rounds
    )
    for k, v in times.items():
      totals[k] = totals.get(k, 0.0) + v
  totals['cg_convs_per_step'] = cg_iters * (
    totals['cg_forward_conv'] + totals['cg_transpose_conv']
  )
  totals['capture'] = medians['capture_only'] - medians['sgd']
  return dict(
    batch=batch, sample_size=sample_size, cg_iters=cg_iters, seconds=totals
  )


def optax_run(model, variables, tx, sample_size, x, y):
  """A run for `timing.interleaved_steps`: the jitted step and its state."""
  trainer = trainers.optax_trainer(model, tx, sample_size=sample_size)
  state = trainer.init(jax.tree.map(jnp.array, variables), None, x, y)
  return dict(trainer=trainer, state=state)


def _kfac_run(model, variables, x, y):
  trainer = trainers.kfac_trainer(
    model,
    lambda _: 0.01,
    momentum=0.9,
    damping=1e-3,
    weight_decay=1e-4,
    inverse_update_period=5,
  )
  state = trainer.init(
    jax.tree.map(jnp.array, variables), jax.random.key(2), x, y
  )
  return dict(trainer=trainer, state=state)


def make_model(net: str, width: float, dtype):
  """`(model, title, image shape)` of a `NETS` entry."""
  title, module, shape = NETS[net]
  if net == 'resnet18':
    widths = tuple(int(c * width) for c in (64, 128, 256, 512))
    model = module(num_classes=10, stage_features=widths, dtype=dtype)
    return model, f'{title}, channels {widths}', shape
  return module(num_classes=10, dtype=dtype), title, shape


def main(argv=None):
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  if args.kfac and args.dtype != 'float32':
    raise ValueError('--kfac times kfac-jax in float32 only; pass --no-kfac.')
  model, title, shape = make_model(args.net, args.width, dtype)
  key = jax.random.key(0)
  points, baselines = [], {}
  for batch in args.batches:
    x = jax.random.normal(key, (batch, *shape), dtype)
    y = jnp.arange(batch) % 10
    variables = model.init(jax.random.key(1), x[:2])
    runs = {
      'sgd': optax_run(
        model, variables, optax.sgd(0.1, 0.9, nesterov=True), None, x, y
      ),
      'adamw': optax_run(model, variables, optax.adamw(1e-3), None, x, y),
    }
    for s in args.samples:
      for k in args.cg_iters:
        runs[f'frog_s{s}_k{k}'] = optax_run(
          model, variables, frog_tx(k), s, x, y
        )
    if args.kfac:
      runs['kfac'] = _kfac_run(model, variables, x, y)
    medians, spreads, first = timing.interleaved_steps(runs, x, y, args.rounds)
    sgd = medians['sgd']
    baselines[str(batch)] = {
      name: dict(
        seconds=medians[name],
        mean_seconds=spreads[name]['mean'],
        ratio_to_sgd=medians[name] / sgd,
        mean_ratio_to_sgd=spreads[name]['mean'] / sgd,
      )
      for name in runs
      if not name.startswith('frog')
    }
    for s in args.samples:
      for k in args.cg_iters:
        name = f'frog_s{s}_k{k}'
        points.append(
          dict(
            batch=batch,
            sample_size=s,
            cg_iters=k,
            frog_seconds=medians[name],
            frog_seconds_iqr=spreads[name]['iqr'],
            sgd_seconds=sgd,
            ratio=medians[name] / sgd,
            model_ratio=cost_model(batch, s, k),
            compile_seconds=first[name] - timing.WARMUP_CALLS * medians[name],
          )
        )
        p = points[-1]
        print(
          f'B={batch:4d} s={s:3d} k={k}: FROG/SGD {p["ratio"]:.2f}'
          f' (model {p["model_ratio"]:.2f}), SGD {sgd * 1e3:.0f} ms'
        )
  mid = lambda v: v[len(v) // 2]
  b, s, k = args.breakdown or (
    mid(args.batches),
    mid(args.samples),
    mid(args.cg_iters),
  )
  x = jax.random.normal(key, (b, *shape), dtype)
  y = jnp.arange(b) % 10
  variables = model.init(jax.random.key(1), x[:2])
  parts = breakdown(model, variables, x, y, b, s, k, args.rounds)
  print('breakdown of the extra FROG time (ms per step):')
  for name, v in parts['seconds'].items():
    print(f'  {name:>20}: {v * 1e3:8.1f}')
  result = dict(
    record.environment(),
    kind='step_cost',
    setup=dict(
      net=title,
      image=list(shape),
      dtype=args.dtype,
      rounds=args.rounds,
      frog='fo.frog(0.01, weight_decay=1e-5, damping=1e-3, head excluded)',
    ),
    baselines=baselines,
    points=points,
    breakdown=parts,
  )
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  plot(result, os.path.splitext(args.out)[0] + '.png')
  print(f'wrote {args.out}')
  return result


def plot(result, path=None):
  """Measured vs model ratios and the breakdown; saved, or returned if None."""
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  pts = result['points']
  for k in sorted({p['cg_iters'] for p in pts}):
    sel = [p for p in pts if p['cg_iters'] == k]
    a.scatter(
      [p['model_ratio'] for p in sel], [p['ratio'] for p in sel], label=f'k={k}'
    )
  hi = max(max(p['ratio'] for p in pts), max(p['model_ratio'] for p in pts))
  a.plot([1, hi], [1, hi], 'k--', lw=0.8, label='measured = model')
  a.fill_between(
    [1, hi],
    [0.85, 0.85 * hi],
    [1.15, 1.15 * hi],
    color='grey',
    alpha=0.15,
    label='±15%',
  )
  a.set_xlabel('cost model 1 + 2ks/(3B)')
  a.set_ylabel('measured FROG / SGD step time')
  a.legend()
  a.grid(alpha=0.3)
  parts = result['breakdown']['seconds']
  keys = [
    'capture',
    'trace',
    'trace_as_conv',
    'cg_forward_conv',
    'cg_transpose_conv',
    'cg_convs_per_step',
    'solve_total',
  ]
  b.bar(keys, [parts.get(k, 0.0) * 1e3 for k in keys])
  b.tick_params(axis='x', rotation=25)
  b.set_ylabel('ms per step (all layers)')
  bd = result['breakdown']
  b.set_title(
    f'breakdown at B={bd["batch"]}, s={bd["sample_size"]}, k={bd["cg_iters"]}'
    ' (CG convs: per iteration)'
  )
  fig.suptitle(
    f'{result["setup"]["net"]} {result["setup"]["dtype"]},'
    f' {result["machine"]["processor"]}'
  )
  fig.tight_layout()
  return report.save_or_return(fig, path)


if __name__ == '__main__':
  main()
