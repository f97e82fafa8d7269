"""Markdown summary and figures drawn from a suite's committed JSON.

  python -m benchmarks.report benchmarks/results/cpu [docs/benchmarks.md]

Reads every task JSON (`benchmarks.run`) and step-cost JSON
(`benchmarks.step_cost`) in the folder, writes `summary.md` there and
(given a page's path) the page's generated block between its markers, and
one `<task>.png` per task:
test accuracy against training wall-clock and against steps, the line the
mean over seeds and the band their min-max.
"""

import glob
import json
import os
import re
import sys

import numpy as np


def _results(folder: str) -> list[dict]:
  results = []
  for path in sorted(glob.glob(os.path.join(folder, '*.json'))):
    with open(path) as f:
      result = json.load(f)
    result['file'] = os.path.basename(path)
    results.append(result)
  return results


def load(folder: str) -> tuple[list[dict], list[dict]]:
  """`(task results, step-cost results)` of the JSON files in `folder`."""
  results = _results(folder)
  tasks = [r for r in results if 'task' in r and 'kind' not in r]
  costs = [r for r in results if r.get('kind') == 'step_cost']
  return tasks, costs


def load_censuses(folder: str) -> list[dict]:
  """The `benchmarks.step_census` results in `folder`."""
  return [r for r in _results(folder) if r.get('kind') == 'step_census']


def _fmt_target(t, step_seconds: float) -> str:
  """Median steps, seconds, and steps × the interleaved step time."""
  if t['reached'] == 0:
    return f'never (0/{t["of"]})'
  cell = (
    f'{t["steps_median"]:.0f} / {t["seconds_median"]:.1f}s'
    f' / {t["steps_median"] * step_seconds:.1f}s'
  )
  return (
    cell if t['reached'] == t['of'] else f'{cell} ({t["reached"]}/{t["of"]})'
  )


def task_table(result: dict) -> str:
  targets = result['targets']
  header = (
    ['optimizer', 'lr', 'test accuracy']
    + [f'to {a:.0%}: steps / s / steps×step' for a in targets]
    + [
      'step ms: median / mean',
      '× SGD',
      'compile s',
      'opt. state MB',
      'step memory MB',
    ]
  )
  rows = [header]
  for name, r in result['optimizers'].items():
    s, c = r['summary'], r['cost']
    lr = f'{r["learning_rate"]:g}'
    if r['sweep'] and r['sweep']['chosen_at_grid_edge']:
      lr += ' (edge)'
    ratio = c['ratio_to_sgd']
    rows.append(
      [
        name,
        lr,
        f'{s["final_accuracy_mean"]:.4f} ± {s["final_accuracy_std"]:.4f}',
        *(
          _fmt_target(s['to_target'][str(a)], c['step_seconds'])
          for a in targets
        ),
        f'{c["step_seconds"] * 1e3:.1f} / {c["step_seconds_mean"] * 1e3:.1f}',
        '-' if ratio is None else f'{ratio:.2f}',
        f'{c["compile_seconds"]:.1f}',
        f'{c["optimizer_state_bytes"] / 2**20:.2f}',
        _step_memory(c['xla_step_bytes']),
      ]
    )
  lines = ['| ' + ' | '.join(row) + ' |' for row in rows]
  lines.insert(1, '|' + '---|' * len(header))
  return '\n'.join(lines)


def _step_memory(xla: dict | None) -> str:
  """XLA's plan for the jitted step: arguments plus temporaries."""
  if xla is None:
    return 'n/a'
  return f'{(xla["arguments"] + xla["temporaries"]) / 2**20:.1f}'


def sweep_table(result: dict) -> str:
  lines = ['| optimizer | validation accuracy per learning rate |', '|---|---|']
  for name, r in result['optimizers'].items():
    if not r['sweep']:
      continue
    cells = [
      f'{t["learning_rate"]:g}: '
      + ('diverged' if t['diverged'] else f'{t["final_accuracy"]:.4f}')
      for t in r['sweep']['trials']
    ]
    lines.append(f'| {name} | {", ".join(cells)} |')
  return '\n'.join(lines)


def _band(runs, x_key, grid, y_key='test_accuracy'):
  """Seeds' `y_key` on a common x grid (last evaluation at or before x)."""
  curves = []
  for run in runs:
    xs = np.array([h[x_key] for h in run['history']])
    acc = np.array(
      [np.nan if h[y_key] is None else h[y_key] for h in run['history']]
    )
    idx = np.searchsorted(xs, grid, side='right') - 1
    curves.append(np.where(idx >= 0, acc[np.maximum(idx, 0)], np.nan))
  curves = np.array(curves)
  return curves.mean(0), curves.min(0), curves.max(0)


