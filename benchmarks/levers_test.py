"""The levers ablation on the smoke task: variants, scores and verdicts."""

import json

import pytest

from benchmarks import levers
from benchmarks import optimizers
from benchmarks import report


def test_levers_train_on_validation_and_time_every_variant(
  tmp_path, monkeypatch
):
  argv = ['--task', 'smoke', '--lr', '0.1', '--seeds', '0,1']
  argv += ['--variants', 'base,k=2', '--timing-rounds', '2']
  result = levers.main([*argv, '--out', str(tmp_path)])
  with open(tmp_path / 'levers_smoke.json') as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert list(result['variants']) == ['base', 'k=2']
  for v in result['variants'].values():
    assert [r['seed'] for r in v['seed_runs']] == [0, 1]
    assert all(r['learning_rate'] == 0.1 for r in v['seed_runs'])
  assert result['variants']['base']['cost']['ratio_to_base'] == 1.0
  assert 'validation' in result['split']
  text = (tmp_path / 'levers_smoke.md').read_text()
  assert '| k=2 | half the CG iterations |' in text
  assert result['verdicts']['k=2'].startswith(('within', 'better', 'worse'))
  assert report.load(str(tmp_path)) == ([], [])  # not read as a task

  # A second call with one more variant trains that one alone: the
  # finished ones are reused, and every step cost is timed again.
  trained = []
  train_run = levers.protocol.train_run

  def logged(task, spec, *args, **kwargs):
    trained.append(spec.name)
    return train_run(task, spec, *args, **kwargs)

  monkeypatch.setattr(levers.protocol, 'train_run', logged)
  argv[argv.index('base,k=2')] = 'base,k=2,s=16'
  again = levers.main([*argv, '--out', str(tmp_path)])
  assert trained == ['s=16', 's=16']
  assert list(again['variants']) == ['base', 's=16', 'k=2']  # table order
  for name in ('base', 'k=2'):
    assert again['variants'][name]['seed_runs'] == json.loads(
      json.dumps(result['variants'][name]['seed_runs'])
    )
  # At another learning rate nothing is reused.
  trained.clear()
  argv[argv.index('0.1')] = '0.2'
  levers.main([*argv, '--out', str(tmp_path), '--variants', 'base'])
  assert trained == ['base', 'base']


def test_variants_change_one_setting_each():
  table = levers.variants(total_steps=100)
  assert table['base'][1] == {}
  assert table['s=16'][1] == {'sample_size': optimizers.FROG_SAMPLE_SIZE // 2}
  several = [n for n, (_, o) in table.items() if n != 'base' and len(o) != 1]
  # At the base's matvec count; and two single changes together.
  assert several == ['warm start k=3', 's=16 + head preconditioned']
  assert table['s=16 + head preconditioned'][1] == dict(
    table['s=16'][1], **table['head preconditioned'][1]
  )
  schedule = table['warm-up'][1]['schedule'](lambda step: 0.3)
  assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.3)


def test_an_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match=r"\['k=9'\] are not levers"):
    levers.run(None, None, 0.1, (0,), 1, names=['base', 'k=9'])


def test_without_a_frog_pick_the_levers_ask_for_one(tmp_path):
  with pytest.raises(FileNotFoundError, match='--lr'):
    levers.main(['--task', 'smoke', '--pieces', str(tmp_path)])
