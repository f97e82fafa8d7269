"""Which parameters of any JAX function are Dense or Conv layers: a jaxpr walk.

The function is traced once to a jaxpr. A parameter leaf is a layer's kernel
when it reaches exactly one `dot_general` or `conv_general_dilated` as one
operand, through ops that keep its entries in place (`convert_element_type`,
`transpose`), and nothing else. A second parameter leaf is that layer's bias
when, through reshapes and broadcasts only, it is added to the layer's
outputs (themselves through reshapes and transposes only) along the output
features: that is checked on index arrays, not assumed. Everything else is
not captured, with the reason: a leaf used by another op, by two matmuls,
inside a loop or a custom-derivative function, or a matmul the row form
cannot express (a batched kernel, no batch axis to sample from), or a
constant of a scan (the same weights at every step).

The walk looks into `jit`, `jax.checkpoint` and `lax.scan` (a leaf the scan
runs over is a stack of layers, one per step); the capture
(`jaxpr_capture`) then re-evaluates the same jaxpr with a tap on the output
of every matched op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from frog_optax._src import geometry as geometry_lib
from frog_optax._src import layer_maps
from frog_optax._src import sampling
from frog_optax._src import stats as stats_lib

# Ops that keep a kernel's entries, only moving (or casting) them.
KERNEL_VIEWS = frozenset({'convert_element_type', 'transpose', 'copy'})
# Ops a bias (or a layer's outputs before its bias) may pass through.
SHAPE_VIEWS = frozenset(
  {
    'convert_element_type',
    'copy',
    'transpose',
    'reshape',
    'squeeze',
    'expand_dims',
    'broadcast_in_dim',
  }
)
OUTPUT_VIEWS = SHAPE_VIEWS - {'broadcast_in_dim'}
CALLS = frozenset({'pjit', 'jit', 'closed_call', 'core_call'})
REMATS = frozenset({'remat2', 'remat', 'checkpoint'})
MATMULS = frozenset({'dot_general', 'conv_general_dilated'})


def sub_jaxpr(eqn) -> tuple[Any, tuple[Any, ...]] | None:
  """The jaxpr and consts a call or checkpoint evaluates, or None."""
  name = eqn.primitive.name
  if name in CALLS:
    closed = eqn.params.get('jaxpr') or eqn.params.get('call_jaxpr')
    return closed.jaxpr, tuple(closed.consts)
  if name in REMATS:
    return eqn.params['jaxpr'], ()
  return None


@dataclasses.dataclass(frozen=True)
class View:
  """A parameter leaf seen through view ops: its index and the ops.

  Inside a `lax.scan` body, `stacked` is the scan length when the leaf is
  scanned over (one slice per step: a stack of layers), and `shared` says
  that the leaf is a constant of the scan (the same weights at every step).
  """

  leaf: int
  eqns: tuple[Any, ...] = ()
  stacked: int | None = None
  shared: bool = False

  def then(self, eqn) -> View:
    return dataclasses.replace(self, eqns=self.eqns + (eqn,))

  def kernel_perm(self) -> tuple[int, ...] | None:
    """`perm[a]` = the leaf axis behind axis `a`, if only moved/cast."""
    perm = None
    for eqn in self.eqns:
      name = eqn.primitive.name
      if name not in KERNEL_VIEWS:
        return None
      if name == 'transpose':
        p = tuple(int(i) for i in eqn.params['permutation'])
        perm = p if perm is None else tuple(perm[i] for i in p)
    return perm

  def only(self, allowed) -> bool:
    return all(e.primitive.name in allowed for e in self.eqns)


@dataclasses.dataclass(frozen=True)
class DenseTap:
  """A matched `dot_general`: which operand is the data, and its map."""

  x_operand: int
  dense: layer_maps.DenseMap
  rows: int

  def sample(self, x, y, examples) -> layer_maps.Sampled:
    return layer_maps.sample_dense(x, y, examples, self.dense)


@dataclasses.dataclass(frozen=True)
class ConvTap:
  """A matched `conv_general_dilated` with any dimension numbers."""

  x_perm: tuple[int, ...]  # the inputs to (batch, *spatial, c_in)
  y_perm: tuple[int, ...]  # the outputs to (batch, *spatial, c_out)
  geometry: geometry_lib.ConvGeometry
  layout: stats_lib.ParamLayout
  rows: int
  x_operand: int = 0

  def sample(self, x, y, examples) -> layer_maps.Sampled:
    x_sampled = jax.lax.stop_gradient(
      sampling.take_examples(jnp.transpose(x, self.x_perm), examples)
    )
    y_t = jnp.transpose(y, self.y_perm)
    p_shape = jax.eval_shape(
      lambda t: sampling.take_examples(t, examples), y_t
    ).shape
    inverse = tuple(int(i) for i in np.argsort(self.y_perm))

    def add_perturbation(p):
      return jnp.transpose(sampling.tap_examples(y_t, examples, p), inverse)

    return layer_maps.Sampled(
      inputs=x_sampled,
      perturbation_shape=p_shape,
      add_perturbation=add_perturbation,
      geometry=self.geometry,
      layout=self.layout,
    )


@dataclasses.dataclass
class Match:
  """What the walk found.

  Attributes:
    taps: `{op key: tap}`; an op key is the eqn's index path through the
      nested jaxprs, e.g. `(4,)` or `(2, 0)` inside the call at eqn 2.
    kernels: `{leaf index: op key}` of the captured kernels.
    biases: `{kernel leaf index: bias leaf index}`.
    refused: `{leaf index: UncapturedLayer}` of the leaves not captured.
    nested: op-key prefixes of the calls that hold a tap.
    stacked: `{op key: scan length}` of the taps inside a `lax.scan` over
      stacked layers (their perturbations and stats gain that leading axis).
  """

  taps: dict[tuple[int, ...], Any] = dataclasses.field(default_factory=dict)
  kernels: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  biases: dict[int, int] = dataclasses.field(default_factory=dict)
  refused: dict[int, stats_lib.UncapturedLayer] = dataclasses.field(
    default_factory=dict
  )
  nested: set[tuple[int, ...]] = dataclasses.field(default_factory=set)
  stacked: dict[tuple[int, ...], int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Walk:
  """The state of one walk: views, uses, and the candidate ops."""

  views: dict[Any, View] = dataclasses.field(default_factory=dict)
  # {leaf: [(kind, detail)]}: 'op' (op key), 'bias' (op key), 'other' (why).
  uses: dict[int, list[tuple[str, Any]]] = dataclasses.field(
    default_factory=dict
  )
  taps: dict[tuple[int, ...], Any] = dataclasses.field(default_factory=dict)
  tap_refusals: dict[tuple[int, ...], str] = dataclasses.field(
    default_factory=dict
  )
  # {var: (op key, view ops from the op's output)} of layer outputs.
  outputs: dict[Any, tuple[tuple[int, ...], tuple[Any, ...]]] = (
    dataclasses.field(default_factory=dict)
  )
  bias_adds: dict[tuple[int, ...], list[tuple[int, Any, Any]]] = (
    dataclasses.field(default_factory=dict)
  )
  out_avals: dict[tuple[int, ...], Any] = dataclasses.field(
    default_factory=dict
  )
  stacked: dict[tuple[int, ...], int] = dataclasses.field(default_factory=dict)

  def use(self, leaf, kind, detail):
    self.uses.setdefault(leaf, []).append((kind, detail))


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def _dense_tap(eqn, k_operand: int, perm) -> DenseTap | str:
  """The tap of a `dot_general` with its kernel at `k_operand`, or why not."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  if len(lb) or len(rb):
    return 'its dot_general has batch dimensions (a batched kernel)'
  avals = [v.aval for v in eqn.invars]
  k_contract = tuple(int(a) for a in (lc, rc)[k_operand])
  x_contract = tuple(int(a) for a in (lc, rc)[1 - k_operand])
  k_ndim, x_ndim = avals[k_operand].ndim, avals[1 - k_operand].ndim
  k_free = tuple(a for a in range(k_ndim) if a not in k_contract)
  x_free = tuple(a for a in range(x_ndim) if a not in x_contract)
  if 0 not in x_free:
    return (
      'its dot_general contracts axis 0 of the inputs, so there is no batch'
      ' axis to sample from'
    )
  if not k_contract or not k_free:
    return 'its dot_general leaves the kernel no input or no output axis'
  # dot_general orders its outputs (lhs free axes, rhs free axes).
  labels = [('x', a) for a in x_free]
  labels = (
    [('k', a) for a in k_free] + labels
    if k_operand == 0
    else labels + [('k', a) for a in k_free]
  )
  batch = labels.index(('x', 0))
  moved = [labels[batch]] + labels[:batch] + labels[batch + 1 :]
  perm = perm or tuple(range(k_ndim))
  kernel_perm = tuple(perm[a] for a in k_contract + k_free)
  shape = avals[k_operand].shape
  return DenseTap(
    x_operand=1 - k_operand,
    dense=layer_maps.DenseMap(
      x_perm=x_free + x_contract,
      num_input_axes=len(x_contract),
      y_perm=tuple(moved.index(('x', a)) for a in x_free)
      + tuple(moved.index(('k', a)) for a in k_free),
      num_output_axes=len(k_free),
      layout=layer_maps.kernel_layout(
        len(k_contract), len(k_free), kernel_perm
      ),
      y_batch_axis=batch,
    ),
    rows=int(np.prod([shape[a] for a in k_free])),
  )


