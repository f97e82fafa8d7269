"""FROG's levers on one task, each ablated on the validation split.

  python -m benchmarks.levers --task fashion_convnet
  python -m benchmarks.levers --task fashion_convnet --lr 0.3 --seeds 0,1,2

Every variant changes one setting of the benchmark's FROG (`benchmarks.
optimizers.frog_build`): the Fisher sample size s, the CG iterations k
(together the cost model 1 + 2ks/(3B)), preconditioning the head, the
fallback's learning-rate ratio, a warm-up before the cosine decay, and
starting each CG from the previous step's solution. Each
trains at the task's FROG learning rate (the protocol's pick, read from the
suite's pieces, or `--lr`) with every seed on the training split minus the
held-out validation split, and is scored on that validation split (the test
split is never used). The step costs of all variants are timed interleaved
in one process. Writes `<out>/levers_<task>.json` and `.md`; a variant
already in that file at the same learning rate, seeds and change is reused,
not trained again (its step cost is timed afresh with the others).
"""

import argparse
import json
import os
import sys

import optax

from benchmarks import optimizers as optimizers_lib
from benchmarks import protocol
from benchmarks import tasks as tasks_lib
from harness import record

WARMUP_FRACTION = 0.05


def _warmup_cosine(total_steps: int):
  """`lr schedule -> linear warm-up over 5% of the steps, then cosine`."""

  def schedule(protocol_schedule):
    peak = float(protocol_schedule(0))
    return optax.warmup_cosine_decay_schedule(
      0.0, peak, int(WARMUP_FRACTION * total_steps), total_steps
    )

  return schedule


