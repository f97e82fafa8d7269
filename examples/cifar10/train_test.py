"""The CIFAR-10 example end to end on CPU: tfds mock data, resume, synthetic."""

import json
import os

import jax
import numpy as np
import pytest

from examples.cifar10 import input_pipeline
from examples.cifar10 import train
from examples.cifar10.configs import default
from examples.cifar10.configs import sgd_bs128


def tiny(config):
  config.stage_features = (4, 8, 8, 8)
  config.blocks_per_stage = 1
  config.batch_size = 16
  config.sample_size = 4
  config.num_epochs = 1
  config.lr_drop_epochs = (1,)
  config.synthetic_train_examples = 48
  config.synthetic_test_examples = 32
  return config


@pytest.fixture(scope='module')
def mock_run(tmp_path_factory):
  """One epoch of FROG on tfds.testing.mock_data through the real loader."""
  import tensorflow_datasets as tfds  # noqa: PLC0415

  workdir = str(tmp_path_factory.mktemp('cifar10'))
  config = tiny(default.get_config())
  with tfds.testing.mock_data(num_examples=48):
    metrics = train.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_mock_data_epoch_writes_metrics_and_checkpoint(mock_run):
  config, workdir, metrics = mock_run
  with open(os.path.join(workdir, 'metrics.json')) as f:
    assert json.load(f) == json.loads(json.dumps(metrics))
  (epoch,) = metrics['history']
  assert epoch['epoch'] == 1 and epoch['step'] == 48 // config.batch_size
  assert np.isfinite(epoch['train_loss']) and epoch['train_loss'] > 0
  assert 0.0 <= epoch['test_accuracy'] <= 1.0
  assert epoch['train_seconds'] > 0 and epoch['eval_seconds'] > 0
  assert metrics['compile_seconds'] > 0
  assert set(metrics['to_target']) == {'0.88', '0.90', '0.92', '0.94'}
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']
  assert os.path.exists(os.path.join(workdir, 'accuracy_vs_time.png'))


def test_resumed_run_equals_uninterrupted(tmp_path):
  # Two epochs in one go, and one epoch then a resumed second one.
  config = tiny(sgd_bs128.get_config())
  config.synthetic = True
  config.num_epochs = 2
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  config.num_epochs = 1
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  config.num_epochs = 2
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  for key in ('epoch', 'train_loss', 'test_accuracy'):
    assert [h[key] for h in resumed['history']] == [
      h[key] for h in straight['history']
    ]


def test_augment_crops_the_padded_image_and_flips():
  images = jax.numpy.asarray(
    np.random.default_rng(0).integers(1, 256, (64, 32, 32, 3), np.uint8)
  )
  out = np.asarray(input_pipeline.augment(jax.random.key(1), images))
  src = np.asarray(images)
  padded = np.pad(src, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips = 0
  for i in range(len(src)):
    found = [
      (dy, dx, flip)
      for dy in range(9)
      for dx in range(9)
      for flip in (False, True)
      if np.array_equal(
        out[i],
        padded[i, dy : dy + 32, dx : dx + 32][:, ::-1]
        if flip
        else padded[i, dy : dy + 32, dx : dx + 32],
      )
    ]
    assert found, i
    flips += found[0][2]
  assert 10 < flips < 54  # both orientations occur


def test_bad_optimizer_names_the_choices():
  config = default.get_config()
  config.optimizer = 'lamb'
  with pytest.raises(ValueError, match="frog', 'sgd', 'adamw'"):
    train.make_optimizer(config, 0.1)