def _conv_tap(eqn, k_operand: int, perm) -> ConvTap | str:
  """The tap of a `conv_general_dilated` whose rhs is the kernel."""
  if k_operand != 1:
    return 'its conv_general_dilated takes the parameter as the inputs'
  p = eqn.params
  if p['batch_group_count'] != 1:
    return 'its conv_general_dilated has batch_group_count > 1'
  dn = p['dimension_numbers']
  lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  channels_last = lambda spec: (spec[0], *spec[2:], spec[1])
  ndim = len(lhs)
  perm = perm or tuple(range(ndim))
  hwio = (*rhs[2:], rhs[1], rhs[0])  # kernel axes to (*window, c_in, rows)
  kernel_perm = tuple(perm[a] for a in hwio)
  if kernel_perm == tuple(range(ndim)):
    kernel_perm = None
  spatial = ndim - 2
  lhs_dilation = p['lhs_dilation'] or (1,) * spatial
  rhs_dilation = p['rhs_dilation'] or (1,) * spatial
  return ConvTap(
    x_perm=tuple(int(a) for a in channels_last(lhs)),
    y_perm=tuple(int(a) for a in channels_last(out)),
    geometry=geometry_lib.ConvGeometry(
      strides=tuple(int(s) for s in p['window_strides']),
      padding=tuple((int(lo), int(hi)) for lo, hi in p['padding']),
      input_dilation=tuple(int(d) for d in lhs_dilation),
      kernel_dilation=tuple(int(d) for d in rhs_dilation),
      feature_group_count=int(p['feature_group_count']),
    ),
    layout=stats_lib.ParamLayout(kernel_perm=kernel_perm),
    rows=int(eqn.invars[1].aval.shape[rhs[0]]),
  )


