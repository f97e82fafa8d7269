"""Trains FROG, momentum SGD and AdamW side by side and compares them.

python -m examples.compare.main --workdir=/tmp/frog_compare
python -m examples.compare.main --config=examples/compare/configs/mnist1d.py
python -m examples.compare.main --data=../shared/data/mnist10k.npz
python -m examples.compare.main --config=examples/compare/configs/fashion.py \
  --config.data_path=path/to/fashion_mnist.npz
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from examples.compare import train

_WORKDIR = flags.DEFINE_string(
  'workdir', 'workdir/compare', 'Where results.json and the plot go.'
)
_DATA = flags.DEFINE_string(
  'data',
  None,
  'Path to mnist10k.npz: trains on MNIST-10k with the'
  ' configs/mnist10k.py settings.',
)
config_flags.DEFINE_config_file(
  'config', 'examples/compare/configs/default.py', 'Training config.'
)


def main(argv):
  del argv
  config = flags.FLAGS.config
  if _DATA.value:
    from examples.compare.configs import mnist10k  # noqa: PLC0415

    config = mnist10k.get_config()
    config.data_path = _DATA.value
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
