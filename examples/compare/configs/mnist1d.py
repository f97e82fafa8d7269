"""MNIST-1D generated locally (8k train / 2k test), 1-D convolutions."""

from examples.compare.configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'mnist1d'
  config.batch_size = 128
  config.num_epochs = 30
  config.target_accuracies = (0.85, 0.90, 0.93)
  return config
