"""Real datasets that need no download: digits, MNIST-1D, MNIST-10k, Fashion.

The Fashion-MNIST file holds all 70,000 images with its own 60k/10k split
(1,000 test images per class): it is not the official test split, and
results on it say so.
"""

import dataclasses
import os

import numpy as np

DATASETS = ('digits', 'mnist1d', 'mnist10k', 'fashion_mnist')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Channels-last float32 inputs, standardised with train statistics."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(self.y_train.max()) + 1


def _digits():
  from sklearn.datasets import load_digits  # noqa: PLC0415

  data = load_digits()
  x = data.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  split = int(0.8 * len(y))
  return x[:split], y[:split], x[split:], y[split:]


def _mnist1d():
  from mnist1d.data import get_dataset_args  # noqa: PLC0415
  from mnist1d.data import make_dataset  # noqa: PLC0415

  # Generated locally from templates (make_dataset never downloads).
  args = get_dataset_args()
  args.num_samples = 10_000
  data = make_dataset(args)
  return (
    data['x'].astype(np.float32)[..., None],
    data['y'].astype(np.int32),
    data['x_test'].astype(np.float32)[..., None],
    data['y_test'].astype(np.int32),
  )


def _require(path: str, name: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: pass --data path/to/{name}.npz (the file is'
      ' described in the project README).'
    )


def _mnist10k(path: str):
  _require(path, 'mnist10k')
  with np.load(path) as data:
    x = data['images'].astype(np.float32)[..., None] / 255.0
    y = data['labels'].astype(np.int32)
  return x[:8000], y[:8000], x[8000:], y[8000:]


def _fashion_mnist(path: str):
  """60k train / 10k test images; the train order is fixed by seed 0.

  The file's training images are not in random order (runs of one class),
  so they are permuted once, the same way every time: the validation split
  (the last fifth) then holds every class.
  """
  _require(path, 'fashion_mnist')
  with np.load(path) as data:
    x_train = data['train_images'].astype(np.float32)[..., None] / 255.0
    y_train = data['train_labels'].astype(np.int32)
    x_test = data['test_images'].astype(np.float32)[..., None] / 255.0
    y_test = data['test_labels'].astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y_train))
  return x_train[order], y_train[order], x_test, y_test


_FILE_LOADERS = {'mnist10k': _mnist10k, 'fashion_mnist': _fashion_mnist}


def load(name: str, data_path: str | None = None) -> Dataset:
  """Loads `name`: 'digits', 'mnist1d', or a file dataset (needs a path).

  Args:
    name: one of `DATASETS`; 'mnist10k' and 'fashion_mnist' are read from
      the `.npz` file at `data_path`.
    data_path: the file of a file dataset.

  Raises:
    ValueError: an unknown name, or a file dataset without a path.
    FileNotFoundError: `data_path` does not exist (benchmarks then skip).
  """
  if name == 'digits':
    arrays = _digits()
  elif name == 'mnist1d':
    arrays = _mnist1d()
  elif name in _FILE_LOADERS:
    if not data_path:
      raise ValueError(f'dataset {name} needs a data path (--data).')
    arrays = _FILE_LOADERS[name](data_path)
  else:
    raise ValueError(f'dataset must be one of {DATASETS}; got {name!r}.')
  x_train, y_train, x_test, y_test = arrays
  mean, std = x_train.mean(), x_train.std()
  return Dataset(
    name, (x_train - mean) / std, y_train, (x_test - mean) / std, y_test
  )
