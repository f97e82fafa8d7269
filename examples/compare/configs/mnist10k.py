"""MNIST-10k (../shared/data/mnist10k.npz): 8k train / 2k test, batch 256."""

from examples.compare.configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'mnist10k'
  config.data_path = '../shared/data/mnist10k.npz'
  config.batch_size = 256
  config.num_epochs = 10
  config.target_accuracies = (0.97, 0.98, 0.99)
  return config
