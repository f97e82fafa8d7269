"""The benchmark CLI: FROG against the optimizers people would pick instead.

  python -m benchmarks.run --suite cpu --data ../shared/data/mnist10k.npz
  python -m benchmarks.run --suite fashion --optimizers frog,sgd,adamw
  python -m benchmarks.run --suite smoke --out /tmp/bench   # seconds

Writes `<out>/<suite>/<task>.json` (raw: command, machine, versions,
seeds, every history) per task, then `summary.md` and the plots drawn from
those files (`benchmarks.report`). A task whose data is missing is skipped
with a message. Each optimizer's sweep and seeds are kept in
`<out>/<suite>/pieces/<task>/` after each run, and a later call reuses them:
a suite that takes hours runs in pieces (the step costs are measured in
every call, all optimizers of the call interleaved).
"""

import argparse
import dataclasses
import json
import os
import sys

from benchmarks import optimizers as optimizers_lib
from benchmarks import protocol
from benchmarks import report
from benchmarks import tasks as tasks_lib
from harness import kfac_compat
from harness import record


@dataclasses.dataclass(frozen=True)
class Suite:
  tasks: tuple[str, ...]
  seeds: tuple[int, ...]
  timing_rounds: int
  grid_size: int | None = None  # first n learning rates of each grid
  max_examples: tuple[int, int] | None = None  # (train, test) subsample


SUITES = {
  'cpu': Suite(
    tasks=('mnist10k', 'mnist1d'), seeds=(0, 1, 2), timing_rounds=20
  ),
  # The CPU suite's protocol on an accelerator (same tasks, seeds, rounds).
  'gpu': Suite(
    tasks=('mnist10k', 'mnist1d'), seeds=(0, 1, 2), timing_rounds=20
  ),
  # Time to accuracy on Fashion-MNIST (hours on 2 CPU cores: run it in
  # pieces, a few optimizers per call).
  'fashion': Suite(
    tasks=('fashion_convnet', 'fashion_resnet20'),
    seeds=(0, 1, 2),
    timing_rounds=20,
  ),
  'smoke': Suite(
    tasks=('smoke',),
    seeds=(0, 1),
    timing_rounds=3,
    grid_size=2,
    max_examples=(320, 128),
  ),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--suite', choices=sorted(SUITES), default='cpu')
  p.add_argument(
    '--data',
    default=None,
    help=(
      "the tasks' data file (default: each task's own, e.g."
      ' ../shared/data/mnist10k.npz); a task whose file is absent is skipped'
    ),
  )
  p.add_argument('--out', default='benchmarks/results')
  p.add_argument(
    '--optimizers',
    default=','.join(optimizers_lib.OPTIMIZERS),
    help='comma-separated registry names',
  )
  p.add_argument('--tasks', default=None, help="comma-separated; the suite's")
  return p.parse_args(argv)


def main(argv=None) -> list[str]:
  """Runs the suite; returns the JSON paths written."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  suite = SUITES[args.suite]
  specs = [optimizers_lib.get(n) for n in args.optimizers.split(',')]
  out_dir = os.path.join(args.out, args.suite)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name in args.tasks.split(',') if args.tasks else suite.tasks:
    task = tasks_lib.get(name)
    task_specs = [_grid_of(s, task, suite) for s in specs]
    try:
      data = task.load(args.data)
    except FileNotFoundError as e:
      print(f'skipping {name}: {e}')
      continue
    if suite.max_examples:
      data = tasks_lib.subsample(data, *suite.max_examples)
    result = dict(
      record.environment(),
      suite=args.suite,
      seeds=list(suite.seeds),
      batch_size=task.batch_size,
      num_epochs=task.num_epochs,
      targets=list(task.targets),
      **protocol.run_task(
        task,
        task_specs,
        data,
        suite.seeds,
        suite.timing_rounds,
        pieces=os.path.join(out_dir, 'pieces', name),
      ),
    )
    result['versions']['kfac_jax'] = _kfac_version()
    result['command'] = ' '.join(['python -m benchmarks.run', *argv])
    path = os.path.join(out_dir, f'{name}.json')
    with open(path, 'w') as f:
      json.dump(result, f, indent=1)
    written.append(path)
    print(f'wrote {path}')
  if written:
    report.write(out_dir)
  return written


def _grid_of(spec, task, suite) -> optimizers_lib.OptimizerSpec:
  """`spec` with the task's grid for it, cut to the suite's grid size."""
  grid = task.grids.get(spec.name, spec.learning_rates)
  return dataclasses.replace(spec, learning_rates=grid[: suite.grid_size])


def _kfac_version() -> str:
  """kfac-jax's version, or why it does not import (e.g. a newer jax)."""
  error = kfac_compat.import_error()
  if error:
    return f'not importable: {error}'
  import kfac_jax  # noqa: PLC0415

  return kfac_jax.__version__


if __name__ == '__main__':
  main()
