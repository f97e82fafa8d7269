"""One tiny run of the main job on sklearn digits (no download, CPU)."""

import json
import os

import numpy as np

from examples.compare import train
from examples.compare.configs import default


def test_train_and_evaluate_writes_results(tmp_path):
  config = default.get_config()
  config.features = (8, 8)
  config.batch_size = 64
  config.num_epochs = 2
  config.eval_every = 5
  config.timing_rounds = 2
  config.num_seeds = 2
  results = train.train_and_evaluate(config, str(tmp_path))

  for name in ('results.json', 'summary.md', 'accuracy_vs_time.png'):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / 'results.json') as f:
    saved = json.load(f)
  assert set(saved['optimizers']) == {'frog', 'sgd', 'adamw'}
  steps = 2 * (int(0.8 * 1797) // 64)  # 2 epochs of the 80% digits split
  del results
  for name, summary in saved['optimizers'].items():
    assert [r['seed'] for r in summary['runs']] == [0, 1]
    for run in summary['runs']:
      history = run['history']
      assert history[-1]['step'] == summary['steps'] == steps
      assert np.isfinite(history[-1]['train_loss']), name
      # Two epochs on digits lift every optimizer well above chance (10%).
      assert run['final_test_accuracy'] > 0.3, name
      times = [h['train_seconds'] for h in history]
      assert times == sorted(times) and times[-1] > 0
    finals = [r['final_test_accuracy'] for r in summary['runs']]
    assert summary['final_test_accuracy'] == np.mean(finals)
    # Different seeds: different initialisations and batch orders.
    first, second = (r['history'] for r in summary['runs'])
    assert first[1]['train_loss'] != second[1]['train_loss']
  assert saved['step_seconds']['sgd'] > 0
  assert saved['versions']['frog_optax']
  assert saved['verdict'] in (tmp_path / 'summary.md').read_text()
  assert 'over 2 seeds' in saved['verdict']
