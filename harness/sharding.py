"""Parameter shardings for FSDP and tensor parallelism, and HLO collectives.

FSDP shards a kernel along its (first) input axis, tensor parallelism along
its output axis, which for FROG is the row axis: each device then solves the
row systems of its own rows, and needs nothing from the others but the
sampled inputs.
"""

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import frog_optax as fo

COLLECTIVES = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'all-to-all',
  'collective-permute',
)


def _axis_if_divides(mesh: Mesh, axis: str | None, size: int) -> str | None:
  if axis is None or size % mesh.shape[axis]:
    return None
  return axis


def _leaf_spec(mesh, name, shape, layout, fsdp, tp) -> P:
  spec = [None] * len(shape)
  stacked = layout.stacked_axes
  if name == 'bias':
    spec[-1] = _axis_if_divides(mesh, tp, shape[-1])
  elif name == 'embedding':
    spec[0] = _axis_if_divides(mesh, fsdp, shape[0])
  elif name == 'kernel' and len(shape) - stacked >= 2:
    spec[-1] = _axis_if_divides(mesh, tp, shape[-1])
    # Dense (in, out) and Conv (*window, in, out): `in` is second to last;
    # a DenseGeneral or Einsum kernel: its first axis after the stack.
    first_in = -2 if layout.num_input_axes is None else stacked
    spec[first_in] = _axis_if_divides(mesh, fsdp, shape[first_in])
  return P(*spec)


def param_shardings(
  params: Any,
  mesh: Mesh,
  *,
  fsdp: str | None = None,
  tp: str | None = None,
  layouts: Any = None,
) -> Any:
  """A `NamedSharding` per parameter: FSDP on `fsdp`, rows on `tp`.

  Args:
    params: the parameter tree (nested dicts of arrays or shapes).
    mesh: the device mesh.
    fsdp: mesh axis that shards each kernel's first input axis (and each
      embedding's vocabulary axis), or None.
    tp: mesh axis that shards each kernel's and bias's last (output, row)
      axis, or None.
    layouts: `fo.linen.layouts(...)`, so that the leading layer axes of an
      `nn.scan` stack stay whole and a DenseGeneral kernel's input axis is
      found; None for plain Dense and Conv layers.

  Axes a mesh axis does not divide stay whole; other leaves are replicated.
  """

  def layout_of(path) -> fo.ParamLayout:
    node = layouts
    for key in path[:-1]:
      if not isinstance(node, dict) or key.key not in node:
        return fo.ParamLayout()
      node = node[key.key]
    return node if isinstance(node, fo.ParamLayout) else fo.ParamLayout()

  def spec(path, leaf):
    return NamedSharding(
      mesh,
      _leaf_spec(mesh, path[-1].key, leaf.shape, layout_of(path), fsdp, tp),
    )

  return jax.tree_util.tree_map_with_path(spec, params)


def collectives(hlo_text: str) -> list[tuple[str, int]]:
  """`(kind, elements moved)` of every collective in compiled HLO text."""
  found = []
  pattern = re.compile(
    r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(?:-start)?\('
  )
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shapes = re.findall(r'[a-z]+\d*\[([\d,]*)\]', match.group(1))
    elements = sum(
      int(np.prod([int(d) for d in s.split(',') if d])) for s in shapes
    )
    found.append((match.group(2), elements))
  return found
