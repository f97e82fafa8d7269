"""A CPU-sized run on random CIFAR-shaped data (the notebook's bundled file).

Random labels: the accuracies mean nothing. It exercises the whole pipeline
and produces a metrics file in the real format, for
`notebooks/cifar10_reproduction.ipynb`:

python -m examples.cifar10.main \
  --config=examples/cifar10/configs/tiny_synthetic.py \
  --config.optimizer=frog --workdir=workdir/tiny_frog
"""

from examples.cifar10.configs import default


def get_config():
  config = default.get_config()
  config.synthetic = True
  config.synthetic_train_examples = 2048
  config.synthetic_test_examples = 512
  config.stage_features = (16, 32, 32, 32)
  config.blocks_per_stage = 1
  config.batch_size = 128
  config.sample_size = 16
  config.num_epochs = 4
  config.lr_drop_epochs = (2, 3)
  config.damping = 1e-3
  return config
