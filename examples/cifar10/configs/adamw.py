"""AdamW, batch 128, lr 1e-3, decoupled wd 5e-4 (not in FROG's own table)."""

from examples.cifar10.configs import default


def get_config():
  config = default.get_config()
  config.optimizer = 'adamw'
  config.batch_size = 128
  config.learning_rate = 1e-3
  config.weight_decay = 5e-4
  return config
