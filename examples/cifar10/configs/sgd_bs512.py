"""Momentum SGD, batch 512, lr 0.1, momentum 0.9, wd 1e-4 (seed baseline)."""

from examples.cifar10.configs import sgd_bs128


def get_config():
  config = sgd_bs128.get_config()
  config.batch_size = 512
  return config
