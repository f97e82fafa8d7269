"""The character-level LM example: corpus, both optimizers, the report."""

import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

import frog_optax as fo
from examples.char_lm import corpus as corpus_lib
from examples.char_lm import main
from examples.char_lm import train


def test_corpus_is_stdlib_text_split_without_overlap(tmp_path):
  for name, text in (('b.py', 'def f():\n  return 1\n'), ('a.py', 'π = 3\n')):
    (tmp_path / name).write_text(text * 20, encoding='utf-8')
  (tmp_path / 'notes.txt').write_text('ignored')
  corpus = corpus_lib.load(300, str(tmp_path))
  assert corpus.files == ('a.py', 'b.py')
  tokens = np.concatenate([corpus.train, corpus.valid])
  raw = ((('π = 3\n' * 20) + ('def f():\n  return 1\n' * 20)).encode())[:300]
  want = [b if b < 128 else ord('?') for b in raw]
  np.testing.assert_array_equal(tokens, want)
  assert len(corpus.train) == 270
  with pytest.raises(ValueError, match='max_chars'):
    corpus_lib.load(10**9, str(tmp_path))


def test_batches_are_next_character_windows():
  tokens = np.arange(100, dtype=np.int32)
  inputs, targets = next(corpus_lib.batches(tokens, 5, 8, seed=0))
  assert inputs.shape == targets.shape == (5, 8)
  np.testing.assert_array_equal(targets, inputs + 1)


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('char_lm')
  if not flags.FLAGS.is_parsed():  # pytest's argv is not ours to parse
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(
    out=str(out),
    steps=30,
    max_chars=20_000,
    variants=['adamw', 'frog'],
    grid=1,
    eval_every=15,
    warmup_steps=5,
  ):
    main.main([])
  with open(out / 'char_lm.json') as f:
    return out, json.load(f)


def test_both_optimizers_learn_and_the_report_is_written(report):
  out, record = report
  assert os.path.getsize(out / 'loss_vs_time.png') > 0
  assert [r['variant'] for r in record['runs']] == ['adamw', 'frog']
  for run in record['runs']:
    curve = run['curve']
    assert curve['step'] == [0, 15, 30]
    # From ln(128) = 4.85 nats at the start, both learn character statistics.
    assert curve['valid_loss'][-1] < curve['valid_loss'][0] - 1.0
    assert curve['seconds'][-1] > 0 and run['compile_seconds'] > 0
  assert set(record['best']) == {'adamw', 'frog'}
  assert record['corpus']['train_chars'] == 18_000


def test_frog_run_preconditions_the_scanned_attention_layers():
  config = train.Config(optimizer='frog', steps=1)
  model = train.make_model(config)
  tokens = np.zeros((4, config.length), np.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: apply_fn({'params': p}, tokens).mean()
  _, _, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  table = fo.describe(params, stats, exclude='head')
  route = {line.split()[0]: line for line in table.splitlines()[2:]}
  for name in ('attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp_in'):
    assert ' frog ' in route[f'blocks/{name}']
  # D per row: 64 inputs + bias for the projections (one layer of the stack).
  assert ' 65 ' in route['blocks/attn/query']
  assert ' fallback ' in route['tokens']
  assert 'excluded' in route['head']


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match='optimizer'):
    train.make_optimizer(train.Config(optimizer='sgd'))
  with pytest.raises(ValueError, match='warmup_steps'):
    train.make_optimizer(train.Config(steps=10, warmup_steps=10))
