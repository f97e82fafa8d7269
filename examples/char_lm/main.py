r"""FROG vs AdamW on a tiny character-level transformer, loss vs wall-clock.

python -m examples.char_lm.main --out examples/char_lm/results

Trains every variant at every learning rate of its grid on the standard
library's Python sources (no download), one run after the other in this
process, then writes `char_lm.json` (every run's curves, timings, the
command, machine and versions) and `loss_vs_time.png` (the best run of each
variant, by final validation loss).
"""

import json
import os
import platform
import sys

import jax
import matplotlib
import optax
from absl import app
from absl import flags

import frog_optax as fo
from examples.char_lm import corpus as corpus_lib
from examples.char_lm import train

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402

# name: (Config overrides, learning-rate grid)
VARIANTS = {
  'adamw': ({'optimizer': 'adamw'}, (3e-3, 1e-2, 3e-2)),
  'frog': (
    {'optimizer': 'frog', 'fallback_learning_rate': 1e-2},
    (3e-3, 1e-2, 3e-2),
  ),
  'frog-sgd-fallback': ({'optimizer': 'frog'}, (1e-2, 3e-2, 1e-1)),
}

_OUT = flags.DEFINE_string('out', 'examples/char_lm/results', 'Output folder.')
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps per run.')
_CHARS = flags.DEFINE_integer('max_chars', 1_000_000, 'Corpus size (bytes).')
_VARIANTS = flags.DEFINE_list(
  'variants', list(VARIANTS), f'Which of {list(VARIANTS)} to run.'
)
_GRID = flags.DEFINE_integer(
  'grid', 3, 'Learning rates per variant (the first n of its grid).'
)
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 50, 'Steps between evals.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 50, 'Linear warm-up steps.')


def run_all(variants, steps, grid, eval_every, warmup_steps, corpus):
  runs = []
  for name in variants:
    overrides, rates = VARIANTS[name]
    for lr in rates[:grid]:
      config = train.Config(
        learning_rate=lr,
        steps=steps,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        **overrides,
      )
      result = train.train(config, corpus)
      result['variant'] = name
      runs.append(result)
      print(
        f'{name:18s} lr {lr:<6g} valid loss {result["final_valid_loss"]:.4f}'
        f'  {1000 * result["seconds_per_step"]:.1f} ms/step'
      )
  return runs


def best_runs(runs):
  best = {}
  for run in runs:
    if not run['finite']:
      continue
    current = best.get(run['variant'])
    if current is None or run['final_valid_loss'] < current['final_valid_loss']:
      best[run['variant']] = run
  return best


def plot(best, path):
  fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(10, 4))
  for name, run in sorted(best.items()):
    curve, lr = run['curve'], run['config']['learning_rate']
    label = f'{name} (lr {lr:g})'
    by_time.plot(curve['seconds'], curve['valid_loss'], marker='.', label=label)
    by_step.plot(curve['step'], curve['valid_loss'], marker='.', label=label)
  by_time.set_xlabel('training wall-clock (s, compile excluded)')
  by_step.set_xlabel('step')
  for ax in (by_time, by_step):
    ax.set_ylabel('validation loss (nats/char)')
    ax.set_ylim(top=3.2)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle('Character-level transformer on the Python stdlib sources')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise ValueError(
      f'unknown variants {sorted(unknown)}; see {list(VARIANTS)}'
    )
  corpus = corpus_lib.load(_CHARS.value)
  runs = run_all(
    _VARIANTS.value,
    _STEPS.value,
    _GRID.value,
    _EVAL_EVERY.value,
    _WARMUP.value,
    corpus,
  )
  best = best_runs(runs)
  os.makedirs(_OUT.value, exist_ok=True)
  record = {
    'command': 'python -m examples.char_lm.main ' + ' '.join(sys.argv[1:]),
    'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores,'
    f' {jax.devices()[0].device_kind}',
    'versions': {
      'python': platform.python_version(),
      'jax': jax.__version__,
      'optax': optax.__version__,
      'frog_optax': fo.__version__,
    },
    'corpus': {
      'source': f'Python {platform.python_version()} standard library,'
      ' its top-level .py files sorted by name',
      'files': list(corpus.files),
      'train_chars': int(len(corpus.train)),
      'valid_chars': int(len(corpus.valid)),
    },
    'best': {name: run['config'] for name, run in best.items()},
    'runs': runs,
  }
  with open(os.path.join(_OUT.value, 'char_lm.json'), 'w') as f:
    json.dump(record, f, indent=1)
  plot(best, os.path.join(_OUT.value, 'loss_vs_time.png'))
  for name, run in sorted(best.items()):
    print(
      f'best {name:18s} lr {run["config"]["learning_rate"]:<6g} valid'
      f' {run["final_valid_loss"]:.4f} after {run["curve"]["seconds"][-1]:.1f}'
      f' s ({1000 * run["seconds_per_step"]:.1f} ms/step)'
    )


if __name__ == '__main__':
  app.run(main)
