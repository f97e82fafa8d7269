"""Markdown tables from sweep JSON files (the README includes the output).

python -m examples.compare.summarize_sweep examples/compare/results/sweep_*.json
"""

import json
import sys


def best_rows(runs):
  """Per optimizer, the run with the best final validation accuracy."""
  best = {}
  for r in runs:
    key = r['optimizer']
    if key not in best or r['val_accuracy'] > best[key]['val_accuracy']:
      best[key] = r
  return best


def table(path):
  with open(path) as f:
    sweep = json.load(f)
  cfg = sweep['config']
  lines = [
    f'**{cfg["dataset"]}**, {cfg["num_epochs"]} epochs, batch'
    f' {cfg["batch_size"]}, validation = last 20% of the training split'
    f' ({sweep["machine"]["processor"]}):',
    '',
    '| optimizer | learning rate | damping | head | val acc | final train'
    ' loss |',
    '|---|---|---|---|---|---|',
  ]
  chosen = best_rows(sweep['runs'])
  for r in sweep['runs']:
    head = ''
    if 'exclude' in r:
      head = 'excluded' if r['exclude'] else 'FROG'
    mark = ' **(best)**' if r is chosen[r['optimizer']] else ''
    loss = r['final_train_loss']
    lines.append(
      f'| {r["optimizer"]}{mark} | {r["learning_rate"]:g} |'
      f' {r.get("damping", "") if "damping" in r else ""} | {head} |'
      f' {r["val_accuracy"]:.4f} | {loss:.3g} |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  print('\n\n'.join(table(p) for p in sys.argv[1:]))
