"""FROG, batch 512, s = 64, k = 4, lr 0.01, wd 1e-5 (FROG's own headline)."""

from examples.cifar10.configs import default


def get_config():
  return default.get_config()
