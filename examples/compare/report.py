"""The main job's table and figure, drawn from its results."""

from typing import Any


def _crossing(hit: dict[str, Any]) -> str:
  if not hit['reached']:
    return 'never'
  text = f'{hit["steps_median"]:g} / {hit["seconds_median"]:.1f}'
  if hit['reached'] < hit['of']:
    text += f' ({hit["reached"]} of {hit["of"]})'
  return text


def summary_table(results: dict[str, Any], targets) -> str:
  """Markdown: accuracy mean ± std, median crossings, step cost."""
  base = results['step_seconds'].get('sgd')
  n = results['num_seeds']
  header = (
    ['optimizer', f'final test acc ({n} seed{"s" if n > 1 else ""})']
    + [f'to {a:.0%}: steps / s (median)' for a in targets]
    + ['step ms', 'vs SGD', 'compile s']
  )
  rows = [header]
  for name, r in results['optimizers'].items():
    cells = [
      name,
      f'{r["final_test_accuracy"]:.4f} ± {r["final_test_accuracy_std"]:.4f}',
    ]
    cells += [_crossing(r['to_target'][str(a)]) for a in targets]
    seconds = results['step_seconds'][name]
    cells += [
      f'{seconds * 1e3:.1f}',
      f'{seconds / base:.2f}x' if base else '-',
      f'{r["compile_seconds"]:.1f}',
    ]
    rows.append(cells)
  lines = ['| ' + ' | '.join(row) + ' |' for row in rows]
  lines.insert(1, '|' + '---|' * len(header))
  return '\n'.join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Test accuracy and training loss against wall-clock and steps.

  One line per seed, one colour per optimizer; the axes keep every point
  (the loss on a log scale).
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey='row')
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (name, r) in enumerate(results['optimizers'].items()):
    for j, run in enumerate(r['runs']):
      h = run['history']
      label = name if j == 0 else None
      style = dict(color=colours[i % len(colours)], alpha=0.8, lw=1.2)
      for col, key in enumerate(('train_seconds', 'step')):
        xs = [e[key] for e in h]
        axes[0, col].plot(
          xs, [e['test_accuracy'] for e in h], label=label, **style
        )
        losses = [
          (x, e['train_loss'])
          for x, e in zip(xs, h)
          if e['train_loss'] is not None
        ]
        axes[1, col].plot(*zip(*losses), label=label, **style)
  for col, xlabel in enumerate(
    ('training wall-clock (s, eval excluded)', 'steps')
  ):
    axes[0, col].set_ylabel('test accuracy')
    axes[1, col].set_ylabel('training loss (batch)')
    axes[1, col].set_yscale('log')
    for row in (0, 1):
      axes[row, col].set_xlabel(xlabel)
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend()
  n = results['num_seeds']
  fig.suptitle(
    f'{results["config"]["dataset"]}: {n} seed{"s" if n > 1 else ""}'
    f' ({results["machine"]["processor"]})'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