def _walk(jaxpr, in_views: dict[int, View], walk: _Walk, prefix) -> None:
  """Follows the views of parameter leaves through `jaxpr`'s eqns."""
  walk.views.update(
    {jaxpr.invars[i]: v for i, v in in_views.items() if i < len(jaxpr.invars)}
  )
  for index, eqn in enumerate(jaxpr.eqns):
    key = prefix + (index,)
    name = eqn.primitive.name
    ins = [walk.views.get(v) if _is_var(v) else None for v in eqn.invars]
    viewed = [i for i, v in enumerate(ins) if v is not None]
    outs = [walk.outputs.get(v) if _is_var(v) else None for v in eqn.invars]
    if name in SHAPE_VIEWS and viewed == [0]:
      walk.views[eqn.outvars[0]] = ins[0].then(eqn)
      continue
    if name in OUTPUT_VIEWS and outs[0] is not None and not viewed:
      op, chain = outs[0]
      walk.outputs[eqn.outvars[0]] = (op, chain + (eqn,))
    if name in MATMULS and len(viewed) == 1:
      k = viewed[0]
      view = ins[k]
      perm = view.kernel_perm()
      if perm is None and not view.only(KERNEL_VIEWS):
        walk.use(view.leaf, 'other', f'it reaches {name} through a reshape')
        continue
      make = _dense_tap if name == 'dot_general' else _conv_tap
      tap = make(eqn, k, perm)
      walk.use(view.leaf, 'op', key)
      if view.shared:
        tap = (
          'it is used at every step of a lax.scan (the same weights in every'
          ' step are not split between the steps)'
        )
      if isinstance(tap, str):
        walk.tap_refusals[key] = tap
      else:
        walk.taps[key] = tap
        walk.outputs[eqn.outvars[0]] = (key, ())
        walk.out_avals[key] = eqn.outvars[0].aval
        if view.stacked is not None:
          walk.stacked[key] = view.stacked
      continue
    if name == 'add' and len(viewed) == 1:
      other = outs[1 - viewed[0]]
      view = ins[viewed[0]]
      if other is not None and view.only(SHAPE_VIEWS):
        op, chain = other
        walk.use(view.leaf, 'bias', op)
        walk.bias_adds.setdefault(op, []).append((view.leaf, view, chain))
        continue
    if name == 'scan' and viewed:
      _walk_scan(eqn, ins, viewed, walk, key)
      continue
    inner = sub_jaxpr(eqn)
    if inner is not None and viewed:
      sub, _ = inner
      _walk(sub, {i: ins[i] for i in viewed}, walk, key)
      # Views and layer outputs the call returns go on outside it.
      for inside, outside in zip(sub.outvars, eqn.outvars):
        if _is_var(inside) and inside in walk.views:
          walk.views[outside] = walk.views[inside]
        if _is_var(inside) and inside in walk.outputs:
          walk.outputs[outside] = walk.outputs[inside]
      continue
    for i in viewed:
      walk.use(ins[i].leaf, 'other', _other_use(name))


