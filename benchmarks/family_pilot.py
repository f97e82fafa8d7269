"""A short, wide learning-rate pilot that centred the family's grids.

  python -m benchmarks.family_pilot --data ../shared/data/mnist10k.npz \\
    --out benchmarks/results/family_pilot.json

For each optimizer, trains on the held-out split of a task (the sweep's
split: the test split is never used) for `--epochs` epochs at every rate of
a wide geometric grid, and records the final validation accuracy. The
registry's 5-point grids were placed around the best rates found here; the
benchmark's own sweep then picks within them.
"""

import argparse
import dataclasses
import json
import sys

from benchmarks import optimizers as optimizers_lib
from benchmarks import protocol
from benchmarks import tasks as tasks_lib
from harness import record

WIDE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--task', default='mnist10k')
  p.add_argument('--data', default='../shared/data/mnist10k.npz')
  p.add_argument('--epochs', type=int, default=3)
  p.add_argument(
    '--optimizers',
    default='kfrog,foof,adafisher,adafisherw,frog-no-trace-norm,'
    'frog-no-step-norm',
  )
  p.add_argument('--out', default=None)
  args = p.parse_args(argv)
  task = dataclasses.replace(tasks_lib.get(args.task), num_epochs=args.epochs)
  try:
    data = tasks_lib.validation_split(task.load(args.data))
  except FileNotFoundError as e:
    print(f'skipping {args.task}: {e}')
    return None
  result = dict(
    record.environment(), task=args.task, epochs=args.epochs, trials={}
  )
  result['command'] = ' '.join(['python -m benchmarks.family_pilot', *argv])
  for name in args.optimizers.split(','):
    spec = optimizers_lib.get(name)
    trials = []
    for lr in WIDE_GRID:
      run = protocol.train_run(
        task, spec, data, lr, seed=0, desc=f'{name} {lr:g}'
      )
      trials.append(
        dict(
          learning_rate=lr,
          final_accuracy=run['final_accuracy'],
          diverged=run['diverged'],
        )
      )
      print(
        name, lr, run['final_accuracy'], 'diverged' if run['diverged'] else ''
      )
    result['trials'][name] = trials
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
