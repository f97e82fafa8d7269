"""Small hyper-parameter sweep behind the defaults in configs/default.py.

Every setting trains on 80% of the training split and is scored on the held
out 20% (never on the test set). FROG is swept over learning rate, damping and
whether the Dense head is preconditioned; SGD and AdamW over learning rate.

  python -m examples.compare.sweep \
      --out=examples/compare/results/sweep_digits.json
"""

import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

from examples.compare import train
from harness import data as data_lib
from harness import models

_OUT = flags.DEFINE_string('out', None, 'Where to write the sweep JSON.')
config_flags.DEFINE_config_file(
  'config', 'examples/compare/configs/default.py', 'Base config.'
)

GRID = {
  'frog': dict(
    learning_rate=(0.03, 0.1, 0.3),
    damping=(1e-6, 1e-3),
    exclude=(('head',), ()),
  ),
  'sgd': dict(learning_rate=(0.03, 0.1, 0.3, 1.0)),
  'adamw': dict(learning_rate=(1e-3, 3e-3, 1e-2, 3e-2)),
}


def validation_split(data):
  n = int(0.8 * len(data.y_train))
  return dataclasses.replace(
    data,
    x_train=data.x_train[:n],
    y_train=data.y_train[:n],
    x_test=data.x_train[n:],
    y_test=data.y_train[n:],
  )


def main(argv):
  del argv
  config = flags.FLAGS.config
  data = validation_split(
    data_lib.load(config.dataset, config.data_path or None)
  )
  model = models.ConvNet(
    features=tuple(config.features), num_classes=data.num_classes
  )
  variables = model.init(
    jax.random.key(config.seed), jnp.asarray(data.x_train[:2])
  )
  rows = []
  for name, grid in GRID.items():
    keys = list(grid)
    for values in itertools.product(*grid.values()):
      cfg = config.copy_and_resolve_references()
      with cfg.unlocked():
        cfg[name].update(dict(zip(keys, values)))
      run = train.train_one(name, cfg, data, model, variables)
      rows.append(
        dict(
          optimizer=name,
          **dict(zip(keys, values)),
          val_accuracy=run['final_test_accuracy'],
          best_val_accuracy=max(h['test_accuracy'] for h in run['history']),
          final_train_loss=run['history'][-1]['train_loss'],
          train_seconds=run['train_seconds'],
          to_target=run['to_target'],
        )
      )
      print(rows[-1])
  out = dict(train.environment(), config=config.to_dict(), grid=GRID, runs=rows)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(out, f, indent=1, default=str)


if __name__ == '__main__':
  flags.mark_flag_as_required('out')
  app.run(main)