def _walk_scan(eqn, ins, viewed, walk: _Walk, key) -> None:
  """A `lax.scan`: leaves scanned over are stacks of layers (as `nn.scan`)."""
  p = eqn.params
  num_consts, num_carry = p['num_consts'], p['num_carry']
  body_views = {}
  for i in viewed:
    view = ins[i]
    if view.stacked is not None or view.shared:
      walk.use(view.leaf, 'other', 'it is used inside nested lax.scans')
    elif i < num_consts:
      body_views[i] = dataclasses.replace(view, shared=True)
    elif i < num_consts + num_carry:
      walk.use(view.leaf, 'other', 'it is a lax.scan carry')
    elif not view.only({'convert_element_type', 'copy'}):
      walk.use(view.leaf, 'other', 'it is reshaped before a lax.scan')
    else:
      body_views[i] = View(view.leaf, (), stacked=int(p['length']))
  _walk(p['jaxpr'].jaxpr, body_views, walk, key)


def _other_use(name: str) -> str:
  if name in ('scan', 'while', 'cond'):
    return f'it is used inside a {name} (the capture does not enter loops)'
  if name.startswith('custom_'):
    return f'it is used inside a {name} (a function with its own derivative)'
  if name in MATMULS:
    return f'it is both operands of a {name}'
  return f'it is used by {name}, which is not a Dense or Conv matmul'


def _probe_bias(walk: _Walk, op, tap, bias_view: View, out_chain, leaf_shape):
  """Whether the bias, through its views, adds one entry per output row."""
  aval = walk.out_avals[op]
  if (bias_view.stacked is None) != (op not in walk.stacked):
    return False  # one of them is a stack of layers, the other not
  if bias_view.stacked is not None:
    if bias_view.stacked != walk.stacked[op]:
      return False
    leaf_shape = leaf_shape[1:]  # one layer of the stack
  if int(np.prod(leaf_shape)) != tap.rows:
    return False
  with jax.ensure_compile_time_eval():
    rows_of_y = _row_index(tap, aval)
    for eqn in out_chain:
      rows_of_y = _apply(eqn, rows_of_y)
    bias = jnp.arange(tap.rows, dtype=jnp.int32).reshape(leaf_shape)
    for eqn in bias_view.eqns:
      bias = _apply(eqn, bias)
    try:
      spread = jnp.broadcast_to(bias, rows_of_y.shape)
    except ValueError:
      return False
    return bool(jnp.array_equal(spread, rows_of_y))


