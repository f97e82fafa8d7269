"""Module and parameter paths: how a tree path is named.

`exclude`, the routing, the stats trees and the error messages all name a
module by its '/'-joined path, the same for linen parameter dicts, NNX
states and plain trees.
"""

from typing import Any

import jax


def key_name(key: Any) -> str:
  """The name of one tree-path entry (dict key, attribute or index)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: tuple[Any, ...]) -> str:
  """A '/'-joined module or parameter path, as used by `exclude`."""
  return '/'.join(key_name(k) for k in path)


def param_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
  """A leaf's path without the `.value` of a Flax NNX `Variable`.

  `nnx.Optimizer` initialises the optimizer with a state of Variables
  (paths end in `.value`) and updates it with plain arrays; both must name
  the same parameter.
  """
  last = path[-1] if path else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name == 'value':
    return path[:-1]
  return path


def module_and_leaf(path: tuple[Any, ...]) -> tuple[str, str]:
  """`('block/Dense_0', 'kernel')` for a parameter leaf's tree path."""
  path = param_path(path)
  return path_name(path[:-1]), key_name(path[-1])
