"""Every notebook executes from a clean kernel and draws its figures."""

import pathlib

import nbclient
import nbformat
import pytest

HERE = pathlib.Path(__file__).parent
NOTEBOOKS = sorted(HERE.glob('*.ipynb'))


def _images(cell) -> int:
  return sum('image/png' in o.get('data', {}) for o in cell.get('outputs', []))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_draws(path):
  committed = nbformat.read(path, as_version=4)
  # Outputs are kept in the repository so the notebook reads on GitHub.
  committed_images = [
    _images(c) for c in committed.cells if c.cell_type == 'code'
  ]
  assert sum(committed_images) > 0, f'{path.name} was committed without outputs'

  fresh = nbformat.read(path, as_version=4)
  for cell in fresh.cells:
    if cell.cell_type == 'code':
      cell.outputs = []
  # Raises CellExecutionError on any failing cell.
  nbclient.NotebookClient(
    fresh,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': str(HERE)}},
  ).execute()
  fresh_images = [_images(c) for c in fresh.cells if c.cell_type == 'code']
  assert fresh_images == committed_images
