"""The one-command GPU benchmark, end to end in its CPU smoke mode."""

import importlib.abc
import json
import math
import sys

import pytest

from benchmarks import gpu_all
from harness import kfac_compat


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_all')
  summary = gpu_all.main(['--smoke', '--out-dir', str(out)])
  return out, summary


def test_writes_each_run_and_the_summary(outputs):
  out, summary = outputs
  for dtype in ('float32', 'bfloat16'):
    assert (out / f'step_cost_convnet_{dtype}.json').exists()
    assert (out / f'step_cost_convnet_{dtype}.png').exists()
  assert json.loads((out / 'gpu_all.json').read_text()) == summary
  assert summary['versions']['jax'] and summary['machine']['backend']


def test_headline_ratios_come_from_the_runs(outputs):
  out, summary = outputs
  for dtype, h in summary['runs'].items():
    run = json.loads((out / f'step_cost_convnet_{dtype}.json').read_text())
    assert run['setup']['dtype'] == dtype
    (point,) = [p for p in run['points'] if p['cg_iters'] == 1]
    assert h['frog_over_sgd'] == point['ratio'] > 0
    assert h['cost_model'] == pytest.approx(1 + 2 * 1 * 2 / (3 * 8))
    assert math.isfinite(h['adamw_over_sgd'])
    assert set(h['breakdown_ms']) >= {
      'capture',
      'trace',
      'cg_forward_conv',
      'cg_transpose_conv',
      'solve_total',
    }
  table = (out / 'gpu_all.md').read_text()
  assert '| float32 |' in table and '| bfloat16 |' in table
  census = json.loads((out / 'step_census_convnet_float32.json').read_text())
  assert summary['census'] == census['steps']['frog']['over_sgd']
  assert set(summary['census']) == {'kernels', 'flops', 'bytes', 'seconds'}
  assert f'kernels {summary["census"]["kernels"]:.2f}' in table


def test_the_gpu_runs_time_resnet18_at_batch_512_in_both_dtypes():
  args = gpu_all.runs(smoke=False, rounds=10)
  assert '512' in args['bfloat16'][args['bfloat16'].index('--batches') + 1]
  assert args['bfloat16'][args['bfloat16'].index('--dtype') + 1] == 'bfloat16'
  assert '--net' not in args['float32']  # the default: ResNet-18


def test_a_run_cut_short_keeps_what_finished(tmp_path, monkeypatch):
  class TimeLimit(Exception):
    pass

  def cut_short(argv):
    raise TimeLimit

  monkeypatch.setattr(gpu_all.step_cost, 'main', cut_short)
  with pytest.raises(TimeLimit):
    gpu_all.main(['--smoke', '--out-dir', str(tmp_path)])
  summary = json.loads((tmp_path / 'gpu_all.json').read_text())
  assert summary['runs'] == {} and summary['census']['kernels'] > 1
  assert 'FROG/SGD of the compiled' in (tmp_path / 'gpu_all.md').read_text()


def test_a_kfac_jax_that_fails_on_this_jax_is_left_out(monkeypatch):
  # kfac-jax releases import jax APIs that newer jax removed: the import
  # then raises AttributeError, not ImportError.
  class Removed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
      if name == 'kfac_jax':
        raise AttributeError('jax.core.Effects was removed')
      return None

  monkeypatch.delitem(sys.modules, 'kfac_jax', raising=False)
  monkeypatch.setattr(sys, 'meta_path', [Removed(), *sys.meta_path])
  assert kfac_compat.import_error().startswith('AttributeError')
  args = gpu_all.runs(smoke=False, rounds=10)['float32']
  assert '--no-kfac' in args and '--kfac' not in args