def plot_task(result: dict, path: str | None = None):
  """Draws the task figure; saves it to `path`, or returns it when None.

  Test accuracy (top) and training loss (bottom, the batch loss at each
  evaluation) against training wall-clock (left, log scale: a K-FAC run
  lasts ~10x the others) and steps (right).
  """
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
  for column, (key, label, log_x) in enumerate(
    (
      ('train_seconds', 'training wall-clock (s, evaluation excluded)', True),
      ('step', 'steps', False),
    )
  ):
    for row, y_key in enumerate(('test_accuracy', 'train_loss')):
      ax = axes[row, column]
      for name, r in result['optimizers'].items():
        runs = r['seed_runs']
        end = max(run['history'][-1][key] for run in runs)
        if log_x:  # step 0 sits at 0 s: start at the first positive time
          times = [h[key] for run in runs for h in run['history']]
          start = min((t for t in times if t > 0), default=1.0)
          grid = np.geomspace(start, max(end, start), 300)
        else:
          grid = np.linspace(0, end, 300)
        mean, lo, hi = _band(runs, key, grid, y_key)
        (line,) = ax.plot(grid, mean, label=name)
        ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
      if y_key == 'test_accuracy':
        for a in result['targets']:
          ax.axhline(a, color='grey', lw=0.6, ls=':')
        ax.set_ylim(min(result['targets']) - 0.1, 1.0)
        ax.legend(loc='lower right')
      else:
        ax.set_yscale('log')
        ax.legend(loc='upper right')
      if log_x:
        ax.set_xscale('log')
      ax.set_xlabel(label)
      ax.set_ylabel(y_key.replace('_', ' '))
      ax.grid(alpha=0.3)
  fig.suptitle(
    f'{result["task"]}: mean of {len(result["seeds"])} seeds, band = min-max'
    f' ({result["machine"]["processor"]})'
  )
  fig.tight_layout()
  return save_or_return(fig, path)


def save_or_return(fig, path: str | None):
  """Saves and closes `fig` at `path`; returns it open when `path` is None."""
  if path is None:
    return fig
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig.savefig(path, dpi=110)
  plt.close(fig)
  return None


def baseline_table(result: dict) -> str:
  """Other optimizers' step time relative to SGD at each batch size."""
  names = [n for n in next(iter(result['baselines'].values())) if n != 'sgd']
  lines = [
    '| B | SGD ms | ' + ' | '.join(f'{n} / SGD' for n in names) + ' |',
    '|---|---|' + '---|' * len(names),
  ]
  for batch, b in result['baselines'].items():
    cells = [
      f'{b[n]["ratio_to_sgd"]:.2f} (mean {b[n]["mean_ratio_to_sgd"]:.2f})'
      for n in names
    ]
    lines.append(
      f'| {batch} | {b["sgd"]["seconds"] * 1e3:.0f} | '
      + ' | '.join(cells)
      + ' |'
    )
  return '\n'.join(lines)


def breakdown_table(result: dict) -> str:
  bd = result['breakdown']
  lines = [
    f'| piece (B={bd["batch"]}, s={bd["sample_size"]}, k={bd["cg_iters"]},'
    ' all layers) | ms per step |',
    '|---|---|',
  ]
  for name, seconds in bd['seconds'].items():
    lines.append(f'| {name} | {seconds * 1e3:.1f} |')
  return '\n'.join(lines)


def cost_table(result: dict) -> str:
  lines = [
    '| B | s | k | FROG / SGD measured | cost model 1 + 2ks/(3B) |'
    ' measured / model |',
    '|---|---|---|---|---|---|',
  ]
  for p in result['points']:
    lines.append(
      f'| {p["batch"]} | {p["sample_size"]} | {p["cg_iters"]} |'
      f' {p["ratio"]:.2f} | {p["model_ratio"]:.2f} |'
      f' {p["ratio"] / p["model_ratio"]:.2f} |'
    )
  return '\n'.join(lines)


