"""The README's code runs as written, and it speaks to users only."""

import pathlib
import re

import numpy as np

README = (pathlib.Path(__file__).resolve().parents[1] / 'README.md').read_text()


def test_quickstarts_run_as_written_and_train():
  blocks = re.findall(r'```python\n(.*?)```', README, re.S)
  # linen, then NNX and any-JAX (which reuse x, y and optax)
  assert len(blocks) == 3
  scope = {}
  exec(blocks[0], scope)  # noqa: S102
  first = float(scope['loss'])
  for _ in range(3):
    out = scope['train_step'](
      scope['params'],
      scope['batch_stats'],
      scope['opt_state'],
      scope['x'],
      scope['y'],
    )
    scope['params'], scope['batch_stats'], scope['opt_state'], loss = out
  assert np.isfinite(first) and float(loss) < first
  exec(blocks[1], scope)  # noqa: S102
  assert np.isfinite(float(scope['loss']))
  assert int(scope['optimizer'].step[...]) == 1
  exec(blocks[2], scope)  # noqa: S102
  assert scope['stats']['w'].layout.bias_path == 'b'
  assert np.all(np.asarray(scope['updates']['w']) != 0)


def test_readme_is_short_and_has_no_outside_paths_or_internal_words():
  assert len(README) <= 16_000 and README.count('\n') <= 250
  for word in ('../', 'the seed', 'issue', 'lent', 'ALGORITHM.md'):
    assert word not in README, word
  # Images would break once the README is a package's long description.
  assert '![' not in README
