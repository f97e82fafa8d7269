"""Module and parameter paths: how a tree path is named, and trees by path.

`exclude`, the routing, the stats trees and the error messages all name a
module by its '/'-joined path, the same for linen parameter dicts, NNX
states and plain trees. The stats trees and the optimizers' per-layer state
are params-prefix trees with an entry at the node a path names: built by
:func:`place`, read back by :func:`entries_by_path` (or walked with the
parameters' nesting).
"""

from collections.abc import Mapping
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


def entries_by_path(tree: Any, kind: type) -> dict[str, Any]:
  """`{path: entry}` of the entries of type `kind` in a params-prefix tree.

  E.g. `entries_by_path(stats, fo.LayerStats)` for the captured layers, or
  `fo.UncapturedLayer` for those the capture refused.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, kind)
  )
  return {path_name(p): leaf for p, leaf in flat if isinstance(leaf, kind)}


def place(params: Any, entries: Mapping[str, Any]) -> Any:
  """The params-prefix tree with `entries` at the nodes they name.

  Args:
    params: the parameter tree (nested mappings, lists and tuples of
      arrays, or any pytree whose leaves are named).
    entries: `{path: value}`, a path naming a module dict (the value takes
      the whole dict's place) or a leaf ('/'-joined, as :func:`path_name` names
      them).

  Returns:
    The nesting of `params` with each entry in place of the node it names
    and `None` at every other leaf. Captured stats, the refusals and the
    optimizers' per-layer state all take this form.
  """

  def build(node, prefix):
    name = '/'.join(prefix)
    if name in entries:
      return entries[name]
    if isinstance(node, Mapping):
      return {k: build(v, prefix + (str(k),)) for k, v in node.items()}
    if isinstance(node, (list, tuple)) and not hasattr(node, '_fields'):
      return type(node)(
        build(v, prefix + (str(i),)) for i, v in enumerate(node)
      )
    # A leaf (an NNX Variable counts as one: `nnx.Optimizer` initialises
    # with Variables and updates with arrays), or another pytree whose
    # leaves are named by their paths.
    flat, treedef = jax.tree_util.tree_flatten_with_path(node)
    names = [
      '/'.join([*prefix, *filter(None, [path_name(param_path(p))])])
      for p, _ in flat
    ]
    if all(n == name for n in names):
      return None
    return treedef.unflatten([entries.get(n) for n in names])

  return build(params, ())
