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


def write_fashion_like(path, num_train=600, num_test=100, seed=0):
  """A tiny file with the keys, dtypes and image shape of fashion_mnist.npz."""
  rng = np.random.default_rng(seed)
  labels = lambda n: np.sort(rng.integers(0, 10, n)).astype(np.uint8)
  np.savez(
    path,
    train_images=rng.integers(0, 256, (num_train, 28, 28), np.uint8),
    train_labels=labels(num_train),  # sorted: the loader must permute
    test_images=rng.integers(0, 256, (num_test, 28, 28), np.uint8),
    test_labels=labels(num_test),
  )


def test_fashion_mnist_keeps_the_file_split_and_permutes_train(tmp_path):
  path = tmp_path / 'fashion_mnist.npz'
  write_fashion_like(path)
  with np.load(path) as raw:
    train_labels, test_labels = raw['train_labels'], raw['test_labels']
  data = data_lib.load('fashion_mnist', str(path))
  assert data.x_train.shape == (600, 28, 28, 1)
  assert data.x_test.shape == (100, 28, 28, 1)
  np.testing.assert_array_equal(data.y_test, test_labels)  # untouched
  # The same training examples, in one fixed shuffled order.
  np.testing.assert_array_equal(np.sort(data.y_train), train_labels)
  assert not np.array_equal(data.y_train, train_labels)
  again = data_lib.load('fashion_mnist', str(path))
  np.testing.assert_array_equal(again.x_train, data.x_train)
  assert abs(data.x_train.mean()) < 1e-3
  assert abs(data.x_train.std() - 1) < 1e-3


def test_digits_is_split_80_20():
  data = data_lib.load('digits')
  assert len(data.y_train) == 1437 and len(data.y_test) == 360
  assert data.x_train.shape[1:] == (8, 8, 1)


@pytest.mark.parametrize(
  'name, path, match',
  [
    ('mnist10k', None, 'needs a data path'),
    ('mnist10k', '/nonexistent/mnist10k.npz', 'not found'),
    ('fashion_mnist', None, 'needs a data path'),
    ('fashion_mnist', '/nonexistent/fashion_mnist.npz', 'not found'),
    ('cifar', None, 'dataset must be one of'),
  ],
)
def test_bad_dataset_arguments(name, path, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    data_lib.load(name, path)
