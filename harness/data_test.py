"""The dataset loaders, on a small MNIST-shaped file made here."""

import numpy as np
import pytest

from harness import data as data_lib


def test_mnist10k_split_and_standardisation(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'mnist10k.npz'
  labels = rng.integers(0, 10, 10_000)
  np.savez(
    path, images=rng.integers(0, 256, (10_000, 28, 28), np.uint8), labels=labels
  )
  data = data_lib.load('mnist10k', str(path))
  assert data.x_train.shape == (8000, 28, 28, 1)
  assert data.x_test.shape == (2000, 28, 28, 1)
  np.testing.assert_array_equal(data.y_test, labels[8000:])
  assert abs(data.x_train.mean()) < 1e-3
  assert abs(data.x_train.std() - 1) < 1e-3
  assert data.num_classes == 10


def test_digits_is_split_80_20():
  data = data_lib.load('digits')
  assert len(data.y_train) == 1437 and len(data.y_test) == 360
  assert data.x_train.shape[1:] == (8, 8, 1)


@pytest.mark.parametrize(
  'name, path, match',
  [
    ('mnist10k', None, 'needs a data path'),
    ('mnist10k', '/nonexistent/mnist10k.npz', 'not found'),
    ('cifar', None, 'dataset must be one of'),
  ],
)
def test_bad_dataset_arguments(name, path, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    data_lib.load(name, path)
