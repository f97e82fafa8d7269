"""A float64 fuzz over random layer geometries against explicit im2col.

Each case draws a Dense, DenseGeneral (any axis order), Einsum or Conv
layer (1-D/2-D, strides, every padding mode, kernel and input dilation,
feature groups, bias on or off) and a random sample size, captures it with
`fo.linen.value_and_grad`, and compares FROG's update with one built here
from scratch: design matrices by im2col in NumPy (checked first against the
layer's own Flax forward pass), output gradients by `jax.grad` of the loss
with respect to the layer output, row Fishers as explicit matrices, and
`np.linalg.solve` (exact solver) or textbook CG (k = 3).
"""

import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import frog_optax as fo

import explicit

NUM_CASES = 24
DAMPING = 0.05
RANK_DAMPING = 0.3


def _conv_pads(mode, in_shape, kernel, strides, k_dil):
  """Explicit pads and the numpy pre-padding of a Flax padding mode."""
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel, k_dil)]
  if mode in ('CIRCULAR', 'REFLECT'):
    pre = [((k - 1) // 2, k // 2) for k in dilated]
    return (
      [(0, 0)] * len(kernel),
      pre,
      'wrap' if mode == 'CIRCULAR' else ('reflect'),
    )
  if mode == 'CAUSAL':
    return [(0, 0)], [(dilated[0] - 1, 0)], 'constant'
  if mode == 'SAME':
    pads = []
    for size, k, s in zip(in_shape, dilated, strides):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    return pads, None, None
  if mode == 'VALID':
    return [(0, 0)] * len(kernel), None, None
  return [tuple(p) for p in mode], None, None


CONV_PADDINGS = ('SAME', 'CAUSAL', 'VALID', 'CIRCULAR', 'explicit', 'REFLECT')


def _draw_conv(rng, i):
  """Case `i` of the kind: paddings, bias and groups cycle, the rest random."""
  mode = CONV_PADDINGS[i % len(CONV_PADDINGS)]
  nsp = 1 if mode == 'CAUSAL' else int(rng.integers(1, 3))
  kernel = tuple(int(k) for k in rng.integers(1, 4, nsp))
  strides = tuple(int(s) for s in rng.integers(1, 3, nsp))
  k_dil = tuple(int(d) for d in rng.integers(1, 3, nsp))
  groups = 1 + i % 2
  c_in = groups * int(rng.integers(1, 3))
  c_out = groups * int(rng.integers(1, 3))
  # At least the dilated kernel size, so that every padding has outputs.
  spatial = tuple(int(s) for s in rng.integers(5, 8, nsp))
  in_dil = (1,) * nsp
  if mode == 'explicit':
    mode = [tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(nsp)]
    in_dil = tuple(int(d) for d in rng.integers(1, 3, nsp))
  if mode == 'REFLECT':  # numpy reflect needs pads < size
    k_dil = (1,) * nsp
  return dict(
    kind='conv',
    spatial=spatial,
    c_in=c_in,
    module=nn.Conv(
      c_out,
      kernel,
      strides=strides,
      padding=mode,
      input_dilation=in_dil,
      kernel_dilation=k_dil,
      feature_group_count=groups,
      use_bias=i % 3 != 1,
      param_dtype=jnp.float64,
    ),
    geometry=(kernel, strides, mode, in_dil, k_dil, groups),
  )


# Unsorted axes are paired with the kernel in sorted order, as Flax does.
DENSE_GENERAL_AXES = ((2, 1), (1,), (-1, -2), (1, 2), (-1,), (2, 1))


def _draw_dense_general(rng, i):
  extra = tuple(int(s) for s in rng.integers(2, 4, 2))
  axis = DENSE_GENERAL_AXES[i % len(DENSE_GENERAL_AXES)]
  features = tuple(int(f) for f in rng.integers(1, 4, int(rng.integers(1, 3))))
  return dict(
    kind='dense_general',
    in_shape=extra,
    axis=axis,
    features=features,
    module=nn.DenseGeneral(
      features,
      axis=axis,
      use_bias=i % 2 == 0,
      param_dtype=jnp.float64,
    ),
  )


EINSUMS = (
  ('nd,dk->nk', (4,), (4, 3)),
  ('nd,kd->nk', (3,), (2, 3)),
  ('ntd,hdk->nthk', (2, 3), (2, 3, 2)),
  ('ntd,dk->ntk', (3, 2), (2, 3)),
)


def _draw_einsum(rng, i):
  equation, x_rest, kernel_shape = EINSUMS[i % len(EINSUMS)]
  use_bias = i % 3 != 2
  return dict(
    kind='einsum',
    in_shape=x_rest,
    equation=equation,
    module=nn.Einsum(
      kernel_shape, equation, use_bias=use_bias, param_dtype=jnp.float64
    ),
  )


def _draw(seed):
  rng = np.random.default_rng(seed)
  kind = ['dense', 'dense_general', 'einsum', 'conv'][seed % 4]
  i = seed // 4
  batch = int(rng.integers(3, 7))
  if kind == 'conv':
    case = _draw_conv(rng, i)
    x_shape = (batch,) + case['spatial'] + (case['c_in'],)
  elif kind == 'dense_general':
    case = _draw_dense_general(rng, i)
    x_shape = (batch,) + case['in_shape']
  elif kind == 'einsum':
    case = _draw_einsum(rng, i)
    x_shape = (batch,) + case['in_shape']
  else:
    d = int(rng.integers(1, 5))
    case = dict(
      kind='dense',
      module=nn.Dense(
        int(rng.integers(1, 4)),
        use_bias=i % 2 == 1,
        param_dtype=jnp.float64,
      ),
    )
    x_shape = (batch, d)
  case['x'] = rng.normal(size=x_shape)
  case['sample_size'] = int(rng.integers(1, batch + 1))
  return case


# ----------------------------------------------------------------------------
# The explicit reference: (rows, samples, D) design matrices and (samples,
# rows) output gradients of the sampled examples, and the kernel as (D, rows).


def _sampled(batch, s):
  step = batch // s
  return np.arange(0, step * s, step)


def _conv_design(case, params, x):
  kernel, strides, mode, in_dil, k_dil, groups = case['geometry']
  pads, pre, pre_mode = _conv_pads(mode, x.shape[1:-1], kernel, strides, k_dil)
  if pre is not None:
    x = np.pad(x, [(0, 0)] + pre + [(0, 0)], mode=pre_mode)
  patches = explicit.conv_patches(x, kernel, strides, pads, in_dil, k_dil)
  k = np.asarray(params['kernel'])
  has_bias = 'bias' in params
  feats = explicit.row_feature_matrices(patches, k.shape[-1], groups, has_bias)
  rows = explicit.rows_to_vectors(k, params.get('bias'))
  return feats, rows, patches.shape[1 : 1 + len(kernel)]


def _dense_like_design(case, params, x):
  """Sample axes first, contracted axes (kernel order) last, flattened."""
  kernel = np.asarray(params['kernel'])
  if case['kind'] == 'dense':
    x_labels, k_labels, y_labels = 'nd', 'dk', 'nk'
  elif case['kind'] == 'einsum':
    x_labels, rest = case['equation'].split(',')
    k_labels, y_labels = rest.split('->')
  else:
    ndim = x.ndim
    axis = sorted(a % ndim for a in case['axis'])  # Flax's kernel order
    letters = iter(string.ascii_lowercase)
    x_labels = ''.join(next(letters) for _ in range(ndim))
    contracted = ''.join(x_labels[a] for a in axis)
    outs = ''.join(next(letters) for _ in case['features'])
    k_labels = contracted + outs
    kept = ''.join(c for i, c in enumerate(x_labels) if i not in axis)
    y_labels = kept + outs
  contracted = [c for c in k_labels if c in x_labels]
  outputs = [c for c in y_labels if c in k_labels]
  samples = [c for c in x_labels if c in y_labels]
  xs = np.einsum(f'{x_labels}->{"".join(samples + contracted)}', x)
  d_in = int(np.prod([kernel.shape[k_labels.index(c)] for c in contracted]))
  design = xs.reshape(-1, d_in)
  k_rows = np.einsum(f'{k_labels}->{"".join(contracted + outputs)}', kernel)
  k_rows = k_rows.reshape(d_in, -1)
  if 'bias' in params:
    design = np.concatenate([design, np.ones((len(design), 1))], axis=1)
    k_rows = np.concatenate(
      [k_rows, np.asarray(params['bias']).reshape(1, -1)], axis=0
    )
  feats = np.stack([design] * k_rows.shape[1])
  y_order = ''.join(samples + outputs)
  return feats, k_rows.T, (x_labels, y_labels, y_order, kernel.shape, k_labels)


def _reference_update(feats, dy, m_rows, k):
  rows, num_samples, d = feats.shape
  tau = DAMPING + RANK_DAMPING * d / num_samples
  out = []
  for j in range(rows):
    a = feats[j]
    f = (a * dy[:, j : j + 1] ** 2).T @ a
    trace = np.trace(f)
    f = f / (trace / d) if trace > 0 else np.eye(d)
    f = f + tau * np.eye(d)
    # CG is exact after D steps; later steps would divide 0 by 0.
    z = (
      np.linalg.solve(f, m_rows[j])
      if k is None
      else (explicit.textbook_cg(f, m_rows[j], min(k, d)))
    )
    peak = np.abs(m_rows[j]).max()
    out.append(z / np.sqrt(z @ m_rows[j] + 1e-10 * peak**2))
  return np.stack(out)


@pytest.mark.parametrize('seed', range(NUM_CASES))
def test_frog_update_matches_explicit_im2col(seed):
  case = _draw(seed)
  module, x = case['module'], jnp.asarray(case['x'])
  params = module.init(jax.random.key(seed), x)['params']
  weights = jnp.asarray(
    np.random.default_rng(100 + seed).normal(
      size=jax.eval_shape(lambda: module.apply({'params': params}, x)).shape
    )
  )
  head = lambda y: jnp.sum(weights * jnp.tanh(y)) / x.shape[0]
  apply_fn = fo.linen.capture(module.apply)
  loss_fn = lambda p: head(apply_fn({'params': p}, x))
  _, grads, stats = fo.linen.value_and_grad(
    loss_fn, sample_size=case['sample_size']
  )(params)

  # The reference's own inputs: Flax's forward and dL/dy, no capture.
  y = module.apply({'params': params}, x)
  dy = np.asarray(jax.grad(head)(y)) * x.shape[0]
  rows_idx = _sampled(x.shape[0], min(case['sample_size'], x.shape[0]))
  x_s, y_s, dy_s = (
    np.asarray(x)[rows_idx],
    np.asarray(y)[rows_idx],
    dy[rows_idx],
  )
  if case['kind'] == 'conv':
    feats, k_rows, out_spatial = _conv_design(case, params, x_s)
    n_rows = k_rows.shape[0]
    dy_flat = dy_s.reshape(-1, n_rows)
    y_flat = y_s.reshape(-1, n_rows)
    g_rows = explicit.rows_to_vectors(grads['kernel'], grads.get('bias'))
  else:
    feats, k_rows, labels = _dense_like_design(case, params, x_s)
    _, y_labels, y_order, _, _ = labels
    perm = lambda a: np.einsum(f'{y_labels}->{y_order}', a)
    n_rows = k_rows.shape[0]
    dy_flat = perm(dy_s).reshape(-1, n_rows)
    y_flat = perm(y_s).reshape(-1, n_rows)
    g_rows = _dense_like_design(case, grads, x_s)[1]
  # The design matrices reproduce the layer: the reference is right.
  np.testing.assert_allclose(
    np.einsum('jnd,jd->nj', feats, k_rows), y_flat, rtol=1e-9, atol=1e-9
  )

  for solver, k in (('cholesky', None), ('cg', 3)):
    tx = fo.scale_by_frog(
      damping=DAMPING, rank_damping=RANK_DAMPING, cg_iters=3, solver=solver
    )
    u, _ = tx.update(grads, tx.init(params), frog_stats=stats)
    if case['kind'] == 'conv':
      got = explicit.rows_to_vectors(u['kernel'], u.get('bias'))
    else:
      got = _dense_like_design(case, u, x_s)[1]
    want = _reference_update(feats, dy_flat, g_rows, k)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
