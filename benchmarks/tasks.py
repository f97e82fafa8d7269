"""The benchmark tasks: real data that needs no download, and their nets.

A task fixes the data, the network, the batch size, the training length, the
evaluation cadence and the target accuracies; every optimizer runs it the
same way. `validation_split` carves the held-out split on which the
learning-rate sweep chooses, so the test split is only used for the final
seeded runs.
"""

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping

import flax.linen as nn

from harness import data as data_lib
from harness import models
from harness import resnet

# Where the data files lie beside a checkout of this project (the benchmark
# defaults; `--data` overrides them).
MNIST10K_FILE = '../shared/data/mnist10k.npz'
FASHION_MNIST_FILE = '../shared/data/fashion_mnist.npz'
FASHION_NOTE = (
  "Fashion-MNIST's 70k images with the data file's own split (60k train /"
  ' 10k test, 1,000 test images per class): not the official test split'
)
FASHION_TARGETS = (0.85, 0.88, 0.90, 0.92)
# FROG's registry grid topped out at its edge (0.3) on the conv net's first
# sweep here: the grid moves up by two points, still five a factor ~3 apart.
_FASHION_FROG_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
# K-FROG and FOOF picked their registry grids' top (1.0): one point above.
_FASHION_FAMILY_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FASHION_GRIDS = {
  'frog': _FASHION_FROG_GRID,
  'frog_s16': _FASHION_FROG_GRID,
  'kfrog': _FASHION_FAMILY_GRID,
  'foof': _FASHION_FAMILY_GRID,
}
# A ResNet-20 run costs ~4x the conv net's on 2 CPU cores: a factor ~3
# apart, four or five points. The first grids started at a third of each
# conv-net pick and every pick fell on their low edge, so each grid runs one
# point lower (the pieces keep the points already trained), and the
# optimizers not yet run start a factor 3-10 below their conv-net pick.
# FROG's pick fell on the low edge three times: its grid has a seventh
# point below.
RESNET20_GRIDS = {
  'frog': (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
  # Around frog's flat top (0.01-0.1), one point below it.
  'frog_s16': (0.003, 0.01, 0.03, 0.1),
  'sgd': (0.03, 0.1, 0.3, 1.0, 3.0),
  'adamw': (0.001, 0.003, 0.01, 0.03),
  'muon': (0.003, 0.01, 0.03, 0.1, 0.3),
  'kfrog': (0.1, 0.3, 1.0, 3.0),
  'foof': (0.1, 0.3, 1.0, 3.0),
  'kfac': (0.0003, 0.001, 0.003, 0.01),
  'kfac_adaptive': (0.0003, 0.001, 0.003, 0.01),  # as kfac's
}


class ConvBase1D(nn.Module):
  """MNIST-1D's ConvBase (Greydanus 2020): three 25-channel convs, stride 2.

  The 1-D convolutions are written as 2-D convolutions over a height-1
  image (kernel `(1, k)`), which is the same function with the same
  parameter count: kfac-jax only recognises 2-D convolutions, and every
  optimizer must see the same network.
  """

  channels: int = 25
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no batch statistics
    x = x[:, None]  # (B, L, C) -> (B, 1, L, C)
    for i, width in enumerate((5, 3, 3)):
      x = nn.Conv(
        self.channels,
        (1, width),
        strides=(1, 2),
        padding=((0, 0), (1, 1)),
        name=f'conv{i}',
      )(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes, name='head')(x.reshape(len(x), -1))


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark task.

  Attributes:
    name: registry key.
    description: one line for the report.
    dataset: `harness.data` dataset name.
    make_model: `num_classes -> nn.Module`; the module's `__call__` takes
      `(x, train)` and may keep `batch_stats`.
    batch_size: training batch.
    num_epochs: passes over the training split.
    eval_every: steps between test evaluations (not counted in wall-clock).
    targets: test accuracies whose first crossing is reported.
    frog_exclude: module paths FROG leaves to its fallback (rank-deficient
      heads: the sample size is smaller than their input width).
    data_file: the default data file of a file dataset.
    grids: `{optimizer: learning rates}` that replace the registry's grids
      on this task (where its picks fell at a grid edge).
  """

  name: str
  description: str
  dataset: str
  make_model: Callable[[int], nn.Module]
  batch_size: int
  num_epochs: int
  eval_every: int
  targets: tuple[float, ...]
  frog_exclude: tuple[str, ...] = ('head',)
  data_file: str | None = None
  grids: Mapping[str, tuple[float, ...]] = dataclasses.field(
    default_factory=dict
  )

  def load(self, data_path: str | None) -> data_lib.Dataset:
    """The task's data from `data_path`, or from its default file."""
    return data_lib.load(self.dataset, data_path or self.data_file)


def validation_split(
  data: data_lib.Dataset, fraction: float = 0.2
) -> data_lib.Dataset:
  """The training split's last `fraction` held out as the evaluation split.

  The sweep chooses hyper-parameters on this; the test split stays unseen.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be in (0, 1); got {fraction}.')
  cut = int(round(len(data.y_train) * (1.0 - fraction)))
  return data_lib.Dataset(
    f'{data.name}-validation',
    data.x_train[:cut],
    data.y_train[:cut],
    data.x_train[cut:],
    data.y_train[cut:],
  )


def subsample(
  data: data_lib.Dataset, num_train: int, num_test: int
) -> data_lib.Dataset:
  """The first examples of each split (the smoke suite's tiny data)."""
  return dataclasses.replace(
    data,
    x_train=data.x_train[:num_train],
    y_train=data.y_train[:num_train],
    x_test=data.x_test[:num_test],
    y_test=data.y_test[:num_test],
  )


def _fashion_task(name: str, net: str, make_model, grids=FASHION_GRIDS) -> Task:
  """One epoch of Fashion-MNIST at batch 128 for the net `make_model`."""
  return Task(
    name=name,
    description=f'{FASHION_NOTE}; {net}',
    dataset='fashion_mnist',
    make_model=make_model,
    batch_size=128,
    num_epochs=1,
    eval_every=40,
    targets=FASHION_TARGETS,
    data_file=FASHION_MNIST_FILE,
    grids=grids,
  )


TASKS = {
  'mnist10k': Task(
    name='mnist10k',
    description=(
      'MNIST-10k (8k train / 2k test), conv(16)-BN-relu, conv(32, s2)-BN-relu,'
      ' conv(32, s2)-BN-relu, linear head on the flattened 7x7x32 map'
    ),
    dataset='mnist10k',
    make_model=lambda n: models.ConvNet((16, 32, 32), n, pool=False),
    batch_size=256,
    num_epochs=10,
    eval_every=10,
    targets=(0.97, 0.98, 0.99),
    data_file=MNIST10K_FILE,
  ),
  # Time to accuracy on real data where optimizers separate: the main job's
  # conv-BN net and a ResNet-20, one epoch each (a ResNet-20 step costs
  # ~0.5 s on 2 CPU cores).
  'fashion_convnet': _fashion_task(
    'fashion_convnet',
    'conv(32)-BN-relu, conv(64, s2)-BN-relu, conv(64, s2)-BN-relu, global'
    ' average pool, linear head',
    lambda n: models.ConvNet((32, 64, 64), n),
  ),
  'fashion_resnet20': _fashion_task(
    'fashion_resnet20',
    'ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels, BatchNorm,'
    ' 1x1 projection shortcuts)',
    lambda n: resnet.ResNet20(num_classes=n),
    RESNET20_GRIDS,
  ),
  'mnist1d': Task(
    name='mnist1d',
    description=(
      'MNIST-1D (8k train / 2k test, generated locally), ConvBase: three'
      ' 25-channel stride-2 convs + linear head'
    ),
    dataset='mnist1d',
    make_model=lambda n: ConvBase1D(num_classes=n),
    batch_size=128,
    num_epochs=40,
    eval_every=50,
    targets=(0.85, 0.90, 0.93),
  ),
  # The harness's own test: seconds on CPU, not a benchmark.
  'smoke': Task(
    name='smoke',
    description='sklearn digits, 2 epochs of a 4-channel conv net (test only)',
    dataset='digits',
    make_model=lambda n: models.ConvNet((4, 4), n),
    batch_size=32,
    num_epochs=2,
    eval_every=5,
    targets=(0.3, 0.5),
  ),
}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'task must be one of {sorted(TASKS)}; got {name!r}.')
  return TASKS[name]