def _apply(eqn, value):
  if eqn.primitive.name in ('convert_element_type', 'copy'):
    return value  # a cast moves nothing; the probe stays exact in int32
  return eqn.primitive.bind(value, **eqn.params)


def _row_index(tap, aval) -> jax.Array:
  """An int32 array of the op's output shape holding each entry's row."""
  if isinstance(tap, ConvTap):
    shape = [aval.shape[a] for a in tap.y_perm]
    index = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.int32), shape)
    return jnp.transpose(index, tuple(int(i) for i in np.argsort(tap.y_perm)))
  dense = tap.dense
  moved = list(aval.shape)
  moved.insert(0, moved.pop(dense.y_batch_axis))
  ordered = [moved[a] for a in dense.y_perm]
  n_out = dense.num_output_axes
  index = jnp.arange(tap.rows, dtype=jnp.int32).reshape(ordered[-n_out:])
  index = jnp.broadcast_to(index, ordered)
  index = jnp.transpose(index, tuple(int(i) for i in np.argsort(dense.y_perm)))
  return jnp.moveaxis(index, 0, dense.y_batch_axis)


def match(jaxpr, num_leaves: int) -> Match:
  """Walks `jaxpr`, whose first `num_leaves` inputs are parameter leaves."""
  walk = _Walk()
  _walk(jaxpr, {i: View(i) for i in range(num_leaves)}, walk, ())
  found = Match()
  leaf_avals = [v.aval for v in jaxpr.invars[:num_leaves]]
  for leaf, uses in walk.uses.items():
    kinds = [kind for kind, _ in uses]
    others = [detail for kind, detail in uses if kind == 'other']
    ops = [detail for kind, detail in uses if kind == 'op']
    if others:
      found.refused[leaf] = stats_lib.UncapturedLayer('jax', others[0])
    elif len(ops) > 1:
      found.refused[leaf] = stats_lib.UncapturedLayer(
        'jax',
        f'it is used by {len(ops)} matmuls (shared weights are not split'
        ' between layers)',
      )
    elif ops and len(uses) > 1:
      found.refused[leaf] = stats_lib.UncapturedLayer(
        'jax', 'it is a matmul operand and is also added to outputs'
      )
    elif ops:
      op = ops[0]
      if op in walk.tap_refusals:
        found.refused[leaf] = stats_lib.UncapturedLayer(
          'jax', walk.tap_refusals[op]
        )
      else:
        found.kernels[leaf] = op
        found.taps[op] = walk.taps[op]
    elif kinds.count('bias') > 1:
      found.refused[leaf] = stats_lib.UncapturedLayer(
        'jax', 'it is added to the outputs of several layers'
      )
  kernel_of_op = {op: leaf for leaf, op in found.kernels.items()}
  for op, adds in walk.bias_adds.items():
    leaf, view, chain = adds[0]
    if leaf in found.refused or op not in kernel_of_op:
      continue
    tap = found.taps[op]
    if len(adds) == 1 and _probe_bias(
      walk, op, tap, view, chain, leaf_avals[leaf].shape
    ):
      found.biases[kernel_of_op[op]] = leaf
    else:
      found.refused[leaf] = stats_lib.UncapturedLayer(
        'jax', "it is added to a layer's outputs, but not one entry per row"
      )
  for leaf in range(num_leaves):
    captured = leaf in found.kernels or leaf in found.biases.values()
    if not captured and leaf not in found.refused and leaf in walk.uses:
      found.refused[leaf] = stats_lib.UncapturedLayer(
        'jax', 'it is added to the outputs of a layer that is not captured'
      )
  found.nested = {op[:i] for op in found.taps for i in range(1, len(op))}
  found.stacked = {op: n for op, n in walk.stacked.items() if op in found.taps}
  return found