def render(folder: str, image_prefix: str = '', draw: bool = False) -> str:
  """The markdown of every result in `folder`; `draw` also saves the plots.

  `image_prefix` is prepended to the figure paths (the README links them
  from the repository root).
  """
  tasks, costs = load(folder)
  parts = []
  for result in tasks:
    png = f'{result["task"]}.png'
    if draw:
      plot_task(result, os.path.join(folder, png))
    env = result['versions']
    parts += [
      f'### {result["task"]}: {result["description"]}',
      '',
      f'Batch {result["batch_size"]}, {result["num_epochs"]} epochs, cosine'
      f' learning rate, seeds {result["seeds"]}; machine:'
      f' {result["machine"]["processor"]}, jax {env["jax"]}, optax'
      f' {env["optax"]}, kfac-jax {env.get("kfac_jax")}. Command:'
      f' `{_shown_command(result["command"])}`. Steps / seconds are'
      ' medians over the seeds'
      ' that reached the target (count shown when not all did), and'
      ' steps×step is those steps times the interleaved median step time'
      ' (the least noisy wall-clock figure); "(edge)":'
      ' the chosen learning rate is at the end of its grid. Memory: the'
      " optimizer state, and XLA's memory plan of the jitted step"
      ' (arguments + temporaries; n/a for kfac-jax, which compiles its own'
      ' step).',
      '',
      task_table(result),
      '',
      'Validation sweep (seed 0, 20% of the training split held out):',
      '',
      sweep_table(result),
      '',
      f'![{result["task"]}]({image_prefix}{png})',
      '',
    ]
  for result in costs:
    s = result['setup']
    png = f'{os.path.splitext(result["file"])[0]}.png'
    parts += [
      f'### Step cost: {s["net"]} {s["dtype"]}, input {s["image"]}'
      f' ({result["machine"]["processor"]})',
      '',
      f'Command: `{_shown_command(result["command"])}`.',
      '',
      cost_table(result),
      '',
      'The other optimizers at the same batches (median ratio; the mean'
      " includes kfac-jax's inverse refresh every 5 steps):",
      '',
      baseline_table(result),
      '',
      'Where the extra FROG time goes (CG convolutions: per iteration;'
      ' `cg_convs_per_step` = k × both):',
      '',
      breakdown_table(result),
      '',
      f'![step cost]({image_prefix}{png})',
      '',
    ]
  for result in load_censuses(folder):
    parts += [
      f'### Step census: {result["file"]}',
      '',
      f'Command: `{_shown_command(result["command"])}`.'
      + (f' Library: {result["library"]}.' if 'library' in result else ''),
      '',
      census_table(result),
      '',
    ]
  return '\n'.join(parts)


def census_table(result: dict) -> str:
  """A step census as markdown, its ratios to SGD beside the cost model."""
  setup = result['setup']
  lines = [
    f'{setup["net"]} {setup["dtype"]}, B={setup["batch"]},'
    f' s={setup["sample_size"]}, k={setup["cg_iters"]}'
    f' ({result["machine"]["processor"]}, {result["machine"]["backend"]});'
    f' cost model (FLOPs) {result["cost_model"]:.2f}× SGD.',
    '',
    '| step | kernels (layout) | GFLOP | GB (XLA estimate) | ms | × SGD:'
    ' kernels / FLOPs / bytes / time |',
    '|---|---|---|---|---|---|',
  ]
  for name, step in result['steps'].items():
    ratios = ' / '.join(
      f'{step["over_sgd"][key]:.2f}' if key in step['over_sgd'] else 'n/a'
      for key in ('kernels', 'flops', 'bytes', 'seconds')
    )
    ms = f'{step["seconds"] * 1e3:.1f}' if 'seconds' in step else 'n/a'
    lines.append(
      f'| {name} | {step["kernels"]} ({step["layout_kernels"]})'
      f' | {step["flops"] / 1e9:.1f}'
      f' | {step["bytes"] / 1e9:.2f} | {ms} | {ratios} |'
    )
  parts = result['steps']['frog'].get('kernels_by_part')
  if parts:
    lines += [
      '',
      'FROG step kernels by part: '
      + ', '.join(f'{name} {n}' for name, n in parts.items())
      + '.',
    ]
  return '\n'.join(lines)


BEGIN = '<!-- benchmarks:begin (generated by benchmarks.report) -->'
END = '<!-- benchmarks:end -->'


def _shown_command(command: str) -> str:
  """The recorded command with its data path shown as a placeholder."""
  return re.sub(
    r'--data([ =])\S*?([^/\s]+)(?=\s|$)', r'--data\1path/to/\2', command
  )


def page_block(folder: str, page: str) -> str:
  """The generated block of `page`, its figure paths relative to the page."""
  prefix = os.path.relpath(folder, os.path.dirname(page) or '.')
  return render(folder, image_prefix=prefix.rstrip('/') + '/')


def write(folder: str, page: str | None = None) -> str:
  """Writes `summary.md` and the task plots (and the page's block)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  text = render(folder, draw=True)
  with open(os.path.join(folder, 'summary.md'), 'w') as f:
    f.write(text)
  if page:
    with open(page) as f:
      old = f.read()
    head, rest = old.split(BEGIN)
    _, tail = rest.split(END)
    with open(page, 'w') as f:
      f.write(f'{head}{BEGIN}\n{page_block(folder, page)}\n{END}{tail}')
  return text


if __name__ == '__main__':
  print(write(sys.argv[1], *sys.argv[2:3]))
