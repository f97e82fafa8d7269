"""Independent dense reference computations for the tests (NumPy, float64).

Nothing here calls frog_optax: the row Fishers are built from explicit im2col
patches and solved with textbook loops.
"""

import itertools

import numpy as np


def conv_patches(
  x, kernel_spatial, strides, padding, input_dilation, kernel_dilation
):
  """im2col: `(n, *out_spatial, *kernel_spatial, c_in)` input patches.

  x: `(n, *spatial, c_in)`; padding: explicit `(low, high)` pairs (>= 0).
  """
  x = np.asarray(x, np.float64)
  nsp = x.ndim - 2
  # Input (lhs) dilation inserts zeros between input elements.
  dil_shape = (
    [x.shape[0]]
    + [(x.shape[1 + i] - 1) * input_dilation[i] + 1 for i in range(nsp)]
    + [x.shape[-1]]
  )
  xd = np.zeros(dil_shape)
  xd[(slice(None),) + tuple(slice(None, None, d) for d in input_dilation)] = x
  xp = np.pad(xd, [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
  out_spatial = [
    (xp.shape[1 + i] - ((kernel_spatial[i] - 1) * kernel_dilation[i] + 1))
    // strides[i]
    + 1
    for i in range(nsp)
  ]
  patches = np.zeros(
    [x.shape[0]] + out_spatial + list(kernel_spatial) + [x.shape[-1]]
  )
  for o in itertools.product(*[range(s) for s in out_spatial]):
    for k in itertools.product(*[range(s) for s in kernel_spatial]):
      idx = tuple(
        o[i] * strides[i] + k[i] * kernel_dilation[i] for i in range(nsp)
      )
      patches[(slice(None),) + o + k] = xp[(slice(None),) + idx]
  return patches


def row_feature_matrices(patches, num_rows, groups, has_bias):
  """Per-row design matrices `a_j`: `(rows, n·t, D)` from conv patches.

  patches: `(n, *out_spatial, *kernel_spatial, c_in)`. Row j of a grouped
  conv sees only the input channels of its group.
  """
  nsp = (patches.ndim - 2) // 2
  c_in = patches.shape[-1]
  c_group = c_in // groups
  rows_per_group = num_rows // groups
  # (n·t, *kernel_spatial, c_in)
  flat = patches.reshape((-1,) + patches.shape[1 + nsp :])
  mats = []
  for j in range(num_rows):
    g = j // rows_per_group
    a = flat[..., g * c_group : (g + 1) * c_group].reshape(flat.shape[0], -1)
    if has_bias:
      a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    mats.append(a)
  return np.stack(mats)


def normalized_row_fishers(features, output_grads, damping):
  """F̂_j = F_j / (tr F_j / D) + τ I with F_j = Σ y² a aᵀ / s, stacked."""
  rows, _, d = features.shape
  dy = np.asarray(output_grads, np.float64).reshape(-1, rows)
  s = output_grads.shape[0]
  out = []
  for j in range(rows):
    a = features[j]
    f = (a * dy[:, j : j + 1] ** 2).T @ a / s
    out.append(f / (np.trace(f) / d) + damping * np.eye(d))
  return np.stack(out)


def textbook_cg(a, b, iters, x0=None):
  """Plain CG from `x0` (default zero) on one SPD system, `iters` steps."""
  x = np.zeros_like(b) if x0 is None else np.array(x0, np.float64)
  r = b - a @ x
  p = r.copy()
  rr = r @ r
  for _ in range(iters):
    ap = a @ p
    alpha = rr / (p @ ap)
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = r @ r
    p = r + rr_new / rr * p
    rr = rr_new
  return x


def rows_to_vectors(kernel, bias=None):
  """`(rows, D)`: row j = kernel[..., j] flattened (+ bias[j])."""
  k = np.asarray(kernel, np.float64)
  v = k.reshape(-1, k.shape[-1]).T
  if bias is not None:
    v = np.concatenate([v, np.asarray(bias, np.float64)[:, None]], axis=1)
  return v


def vectors_to_rows(v, kernel_shape, has_bias):
  kernel = v[:, :-1] if has_bias else v
  out = {'kernel': kernel.T.reshape(kernel_shape)}
  if has_bias:
    out['bias'] = v[:, -1]
  return out
