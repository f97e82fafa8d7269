"""Momentum SGD, batch 128, lr 0.1, momentum 0.9, wd 1e-4 (seed baseline)."""

from examples.cifar10.configs import default


def get_config():
  config = default.get_config()
  config.optimizer = 'sgd'
  config.batch_size = 128
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  return config
