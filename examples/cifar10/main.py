"""CIFAR-10 ResNet-18 with FROG or FROG's own baselines.

python -m examples.cifar10.main --workdir=workdir/cifar10_frog \
  --config=examples/cifar10/configs/frog_bs512.py
python -m examples.cifar10.main --workdir=workdir/cifar10_sgd \
  --config=examples/cifar10/configs/sgd_bs128.py --config.synthetic=True
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from examples.cifar10 import train

_WORKDIR = flags.DEFINE_string(
  'workdir',
  'workdir/cifar10',
  'metrics.json, checkpoints/ and the plot go here; an existing checkpoint'
  ' is resumed.',
)
config_flags.DEFINE_config_file(
  'config', 'examples/cifar10/configs/default.py', 'Training config.'
)


def main(argv):
  del argv
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
