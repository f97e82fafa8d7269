"""FROG data-parallel: the batch sharded over every device of a mesh.

Parameters and optimizer state are replicated; the global batch is split
along its first axis. FROG's capture takes strided sample rows, which stay
on their device, so the only cross-device traffic FROG adds is reductions of
parameter-sized arrays (Fisher traces, CG inner products), next to the usual
gradient all-reduce. Requires `sample_size` to divide the global batch and
the number of devices to divide `sample_size`.

Multi-host: call `jax.distributed.initialize()` first on every host; build
the mesh over `jax.devices()` (all hosts' devices); each process loads its
own slice of the global batch and assembles the global array with
`jax.make_array_from_process_local_data(batch_sharding, local_batch)`. The
step below is unchanged.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import frog_optax as fo
from harness import data as data_lib
from harness import models
from harness import trainers


@dataclasses.dataclass(frozen=True)
class Config:
  steps: int = 200
  batch_size: int = 128
  sample_size: int = 32
  learning_rate: float = 0.05
  seed: int = 0
  dtype: str = 'float32'  # activations and compute; parameters stay float32


def check_divisibility(config: Config, num_devices: int) -> None:
  if config.batch_size % config.sample_size:
    raise ValueError(
      f'sample_size ({config.sample_size}) must divide batch_size'
      f' ({config.batch_size}) so that the strided rows stay on their device.'
    )
  if config.sample_size % num_devices:
    raise ValueError(
      f'the {num_devices} devices must divide sample_size'
      f' ({config.sample_size}): each device keeps its share of the rows.'
    )


def make_model(config: Config) -> models.ConvNet:
  return models.ConvNet(
    num_classes=10, features=(16, 32, 32), dtype=jnp.dtype(config.dtype)
  )


def train(config: Config, devices=None):
  """Trains the main job's conv net on digits; returns losses and state."""
  devices = jax.devices() if devices is None else devices
  check_divisibility(config, len(devices))
  mesh = Mesh(np.array(devices), ('batch',))
  replicated = NamedSharding(mesh, PartitionSpec())
  by_batch = NamedSharding(mesh, PartitionSpec('batch'))

  data = data_lib.load('digits')
  model = make_model(config)
  x_all = np.asarray(data.x_train, np.float32)
  y_all = np.asarray(data.y_train)
  variables = model.init(jax.random.key(config.seed), x_all[:2])
  tx = fo.frog(
    optax.cosine_decay_schedule(config.learning_rate, config.steps),
    exclude='head',
    other_lr_ratio=1.0,
    mu_dtype=jnp.float32,
  )
  state = jax.device_put(
    (
      variables['params'],
      variables['batch_stats'],
      tx.init(variables['params']),
    ),
    replicated,
  )
  step = jax.jit(
    trainers.optax_step(model, tx, sample_size=config.sample_size),
    in_shardings=(replicated, by_batch, by_batch),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  rng = np.random.default_rng(config.seed)
  losses = []
  for _ in range(config.steps):
    idx = rng.choice(len(y_all), config.batch_size, replace=False)
    x = jax.device_put(x_all[idx].astype(config.dtype), by_batch)
    y = jax.device_put(y_all[idx], by_batch)
    state, loss = step(state, x, y)
    losses.append(float(loss))
  params, batch_stats, _ = state
  logits = model.apply(
    {'params': params, 'batch_stats': batch_stats},
    jnp.asarray(data.x_test, config.dtype),
    train=False,
  )
  accuracy = float((logits.argmax(-1) == jnp.asarray(data.y_test)).mean())
  return losses, accuracy, state
