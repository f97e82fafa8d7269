"""The optimizer registry: what the benchmark compares, and how to build it.

Each entry is a learning-rate grid and a builder `(model, learning-rate
schedule, task) -> Trainer`. Every grid has five points a factor ~3 apart,
the same number of trials each. A first 4-point run had picks at grid
edges, so the grids were extended on those sides (K-FAC's shifted down past
rates that diverged); the report flags any pick still at an edge.
Everything except the learning rate is fixed here, at each method's
customary setting, so the sweep is the only tuning any method gets. Family
members (K-FROG, FOOF, AdaFisher, ...) join with `register`.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import optax

import frog_optax as fo
from benchmarks import tasks as tasks_lib
from benchmarks import trainers

WEIGHT_DECAY = 1e-4
FROG_SAMPLE_SIZE = 32
FROG_CG_ITERS = 4


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One optimizer of the benchmark.

  Attributes:
    name: registry key.
    description: the fixed settings, for the report.
    learning_rates: the sweep grid (the same length for every optimizer).
    build: `(model, schedule, task) -> trainers.Trainer`.
  """

  name: str
  description: str
  learning_rates: tuple[float, ...]
  build: Callable[[nn.Module, optax.Schedule, tasks_lib.Task], trainers.Trainer]


def _frog(model, lr, task):
  tx = fo.frog(
    lr,
    momentum=0.9,
    weight_decay=WEIGHT_DECAY,
    damping=1e-3,
    cg_iters=FROG_CG_ITERS,
    exclude=task.frog_exclude,
    other_lr_ratio=1.0,
  )
  return trainers.optax_trainer(model, tx, sample_size=FROG_SAMPLE_SIZE)


def _sgd(model, lr, task):
  del task
  tx = optax.chain(
    optax.add_decayed_weights(WEIGHT_DECAY),
    optax.sgd(lr, momentum=0.9, nesterov=True),
  )
  return trainers.optax_trainer(model, tx)


def _adamw(model, lr, task):
  del task
  return trainers.optax_trainer(
    model, optax.adamw(lr, weight_decay=WEIGHT_DECAY)
  )


def _muon_dimensions(params):
  """Kernels below the head are orthogonalised as (fan-in, fan-out)."""

  def dims(path, p):
    if p.ndim < 2 or path[0].key == 'head':
      return None  # AdamW, as Muon's authors do for heads and vectors
    return optax.contrib.MuonDimensionNumbers(
      reduction_axis=tuple(range(p.ndim - 1)), output_axis=p.ndim - 1
    )

  return jax.tree_util.tree_map_with_path(dims, params)


def _muon(model, lr, task):
  del task
  tx = optax.contrib.muon(
    lr,
    weight_decay=WEIGHT_DECAY,
    adam_weight_decay=WEIGHT_DECAY,
    muon_weight_dimension_numbers=_muon_dimensions,
  )
  return trainers.optax_trainer(model, tx)


def _kfac(model, lr, task):
  del task
  return trainers.kfac_trainer(
    model,
    lr,
    momentum=0.9,
    damping=1e-3,
    weight_decay=WEIGHT_DECAY,
    inverse_update_period=5,
  )


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
  """Adds `spec` to the registry (its name must be new)."""
  if spec.name in OPTIMIZERS:
    raise ValueError(f'optimizer {spec.name!r} is already registered.')
  OPTIMIZERS[spec.name] = spec
  return spec


register(
  OptimizerSpec(
    'frog',
    f'fo.frog: momentum 0.9, damping 1e-3, s={FROG_SAMPLE_SIZE},'
    f' k={FROG_CG_ITERS}, wd {WEIGHT_DECAY}; head on the fallback SGD at the'
    ' same lr',
    (0.003, 0.01, 0.03, 0.1, 0.3),
    _frog,
  )
)
register(
  OptimizerSpec(
    'sgd',
    f'Nesterov momentum 0.9, coupled wd {WEIGHT_DECAY}',
    (0.01, 0.03, 0.1, 0.3, 1.0),
    _sgd,
  )
)
register(
  OptimizerSpec(
    'adamw',
    f'optax.adamw, decoupled wd {WEIGHT_DECAY}',
    (1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    _adamw,
  )
)
register(
  OptimizerSpec(
    'muon',
    'optax.contrib.muon on conv kernels (fan-in x fan-out), AdamW on the'
    f' head and vectors; wd {WEIGHT_DECAY}',
    (3e-3, 1e-2, 3e-2, 0.1, 0.3),
    _muon,
  )
)
register(
  OptimizerSpec(
    'kfac',
    'kfac_jax.Optimizer: momentum 0.9, damping 1e-3, inverses every 5'
    f' steps, curvature EMA 0.95, l2 {WEIGHT_DECAY}',
    (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    _kfac,
  )
)


def get(name: str) -> OptimizerSpec:
  if name not in OPTIMIZERS:
    raise ValueError(
      f'optimizer must be one of {sorted(OPTIMIZERS)}; got {name!r}.'
    )
  return OPTIMIZERS[name]
