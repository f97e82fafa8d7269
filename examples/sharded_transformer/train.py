"""The character-level transformer with FSDP + tensor-parallel parameters.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python -m examples.sharded_transformer.train --steps 100

A `(data, model)` device mesh: the batch is split over `data`; every kernel
is split along its input axis over `data` (FSDP) and along its output (row)
axis over `model` (tensor parallel), embeddings along their vocabulary over
`data`. FROG's momentum is sharded like the parameters, and each device
solves the row systems of the rows it holds. `jax.jit` does the rest: the
same program runs on one device or on the mesh, with the same result up to
rounding.
"""

import argparse
import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import frog_optax as fo
from examples.char_lm import corpus as corpus_lib
from examples.char_lm import train as char_lm
from harness import sharding


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 100
  mesh_shape: tuple[int, int] = (2, 2)  # (data, model)
  model: char_lm.Config = char_lm.Config(
    steps=100, warmup_steps=10, batch_size=16, length=32, width=64
  )


def make_mesh(mesh_shape, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  needed = int(np.prod(mesh_shape))
  if len(devices) < needed:
    raise ValueError(
      f'mesh_shape {mesh_shape} needs {needed} devices, found'
      f' {len(devices)}; on a CPU set XLA_FLAGS='
      f'--xla_force_host_platform_device_count={needed}.'
    )
  return Mesh(np.array(devices[:needed]).reshape(mesh_shape), ('data', 'model'))


def train(config: Config, corpus: corpus_lib.Corpus, mesh: Mesh | None):
  """Trains `config.steps` steps; on `mesh` when given, else on one device.

  Returns the losses and the final `(params, opt_state)`.
  """
  cfg = dataclasses.replace(
    config.model,
    steps=config.steps,
    warmup_steps=min(config.model.warmup_steps, config.steps // 10),
  )
  model = char_lm.make_model(cfg)
  tx = char_lm.make_optimizer(cfg)
  step = char_lm.make_step(model, tx, cfg)
  batches = corpus_lib.batches(corpus.train, cfg.batch_size, cfg.length, 0)
  inputs, targets = next(batches)
  params = model.init(jax.random.key(cfg.seed), inputs)['params']
  if mesh is None:
    state = (params, tx.init(params))
    step = jax.jit(step)
    place = lambda a: a
  else:
    layouts = fo.linen.layouts(
      char_lm.make_loss(fo.linen.capture(model.apply)), params, inputs, targets
    )
    shardings = sharding.param_shardings(
      params, mesh, fsdp='data', tp='model', layouts=layouts
    )
    params = jax.device_put(params, shardings)
    state = (params, tx.init(params))
    by_batch = NamedSharding(mesh, P('data'))
    place = lambda a: jax.device_put(a, by_batch)
    step = jax.jit(step, donate_argnums=0)
  losses = []
  for _ in range(config.steps):
    state, loss = step(state, place(inputs), place(targets))
    losses.append(float(loss))
    inputs, targets = next(batches)
  return losses, state


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=Config.steps)
  p.add_argument('--max-chars', type=int, default=2_000_000)
  args = p.parse_args(argv)
  config = Config(steps=args.steps)
  corpus = corpus_lib.load(args.max_chars)
  mesh = make_mesh(config.mesh_shape)
  losses, (params, _) = train(config, corpus, mesh)
  kernel = params['blocks']['mlp_in']['kernel']
  print(
    f'mesh {dict(mesh.shape)}: loss {losses[0]:.3f} -> {losses[-1]:.3f};'
    f' blocks/mlp_in/kernel {kernel.shape} sharded as {kernel.sharding.spec}'
  )


if __name__ == '__main__':
  main()
