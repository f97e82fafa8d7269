"""The GPU step-cost results in one command (at most ~10 minutes on one GPU).

  python -m benchmarks.gpu_all                 # on a GPU
  python -m benchmarks.gpu_all --smoke --out-dir /tmp/gpu_all  # anywhere

Runs, in one process, on the CIFAR ResNet-18 (32×32×3 inputs), each a set
of interleaved step timings side by side:

- the census of the float32 steps at B = 512, s = 64, k = 4
  (`benchmarks.step_census`): kernels, FLOPs and bytes of the compiled SGD,
  capture-only and FROG steps beside their times, so that the FROG/SGD time
  ratio can be set against each;
- float32 (`benchmarks.step_cost`): FROG, SGD, AdamW and kfac-jax (when
  importable) at B ∈ {128, 512}, FROG at s ∈ {16, 64} × k ∈ {2, 4} (the
  B×s×k sweep against the cost model 1 + 2ks/(3B)), and the breakdown of
  FROG's extra time (capture, trace, the CG's forward and weight-gradient
  convolutions, the whole solve) at B = 512, s = 64, k = 4;
- bfloat16: FROG (B = 512, s = 64, k = 4), SGD and AdamW, and the same
  breakdown.

Each run writes its JSON and plot (device and versions recorded);
`gpu_all.json` collects the headline ratios at B = 512, s = 64, k = 4 and
`gpu_all.md` prints them, both rewritten after every run, so that a run cut
short by a time limit keeps what finished. `--smoke` shrinks everything
(the small conv net of the main job, B = 8, one round) so that the whole
pipeline runs on a CPU in seconds; its numbers mean nothing.
"""

import argparse
import json
import os

from benchmarks import step_census
from benchmarks import step_cost
from harness import kfac_compat
from harness import record

HEADLINE = (512, 64, 4)
SMOKE_HEADLINE = (8, 2, 1)


def runs(smoke: bool, rounds: int) -> dict[str, list[str]]:
  """The step_cost arguments of each run, by name."""
  if smoke:
    # The small conv net: few layers, so few compilations.
    common = ['--net', 'convnet', '--rounds', '1', '--no-kfac']
    return {
      'float32': [
        *common,
        *('--batches', '8', '--samples', '2', '--cg-iters', '1'),
        *('--breakdown', '8,2,1'),
      ],
      'bfloat16': [
        *common,
        *('--dtype', 'bfloat16', '--batches', '8', '--samples', '2'),
        *('--cg-iters', '1', '--breakdown', '8,2,1'),
      ],
    }
  b, s, k = HEADLINE
  common = ['--rounds', str(rounds), '--breakdown', f'{b},{s},{k}']
  kfac = ['--no-kfac'] if kfac_compat.import_error() else ['--kfac']
  return {
    'float32': [
      *common,
      *kfac,
      *('--batches', f'128,{b}', '--samples', f'16,{s}', '--cg-iters', '2,4'),
    ],
    'bfloat16': [
      *common,
      '--no-kfac',
      *('--dtype', 'bfloat16', '--batches', str(b), '--samples', str(s)),
      *('--cg-iters', str(k)),
    ],
  }


def census_args(smoke: bool, rounds: int) -> list[str]:
  """The step_census arguments (float32, at the headline point)."""
  b, s, k = SMOKE_HEADLINE if smoke else HEADLINE
  net = ['--net', 'convnet'] if smoke else []
  return [
    *net,
    *('--batch', str(b), '--samples', str(s), '--cg-iters', str(k)),
    *('--rounds', '1' if smoke else str(rounds)),
  ]


def headline(result: dict, point: tuple[int, int, int]) -> dict:
  """FROG's and the baselines' step time relative to SGD at `point`."""
  b, s, k = point
  frog = next(
    p
    for p in result['points']
    if (p['batch'], p['sample_size'], p['cg_iters']) == (b, s, k)
  )
  out = dict(
    frog_over_sgd=frog['ratio'],
    cost_model=frog['model_ratio'],
    sgd_ms=frog['sgd_seconds'] * 1e3,
  )
  for name, base in result['baselines'][str(b)].items():
    if name != 'sgd':
      out[f'{name}_over_sgd'] = base['ratio_to_sgd']
  out['breakdown_ms'] = {
    k: v * 1e3 for k, v in result['breakdown']['seconds'].items()
  }
  return out


def table(summary: dict) -> str:
  b, s, k = summary['headline_point']
  lines = [
    f'Step time relative to SGD, {summary["net"]}, B={b}, s={s}, k={k}'
    f' ({summary["machine"]["processor"]}):',
    '',
    '| dtype | FROG/SGD | cost model | others/SGD | SGD ms |',
    '|---|---|---|---|---|',
  ]
  for dtype, h in summary['runs'].items():
    others = ', '.join(
      f'{k[: -len("_over_sgd")]} {v:.2f}'
      for k, v in h.items()
      if k.endswith('_over_sgd') and not k.startswith('frog')
    )
    lines.append(
      f'| {dtype} | {h["frog_over_sgd"]:.2f} | {h["cost_model"]:.2f}'
      f' | {others} | {h["sgd_ms"]:.1f} |'
    )
  census = summary.get('census')
  if census:
    lines += [
      '',
      'FROG/SGD of the compiled float32 steps (XLA): kernels'
      f' {census["kernels"]:.2f}, FLOPs {census["flops"]:.2f}, bytes'
      f' {census["bytes"]:.2f}, time {census["seconds"]:.2f}.',
    ]
  return '\n'.join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out-dir', default='benchmarks/results/gpu')
  p.add_argument('--rounds', type=int, default=10)
  p.add_argument('--smoke', action='store_true')
  args = p.parse_args(argv)
  point = SMOKE_HEADLINE if args.smoke else HEADLINE
  summary = dict(record.environment(), headline_point=list(point), runs={})
  net = 'convnet' if args.smoke else 'resnet18'
  census = step_census.main(
    [
      *census_args(args.smoke, args.rounds),
      *('--out', os.path.join(args.out_dir, f'step_census_{net}_float32.json')),
    ]
  )
  summary['census'] = census['steps']['frog']['over_sgd']
  summary['net'] = census['setup']['net']
  write_summary(summary, args.out_dir)
  for dtype, run_args in runs(args.smoke, args.rounds).items():
    out = os.path.join(args.out_dir, f'step_cost_{net}_{dtype}.json')
    result = step_cost.main([*run_args, '--out', out])
    summary['runs'][dtype] = headline(result, point)
    write_summary(summary, args.out_dir)
  print(table(summary))
  return summary


def write_summary(summary: dict, out_dir: str) -> None:
  """`gpu_all.json` and `gpu_all.md` with what has run so far."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'gpu_all.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out_dir, 'gpu_all.md'), 'w') as f:
    f.write(table(summary) + '\n')


if __name__ == '__main__':
  main()
