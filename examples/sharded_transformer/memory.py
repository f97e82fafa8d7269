"""Per-device FROG optimizer memory against the number of devices.

  python -m examples.sharded_transformer.memory \
    --out benchmarks/results/sharded_memory.json

The character-level transformer (width 256, 4 blocks) on meshes of 1, 2, 4
and 8 devices (simulated on a CPU unless XLA_FLAGS or accelerators give
more), its parameters sharded by FSDP (input axes), tensor parallelism (row
axes) or both. For each: the bytes of FROG's state (momentum) held by one
device, measured from its shards, and XLA's memory plan of the compiled
update on one device (arguments, temporaries).
"""

import os

if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import frog_optax as fo  # noqa: E402
from examples.char_lm import train as char_lm  # noqa: E402
from harness import record  # noqa: E402
from harness import sharding  # noqa: E402

MODES = {
  'fsdp': ('data', None),
  'tp': (None, 'model'),
  'fsdp_tp': ('data', 'model'),
}


def _device_bytes(tree, device) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def measure(width, depth, counts):
  cfg = char_lm.Config(width=width, depth=depth, batch_size=8, length=32)
  model = char_lm.make_model(cfg)
  tx = char_lm.make_optimizer(cfg)
  tokens = np.zeros((cfg.batch_size, cfg.length), np.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  loss_fn = char_lm.make_loss(fo.linen.capture(model.apply))
  grad_fn = fo.linen.value_and_grad(loss_fn, sample_size=cfg.sample_size)
  layouts = fo.linen.layouts(loss_fn, params, tokens, tokens)
  _, grads, stats = jax.jit(grad_fn)(params, tokens, tokens)
  update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, frog_stats=st))
  rows = []
  for n in counts:
    for mode, (fsdp, tp) in MODES.items():
      shape = {'fsdp': (n, 1), 'tp': (1, n)}.get(mode)
      if shape is None:
        if n < 4:
          continue
        shape = (2, n // 2)
      devices = np.array(jax.devices()[:n]).reshape(shape)
      mesh = Mesh(devices, ('data', 'model'))
      shard = sharding.param_shardings(
        params, mesh, fsdp=fsdp, tp=tp, layouts=layouts
      )
      p, g = jax.device_put(params, shard), jax.device_put(grads, shard)
      state = tx.init(p)
      plan = update.lower(g, state, p, stats).compile().memory_analysis()
      rows.append(
        dict(
          devices=n,
          mode=mode,
          state_bytes_per_device=_device_bytes(state, devices.flat[0]),
          params_bytes_per_device=_device_bytes(p, devices.flat[0]),
          update_argument_bytes=int(plan.argument_size_in_bytes),
          update_temp_bytes=int(plan.temp_size_in_bytes),
        )
      )
      print(rows[-1])
  return dict(
    model=f'char transformer, width {width}, {depth} blocks',
    parameters=int(sum(v.size for v in jax.tree.leaves(params))),
    rows=rows,
  )


def table(result) -> str:
  lines = [
    f'{result["model"]} ({result["parameters"]:,} parameters):',
    '',
    '| devices | mode | FROG state / device (MiB) | params / device (MiB)'
    ' | update temporaries (MiB) |',
    '|---|---|---|---|---|',
  ]
  mib = lambda b: f'{b / 2**20:.2f}'
  for r in result['rows']:
    lines.append(
      f'| {r["devices"]} | {r["mode"]} | {mib(r["state_bytes_per_device"])}'
      f' | {mib(r["params_bytes_per_device"])}'
      f' | {mib(r["update_temp_bytes"])} |'
    )
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--width', type=int, default=256)
  p.add_argument('--depth', type=int, default=4)
  p.add_argument('--devices', default='1,2,4,8')
  p.add_argument('--out', default='benchmarks/results/sharded_memory.json')
  args = p.parse_args(argv)
  counts = [int(c) for c in args.devices.split(',')]
  result = dict(record.environment(), **measure(args.width, args.depth, counts))
  record.write(result, args.out, table(result))
  return result


if __name__ == '__main__':
  main()
