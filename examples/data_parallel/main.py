"""FROG data-parallel on every local device (see train.py for multi-host).

python -m examples.data_parallel.main
# Without accelerators, simulate 4 devices on the CPU:
XLA_FLAGS=--xla_force_host_platform_device_count=4 \
  python -m examples.data_parallel.main
"""

from absl import app
from absl import flags

from examples.data_parallel import train

_STEPS = flags.DEFINE_integer('steps', 200, 'Training steps.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_SAMPLE = flags.DEFINE_integer('sample_size', 32, 'FROG sample rows.')


def main(argv):
  del argv
  config = train.Config(
    steps=_STEPS.value, batch_size=_BATCH.value, sample_size=_SAMPLE.value
  )
  losses, accuracy, _ = train.train(config)
  print(
    f'{len(train.jax.devices())} devices: loss {losses[0]:.3f} ->'
    f' {losses[-1]:.3f}, test accuracy {accuracy:.4f}'
  )


if __name__ == '__main__':
  app.run(main)