def variants(total_steps: int) -> dict[str, tuple[str, dict]]:
  """`{name: (what changes, frog_build arguments)}`; 'base': the benchmark's."""
  s, k = optimizers_lib.FROG_SAMPLE_SIZE, optimizers_lib.FROG_CG_ITERS
  return {
    'base': (f's={s}, k={k}, head on the fallback, other_lr_ratio 1', {}),
    's=16': ('half the Fisher sample', dict(sample_size=s // 2)),
    's=64': ('twice the Fisher sample', dict(sample_size=2 * s)),
    'k=2': ('half the CG iterations', dict(cg_iters=k // 2)),
    'warm start': (
      "CG from the previous step's solution (one more matvec)",
      dict(warm_start=True),
    ),
    f'warm start k={k - 1}': (
      'warm start at the matvec count of the base',
      dict(warm_start=True, cg_iters=k - 1),
    ),
    'head preconditioned': ('nothing excluded', dict(exclude=())),
    f's={s // 2} + head preconditioned': (
      'half the Fisher sample, nothing excluded',
      optimizers_lib.FROG_S16_SETTINGS,
    ),
    'other_lr_ratio 0.25': (
      "the fallback at the reference's 0.25 x lr",
      dict(other_lr_ratio=0.25),
    ),
    'warm-up': (
      f'linear warm-up over {WARMUP_FRACTION:.0%} of the steps, then cosine',
      dict(schedule=_warmup_cosine(total_steps)),
    ),
  }


def _chosen_lr(pieces: str, task_name: str) -> float:
  path = os.path.join(pieces, task_name, 'frog.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: run the suite for FROG first, or pass --lr.'
    )
  with open(path) as f:
    return json.load(f)['learning_rate']


def run(
  task, data, learning_rate, seeds, timing_rounds, names=None, finished=None
):
  """Every variant's seeds on the validation split, and their step costs.

  `finished` is an earlier result's `variants`: one there with the same
  change, learning rate and seeds lends its seed runs.
  """
  known = variants(total_steps=1)  # the names do not depend on the steps
  unknown = sorted(set(names or ()) - set(known))
  if unknown:
    raise ValueError(
      f'variants {unknown} are not levers; known: {", ".join(known)}.'
    )
  val = tasks_lib.validation_split(data)
  total_steps = len(val.y_train) // task.batch_size * task.num_epochs
  table = variants(total_steps)
  specs = [
    optimizers_lib.OptimizerSpec(
      name, what, (learning_rate,), optimizers_lib.frog_build(**options)
    )
    for name, (what, options) in table.items()
    if names is None or name in names
  ]
  out = {}
  for spec in specs:
    runs = _finished_runs(finished, spec, learning_rate, seeds) or [
      protocol.train_run(
        task, spec, val, learning_rate, seed, desc=f'{spec.name} seed {seed}'
      )
      for seed in seeds
    ]
    out[spec.name] = dict(
      description=spec.description,
      seed_runs=runs,
      summary=protocol.aggregate(runs, task.targets),
    )
    print(
      f'{spec.name}: validation accuracy'
      f' {out[spec.name]["summary"]["final_accuracy_mean"]:.4f}'
      f' ± {out[spec.name]["summary"]["final_accuracy_std"]:.4f}'
    )
  rates = {spec.name: learning_rate for spec in specs}
  costs = protocol.step_costs(task, specs, val, rates, timing_rounds)
  base = costs.get('base', {}).get('step_seconds')
  for name, c in costs.items():
    out[name]['cost'] = dict(
      step_seconds=c['step_seconds'],
      ratio_to_base=c['step_seconds'] / base if base else None,
    )
  return out


def _finished_runs(finished, spec, learning_rate, seeds):
  """The seed runs of `spec` in `finished`, if it ran as asked now."""
  earlier = (finished or {}).get(spec.name)
  if not earlier or earlier['description'] != spec.description:
    return None
  runs = earlier['seed_runs']
  same = [r['seed'] for r in runs] == list(seeds) and all(
    r['learning_rate'] == learning_rate for r in runs
  )
  return runs if same else None


def table(result: dict) -> str:
  """The variants as markdown: accuracy, crossings, step cost."""
  targets = result['targets']
  lines = [
    '| variant | change | validation accuracy | '
    + ' | '.join(f'to {a:.0%}: steps / steps×step s' for a in targets)
    + ' | step ms | × base |',
    '|---|---|---|' + '---|' * len(targets) + '---|---|',
  ]
  for name, v in result['variants'].items():
    s, c = v['summary'], v['cost']
    cells = []
    for a in targets:
      t = s['to_target'][str(a)]
      if not t['reached']:
        cells.append(f'never (0/{t["of"]})')
        continue
      cell = (
        f'{t["steps_median"]:.0f} / {t["steps_median"] * c["step_seconds"]:.1f}'
      )
      cells.append(
        cell
        if t['reached'] == t['of']
        else f'{cell} ({t["reached"]}/{t["of"]})'
      )
    ratio = c['ratio_to_base']
    lines.append(
      f'| {name} | {v["description"]} |'
      f' {s["final_accuracy_mean"]:.4f} ± {s["final_accuracy_std"]:.4f} | '
      + ' | '.join(cells)
      + f' | {c["step_seconds"] * 1e3:.1f} |'
      f' {"-" if ratio is None else f"{ratio:.2f}"} |'
    )
  return '\n'.join(lines)


def helps(result: dict) -> dict[str, str]:
  """Per variant, whether it beats the base beyond the seed spread."""
  base = result['variants']['base']['summary']
  verdicts = {}
  for name, v in result['variants'].items():
    if name == 'base':
      continue
    gap = v['summary']['final_accuracy_mean'] - base['final_accuracy_mean']
    spread = v['summary']['final_accuracy_std'] + base['final_accuracy_std']
    if abs(gap) <= spread:
      verdicts[name] = f'within seed spread ({100 * gap:+.2f} points)'
    else:
      verdicts[name] = (
        f'{"better" if gap > 0 else "worse"} ({100 * gap:+.2f} points)'
      )
  return verdicts


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--task', default='fashion_convnet')
  p.add_argument('--data', default=None, help="the task's data file")
  p.add_argument('--lr', type=float, default=None)
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--timing-rounds', type=int, default=20)
  p.add_argument('--variants', default=None, help='comma-separated names')
  p.add_argument('--pieces', default='benchmarks/results/fashion/pieces')
  p.add_argument('--out', default='benchmarks/results/fashion')
  args = p.parse_args(argv)
  task = tasks_lib.get(args.task)
  try:
    data = task.load(args.data)
  except FileNotFoundError as e:
    print(f'skipping {args.task}: {e}')
    return {}
  lr = args.lr if args.lr is not None else _chosen_lr(args.pieces, task.name)
  seeds = [int(s) for s in args.seeds.split(',')]
  names = args.variants.split(',') if args.variants else None
  path = os.path.join(args.out, f'levers_{task.name}.json')
  finished = None
  if os.path.exists(path):
    with open(path) as f:
      finished = json.load(f)['variants']
  result = dict(
    record.environment(),
    kind='levers',
    task=task.name,
    description=task.description,
    learning_rate=lr,
    seeds=seeds,
    targets=list(task.targets),
    split='validation (the last 20% of the training split)',
    variants=run(task, data, lr, seeds, args.timing_rounds, names, finished),
  )
  result['verdicts'] = helps(result) if 'base' in result['variants'] else {}
  text = '\n'.join(
    [
      f'FROG levers on {task.name} at lr {lr:g}, seeds {seeds}, scored on'
      ' the validation split (steps×step: median steps times the'
      ' interleaved step time).',
      '',
      table(result),
      '',
      *(f'- {n}: {v}' for n, v in result['verdicts'].items()),
    ]
  )
  record.write(result, path, text)
  return result


if __name__ == '__main__':
  main()
