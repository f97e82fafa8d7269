"""The documentation site builds with warnings as errors and covers the API."""

import inspect
import pathlib
import re

from sphinx.cmd import build as sphinx_build

import frog_optax as fo

DOCS = pathlib.Path(__file__).resolve().parents[1] / 'docs'


def _public_names():
  modules = (fo.jax, fo.linen, fo.nnx)
  names = [
    f'frog_optax.{n}'
    for n in fo.__all__
    if n not in {m.__name__.rpartition('.')[2] for m in modules}
  ]
  for module in modules:
    names += [
      f'{module.__name__}.{n}' for n in module.__all__ if not n.isupper()
    ]
  return names


def test_every_public_name_is_in_the_api_reference():
  text = (DOCS / 'api.md').read_text()
  listed = set()
  for block in re.findall(r'currentmodule:: (\S+)(.*?)```', text, re.S):
    module, body = block
    listed |= {
      f'{module}.{name}' for name in re.findall(r'^   (\w+)$', body, re.M)
    }
  missing = sorted(set(_public_names()) - listed)
  assert not missing


def test_docs_build_without_warnings(tmp_path):
  status = sphinx_build.build_main(
    ['-W', '--keep-going', '-q', '-b', 'html', str(DOCS), str(tmp_path)]
  )
  assert status == 0
  assert (tmp_path / 'api.html').exists()
  assert (tmp_path / '_autosummary' / 'frog_optax.frog.html').exists()


def test_public_signatures_read_as_written():
  # help(fo.frog) shows `optax.ScalarOrSchedule`, not its expanded Union.
  for module in (fo, fo.jax, fo.linen, fo.nnx):
    for name in module.__all__:
      obj = getattr(module, name)
      if callable(obj) and not isinstance(obj, type):
        signature = str(inspect.signature(obj))
        assert 'jaxlib' not in signature and 'Union[' not in signature, name
