"""CIFAR-10 on device: tensorflow_datasets once, then jax for every batch.

The whole dataset (180 MB as uint8) is loaded once and kept on the
accelerator; each training batch is gathered, augmented (random crop with
4-pixel zero padding, horizontal flip) and normalised per channel inside the
jitted step, so no host pipeline limits the step time.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Per-channel statistics of the CIFAR-10 training images.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
PAD = 4


@dataclasses.dataclass(frozen=True)
class Dataset:
  """uint8 images `(n, 32, 32, 3)` and int32 labels, on device."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  num_classes: int = NUM_CLASSES


def _synthetic(config, rng):
  def split(n):
    x = rng.integers(0, 256, size=(n, *IMAGE_SHAPE), dtype=np.uint8)
    return x, rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)

  return (
    *split(config.synthetic_train_examples),
    *split(config.synthetic_test_examples),
  )


def _tfds(config):
  import tensorflow_datasets as tfds  # noqa: PLC0415

  def split(name):
    # Fixed-size batches, concatenated: batch_size=-1 asks TensorFlow to
    # reserve an unbounded batch for generator-backed datasets (mock data).
    batches = tfds.as_numpy(
      tfds.load(
        config.dataset,
        split=name,
        batch_size=1024,
        as_supervised=True,
        data_dir=config.data_dir,
      )
    )
    images, labels = zip(*batches)
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)

  return (*split('train'), *split('test'))


def load(config: ml_collections.ConfigDict) -> Dataset:
  """CIFAR-10 from tensorflow_datasets, or random data if `synthetic`."""
  if config.synthetic:
    arrays = _synthetic(config, np.random.default_rng(config.seed))
  else:
    arrays = _tfds(config)
  x_train, y_train, x_test, y_test = (jax.device_put(a) for a in arrays)
  if x_train.shape[1:] != IMAGE_SHAPE:
    raise ValueError(
      f'expected {IMAGE_SHAPE} images; {config.dataset} has'
      f' {x_train.shape[1:]}.'
    )
  return Dataset(x_train, y_train, x_test, y_test)


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 → (x/255 − mean)/std per channel."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - MEAN) / STD).astype(dtype)


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random 32×32 crop of the 4-pixel zero-padded image, random flip.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> images = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.uint8).reshape(
    ...     2, 32, 32, 3)
    >>> augment(jax.random.key(0), images).shape
    (2, 32, 32, 3)
  """
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  offsets = jax.random.randint(crop_key, (len(images), 2), 0, 2 * PAD + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), IMAGE_SHAPE)

  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (len(images), 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1], cropped)
