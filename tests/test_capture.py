"""DenseGeneral, Einsum, attention and nn.scan stacks, checked explicitly.

Each layer's row-stacked form is written out by hand here (reshapes and
transposes in NumPy), and FROG's update on it is checked against the NumPy
float64 reference rule.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import frog_optax as fo
from frog_optax._src import capture
from frog_optax._src import family
from frog_optax._src import paths

import reference_loops as ref

BATCH = 4  # sample_size 2: strided rows 0 and 2


class OneLayer(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.layer(x)


def _flat(a, n_last):
  return a.reshape((-1, int(np.prod(a.shape[a.ndim - n_last :]))))


# name: (layer, input shape, sampled x -> (n, D_in), y -> (n, rows),
#        kernel -> (D_in, rows), and back (u_kernel, kernel shape) -> kernel)
CASES = {
  'dense_general_heads': (
    nn.DenseGeneral((2, 3), axis=-1),
    (BATCH, 5, 6),
    lambda x: _flat(x, 1),
    lambda y: _flat(y, 2),
    lambda k: k.reshape(6, 6),
    lambda u, shape: u.reshape(shape),
  ),
  'dense_general_merge': (
    nn.DenseGeneral(4, axis=(-2, -1)),
    (BATCH, 3, 2, 5),
    lambda x: _flat(x, 2),
    lambda y: _flat(y, 1),
    lambda k: k.reshape(10, 4),
    lambda u, shape: u.reshape(shape),
  ),
  'dense_general_middle_axis': (
    nn.DenseGeneral(3, axis=1),
    (BATCH, 5, 6),
    lambda x: _flat(np.moveaxis(x, 1, -1), 1),
    lambda y: _flat(y, 1),
    lambda k: k,
    lambda u, shape: u,
  ),
  'einsum_permuted': (
    nn.Einsum((2, 6, 3), 'btd,hdk->bhtk'),
    (BATCH, 5, 6),
    lambda x: _flat(x, 1),
    lambda y: _flat(y.transpose(0, 2, 1, 3), 2),
    lambda k: k.transpose(1, 0, 2).reshape(6, 6),
    lambda u, shape: u.reshape(6, 2, 3).transpose(1, 0, 2),
  ),
  'einsum_ellipsis': (
    nn.Einsum((6, 3), '...d,dk->...k'),
    (BATCH, 5, 6),
    lambda x: _flat(x, 1),
    lambda y: _flat(y, 1),
    lambda k: k,
    lambda u, shape: u,
  ),
}


def _one_layer_problem(name):
  layer, shape, *_ = CASES[name]
  model = OneLayer(layer)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(
    lambda a: jax.random.normal(jax.random.key(2), a.shape, jnp.float64),
    params,
  )
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: jnp.sum(jnp.sin(apply_fn({'params': p}, x)))
  loss, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  y = np.asarray(model.apply({'params': params}, x))
  return params, x, y, (loss, grads, loss_fn), stats['layer']


@pytest.mark.parametrize('name', sorted(CASES))
def test_captured_rows_match_explicit_reshapes(name):
  *_, x_rows, y_rows, kernel_rows, _ = CASES[name]
  params, x, y, (loss, grads, loss_fn), st = _one_layer_problem(name)
  want_loss, want_grads = jax.value_and_grad(loss_fn)(params)
  np.testing.assert_array_equal(loss, want_loss)
  jax.tree.map(np.testing.assert_array_equal, grads, want_grads)

  np.testing.assert_allclose(st.inputs, x_rows(np.asarray(x)[::2]))
  # dLoss/dy = cos(y), times the batch size.
  np.testing.assert_allclose(
    st.output_grads, y_rows(BATCH * np.cos(y[::2])), rtol=1e-12
  )
  row_stacked = family.to_row_stacked(params['layer'], st.layout)
  np.testing.assert_array_equal(
    row_stacked['kernel'], kernel_rows(np.asarray(params['layer']['kernel']))
  )
  # The row-stacked Dense map reproduces the layer on the sample.
  np.testing.assert_allclose(
    st.geometry.forward(st.inputs, row_stacked),
    y_rows(y[::2]),
    rtol=1e-12,
  )


@pytest.mark.parametrize('name', sorted(CASES))
def test_frog_update_matches_reference_rule(name):
  *_, kernel_rows, kernel_back = CASES[name]
  params, _, _, (_, grads, _), st = _one_layer_problem(name)
  tx = fo.scale_by_frog(damping=1e-3, cg_iters=3)
  updates, _ = tx.update(grads, tx.init(params), frog_stats={'layer': st})

  g = grads['layer']
  kernel = kernel_rows(np.asarray(g['kernel']))
  rows = np.concatenate([kernel.T, np.asarray(g['bias']).reshape(-1, 1)], 1)
  x = np.asarray(st.inputs)
  design = np.concatenate([x, np.ones((len(x), 1))], 1)  # every row sees it
  features = np.broadcast_to(design, (len(rows),) + design.shape)
  rule = ref.frog_rule(damping=1e-3, k=3)
  u = rule(name, rows, (np.asarray(st.output_grads), features, len(x)), 0)
  want_kernel = kernel_back(u[:, :-1].T, g['kernel'].shape)
  np.testing.assert_allclose(updates['layer']['kernel'], want_kernel, rtol=1e-9)
  np.testing.assert_allclose(
    updates['layer']['bias'], u[:, -1].reshape(g['bias'].shape), rtol=1e-9
  )


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(11, 8)(tokens)
    mask = nn.make_causal_mask(tokens)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(
      h, mask=mask
    )
    return nn.Dense(11, name='head')(h)


def test_attention_projections_are_captured_and_embed_falls_back():
  model = TinyLM()
  tokens = jax.random.randint(jax.random.key(0), (BATCH, 6), 0, 11)
  params = model.init(jax.random.key(1), tokens)['params']
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  apply_fn = fo.linen.capture(model.apply)

  def loss_fn(p):
    logits = apply_fn({'params': p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens
    ).mean()

  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=None)(params)
  by_path = paths.entries_by_path(stats, fo.LayerStats)
  assert sorted(by_path) == [
    'attn/key',
    'attn/out',
    'attn/query',
    'attn/value',
    'head',
  ]
  labels = fo.frog_param_labels(params)
  assert labels['Embed_0']['embedding'] == 'fallback'
  assert labels['attn']['query']['kernel'] == 'frog'
  # With the whole batch sampled, Xᵀ(dy) / B is each projection's gradient:
  # the row-stacked inputs and output gradients are those of the layer.
  for name, st in by_path.items():
    leaves = grads['attn'][name.split('/')[1]] if '/' in name else grads[name]
    row_stacked = family.to_row_stacked(leaves, st.layout)
    transpose = st.geometry.transpose(st.inputs, row_stacked)
    got = jax.tree.map(lambda a: a / BATCH, transpose(st.output_grads))
    got = family.from_row_stacked(got, st.layout, leaves)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14),
      got,
      leaves,
    )
  table = fo.describe(params, stats)
  query = next(r for r in table.splitlines() if r.startswith('attn/query'))
  assert ' 9 ' in query  # D = 8 inputs + bias, not 8·2 + 1


class Cell(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = nn.DenseGeneral((2, 2), name='heads')(x)
    return nn.tanh(nn.DenseGeneral(4, axis=(-2, -1), name='merge')(x)), None


class Stack(nn.Module):
  capture_axes: bool = True

  @nn.compact
  def __call__(self, x):
    axes = {'params': 0}
    if self.capture_axes:
      axes.update({fo.linen.INPUTS: 0, fo.linen.PERTURBATIONS: 0})
    scan = nn.scan(
      Cell, variable_axes=axes, split_rngs={'params': True}, length=3
    )
    return scan(name='layers')(x, None)[0]


def _stack_problem(capture_axes=True):
  model = Stack(capture_axes)
  x = jax.random.normal(jax.random.key(0), (BATCH, 5, 4), jnp.float64)
  params = model.init(jax.random.key(1), x)['params']
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  apply_fn = fo.linen.capture(model.apply)
  loss_fn = lambda p: jnp.mean(apply_fn({'params': p}, x) ** 2)
  return params, loss_fn


def _one_layer_of_stack(stats, grads, name, layer):
  """Layer `layer` of the stacked module `name`: its stats and gradients."""
  full = stats['layers'][name]
  one = fo.LayerStats(
    inputs=full.inputs[layer],
    output_grads=full.output_grads[layer],
    geometry=full.geometry,
    layout=dataclasses.replace(full.layout, stacked_axes=0),
  )
  return one, jax.tree.map(lambda a: a[layer], grads['layers'][name])


def test_scan_stacked_layers_are_preconditioned_one_by_one():
  params, loss_fn = _stack_problem()
  _, grads, stats = jax.jit(fo.linen.value_and_grad(loss_fn, sample_size=2))(
    params
  )
  st = stats['layers']['heads']
  assert st.layout.stacked_axes == 1
  assert st.inputs.shape == (3, 2 * 5, 4)
  assert st.output_grads.shape == (3, 2 * 5, 4)
  assert st.num_samples == 10

  tx = fo.scale_by_frog(damping=1e-3, cg_iters=3)
  updates, _ = tx.update(grads, tx.init(params), frog_stats=stats)
  # The same update, one layer of the stack at a time, unstacked by hand.
  for layer in range(3):
    for name in ('heads', 'merge'):
      one, g = _one_layer_of_stack(stats, grads, name, layer)
      u, _ = tx.update({name: g}, tx.init({name: g}), frog_stats={name: one})
      jax.tree.map(
        lambda a, b, i=layer: np.testing.assert_allclose(a[i], b, rtol=1e-10),
        updates['layers'][name],
        u[name],
      )


def test_scan_without_capture_axes_names_the_fix():
  params, loss_fn = _stack_problem(capture_axes=False)
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  assert stats['layers']['heads'].layer_type == 'DenseGeneral'
  assert 'variable_axes' in stats['layers']['heads'].reason
  tx = fo.scale_by_frog()
  with pytest.raises(ValueError, match="'layers/heads'.*variable_axes"):
    tx.update(grads, tx.init(params), frog_stats=stats)
  tx = fo.frog(0.1, exclude='layers')  # the advice works
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  chex.assert_trees_all_close(
    updates, jax.tree.map(lambda g: -0.025 * g, grads)
  )


STATEFUL = {
  'foof': lambda **kw: fo.scale_by_foof(damping=0.1, **kw),
  'kfrog': lambda **kw: fo.scale_by_kfrog(damping=0.1, y_momentum=0.9, **kw),
  'adafisher': lambda **kw: fo.scale_by_adafisher(**kw),
}


def _three_steps(tx, params, grads, stats):
  state, out = tx.init(params), []
  for _ in range(3):
    u, state = tx.update(grads, state, frog_stats=stats)
    out.append(u)
  return out


@pytest.mark.parametrize('member', sorted(STATEFUL))
def test_stateful_members_without_layouts_name_the_fix(member):
  params, loss_fn = _stack_problem()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  tx = STATEFUL[member]()
  with pytest.raises(ValueError, match="'layers/heads'.*layouts="):
    tx.update(grads, tx.init(params), frog_stats=stats)


@pytest.mark.parametrize('member', sorted(STATEFUL))
@pytest.mark.parametrize(
  'name', ['dense_general_heads', 'dense_general_merge', 'einsum_permuted']
)
def test_stateful_members_follow_layouts_known_at_init(member, name):
  # The same member on the hand-made row-stacked Dense problem (whose
  # updates test_family checks against the float64 reference loops) gives
  # the same three steps.
  params, x, _, (_, grads, loss_fn), st = _one_layer_problem(name)
  got = _three_steps(
    STATEFUL[member](layouts=fo.linen.layouts(loss_fn, params)),
    params,
    grads,
    {'layer': st},
  )
  to_rows = lambda tree: {'layer': family.to_row_stacked(tree, st.layout)}
  plain = fo.LayerStats(st.inputs, st.output_grads, st.geometry)
  want = _three_steps(
    STATEFUL[member](),
    to_rows(params['layer']),
    to_rows(grads['layer']),
    {'layer': plain},
  )
  for u, v in zip(got, want):
    v = family.from_row_stacked(v['layer'], st.layout, params['layer'])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
      u['layer'],
      v,
    )


@pytest.mark.parametrize('member', sorted(STATEFUL))
def test_stateful_members_precondition_scan_stacks_layer_by_layer(member):
  params, loss_fn = _stack_problem()
  _, grads, stats = fo.linen.value_and_grad(loss_fn, sample_size=2)(params)
  got = _three_steps(STATEFUL[member](layouts=stats), params, grads, stats)
  for layer in range(3):
    for name in ('heads', 'merge'):
      one, g = _one_layer_of_stack(stats, grads, name, layer)
      want = _three_steps(
        STATEFUL[member](layouts={name: one}),
        {name: g},
        {name: g},
        {name: one},
      )
      for u, v in zip(got, want):
        jax.tree.map(
          lambda a, b, i=layer: np.testing.assert_allclose(
            a[i], b, rtol=1e-10, atol=1e-14
          ),
          u['layers'][name],
          v[name],
        )


@pytest.mark.parametrize(
  'layer, shape, why',
  [
    (nn.Einsum((2, 4, 3), 'bhd,hdk->bhk'), (BATCH, 2, 4), 'batched kernel'),
    (nn.Einsum((BATCH, 4, 3), 'bd,bdk->k'), (BATCH, 4), 'no batch axis'),
    (nn.Einsum((4, 3), 'btd,dk->bk'), (BATCH, 5, 4), 'one operand only'),
    (nn.DenseGeneral(3, axis=0), (BATCH, 4), 'no batch axis'),
    (nn.DenseGeneral(3, batch_dims=(0,)), (BATCH, 4), 'batch_dims'),
  ],
)
def test_unsupported_contractions_are_refused_by_name(layer, shape, why):
  model = OneLayer(layer)
  x = jnp.ones(shape)
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = fo.linen.capture(model.apply)
  _, grads, stats = fo.linen.value_and_grad(
    lambda p: apply_fn({'params': p}, x).sum(), sample_size=2
  )(params)
  assert why in stats['layer'].reason
  tx = fo.frog(0.1)
  with pytest.raises(ValueError, match=f"'layer'.*{why}"):
    tx.update(grads, tx.init(params), params, frog_stats=stats)


@pytest.mark.parametrize('front_end', ['linen', 'nnx', 'jax'])
def test_every_front_end_runs_the_one_two_pass_driver(front_end, monkeypatch):
  calls = []
  drive = capture.two_passes
  monkeypatch.setattr(
    capture, 'two_passes', lambda *a: calls.append(1) or drive(*a)
  )
  x = jnp.arange(12.0).reshape(4, 3)
  if front_end == 'linen':
    model = nn.Dense(2)
    apply_fn = fo.linen.capture(model.apply)
    loss_fn = lambda p, x: apply_fn({'params': p}, x).sum()
    grad_fn = fo.linen.value_and_grad(loss_fn, sample_size=2)
    args = (model.init(jax.random.key(0), x)['params'], x)
  elif front_end == 'nnx':
    grad_fn = fo.nnx.value_and_grad(lambda m, x: m(x).sum(), sample_size=2)
    args = (nnx.Linear(3, 2, rngs=nnx.Rngs(0)), x)
  else:
    loss_fn = lambda p, x: (x @ p['w'] + p['b']).sum()
    grad_fn = fo.jax.value_and_grad(loss_fn, sample_size=2)
    args = ({'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}, x)
  _, _, stats = grad_fn(*args)
  assert len(calls) == 1
  # The driver's real pass is the one whose stats come back: the strided
  # examples 0 and 2, and the output gradient of a summed loss times B.
  (layer_stats,) = paths.entries_by_path(stats, fo.LayerStats).values()
  np.testing.assert_array_equal(layer_stats.inputs, x[::2])
  np.testing.assert_array_equal(layer_stats.output_grads, 4 * np.ones((2, 2)))
