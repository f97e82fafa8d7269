"""Every family member by hand: NumPy float64 loops with explicit matrices.

Nothing here calls frog_optax's solvers. Each member is a per-row rule on
explicit design matrices (`features[j]`: the `(n·t, D)` inputs row j sees,
from `layer_cases.make_layer`) plus one of two optimizer loops: heavy-ball
momentum (FROG, K-FROG, FOOF) or a bias-corrected gradient average
(AdaFisher). A three-step problem has a Dense layer with bias, a Conv layer
and a `norm` parameter that goes to the fallback.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import explicit
from layer_cases import LAYERS
from layer_cases import make_layer

STEPS = 3


@dataclasses.dataclass
class Problem:
  params: dict
  grads: list  # per step, a params-shaped tree
  stats: list  # per step, the frog_stats tree
  layers: list  # per step, {name: (output_grads, features, n)}


def problem(conv_spec=LAYERS[2], conv_bias=False):
  """Three steps of random gradients and captured stats, float64."""
  rng = np.random.default_rng(0)
  _, dense_params, _ = make_layer(LAYERS[0], True)
  _, conv_params, _ = make_layer(conv_spec, conv_bias)
  params = {
    'dense': dense_params,
    'conv': conv_params,
    'norm': {'scale': jnp.asarray(rng.normal(size=3))},
  }
  out = Problem(params, [], [], [])
  for step in range(STEPS):
    out.grads.append(
      jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
    )
    ds, _, dense_features = make_layer(LAYERS[0], True, seed=10 + step)
    cs, _, conv_features = make_layer(conv_spec, conv_bias, seed=20 + step)
    out.stats.append({'dense': ds, 'conv': cs, 'norm': {'scale': None}})
    out.layers.append(
      {
        name: (np.asarray(st.output_grads), feats, st.inputs.shape[0])
        for name, st, feats in (
          ('dense', ds, dense_features),
          ('conv', cs, conv_features),
        )
      }
    )
  return out


def _f64(tree):
  return jax.tree.map(lambda a: np.array(a, np.float64), tree)


def _row_rule_step(rule, name, params, direction, layer, count):
  rows = explicit.rows_to_vectors(direction['kernel'], direction.get('bias'))
  u = rule(name, rows, layer, count)
  return explicit.vectors_to_rows(u, params['kernel'].shape, 'bias' in params)


def heavy_ball_loop(
  prob, rule, *, lr, momentum, nesterov=False, wd=0.0, ratio=1.0
):
  """momentum → rule → decoupled wd → lr; `norm`: momentum SGD, coupled wd."""
  params, mom = (
    _f64(prob.params),
    jax.tree.map(np.zeros_like, _f64(prob.params)),
  )
  for count, (grads, layers) in enumerate(zip(prob.grads, prob.layers)):
    grads = _f64(grads)
    for name in ('dense', 'conv'):
      p, g, m = params[name], grads[name], mom[name]
      for leaf in p:
        m[leaf] = momentum * m[leaf] + g[leaf]
      direction = {
        leaf: g[leaf] + momentum * m[leaf] if nesterov else m[leaf]
        for leaf in p
      }
      u = _row_rule_step(rule, name, p, direction, layers[name], count)
      for leaf in p:
        p[leaf] = p[leaf] - lr * (u[leaf] + wd * p[leaf])
    p, g, m = params['norm'], grads['norm'], mom['norm']
    for leaf in p:
      m[leaf] = momentum * m[leaf] + g[leaf] + wd * p[leaf]
      step = (
        g[leaf] + wd * p[leaf] + momentum * m[leaf] if nesterov else m[leaf]
      )
      p[leaf] = p[leaf] - lr * ratio * step
  return params


def adam_like_loop(prob, rule, *, lr, beta, wd, decoupled):
  """Bias-corrected gradient average → rule (identity for `norm`) → lr."""
  params, avg = (
    _f64(prob.params),
    jax.tree.map(np.zeros_like, _f64(prob.params)),
  )
  for count, (grads, layers) in enumerate(zip(prob.grads, prob.layers)):
    grads = _f64(grads)
    for name in ('dense', 'conv', 'norm'):
      p, g, m = params[name], grads[name], avg[name]
      for leaf in p:
        coupled = 0.0 if decoupled else wd * p[leaf]
        m[leaf] = beta * m[leaf] + (1 - beta) * (g[leaf] + coupled)
      m_hat = {leaf: m[leaf] / (1 - beta ** (count + 1)) for leaf in p}
      if name == 'norm':
        u = m_hat
      else:
        u = _row_rule_step(rule, name, p, m_hat, layers[name], count)
      for leaf in p:
        p[leaf] = p[leaf] - lr * (u[leaf] + (wd * p[leaf] if decoupled else 0))
  return params


# --------------------------------------------------------------------------
# Per-row rules: (name, rows (r, D), (output_grads, features, n), count) → u.


def frog_rule(
  *,
  damping,
  k=None,
  eps=1e-10,
  rank_damping=1.0,
  trace_normalization=True,
  step_normalization=True,
  row_blocks='exact',
  warm_start=False,
):
  """FROG and its ablations; `k=None` solves exactly.

  τ is `damping + rank_damping·D/N` (N = the samples behind a row's Fisher),
  ε is relative to `max |m_j|²`, and a row whose Fisher has zero trace is
  solved with the identity. `warm_start` starts each row's CG from the
  layer's previous solution.
  """
  previous = {}

  def rule(name, rows, layer, count):
    del count
    dy, features, n = layer
    r, num_samples, d = features.shape
    tau = damping + rank_damping * d / num_samples
    weights = np.asarray(dy, np.float64).reshape(-1, r) ** 2
    solutions = []
    if row_blocks == 'kronecker':
      weights = np.broadcast_to(weights.mean(axis=0), weights.shape)
    out = []
    for j in range(r):
      a = features[j]
      f = (a * weights[:, j : j + 1]).T @ a / n
      if trace_normalization:
        trace = np.trace(f)
        f = f / (trace / d) if trace > 0 else np.eye(d)
      f = f + tau * np.eye(d)
      if k is None:
        z = np.linalg.solve(f, rows[j])
      else:
        x0 = previous[name][j] if warm_start and name in previous else None
        z = explicit.textbook_cg(f, rows[j], k, x0)
      solutions.append(z)
      if step_normalization:
        peak = np.abs(rows[j]).max()
        z = z / np.sqrt(z @ rows[j] + eps * peak**2)
      out.append(z)
    previous[name] = solutions
    return np.stack(out)

  return rule


def _gram(features, j, n):
  return features[j].T @ features[j] / n


def kfrog_rule(*, damping, k, eps, y_momentum):
  averages = {}

  def rule(name, rows, layer, count):
    dy, features, n = layer
    r, _, d = features.shape
    y_mean = (np.asarray(dy, np.float64).reshape(-1, r) ** 2).sum(0) / n
    averages[name] = (
      y_momentum * averages.get(name, 0.0) + (1 - y_momentum) * y_mean
    )
    y_eff = averages[name] / (1 - y_momentum ** (count + 1))
    rhs = rows / np.sqrt(y_eff + eps)[:, None]
    out = []
    for j in range(r):
      a = _gram(features, j, n)
      z = explicit.textbook_cg(a + damping * np.eye(d), rhs[j], k)
      out.append(z * np.sqrt(np.diag(a)))
    return np.stack(out)

  return rule


def foof_rule(*, damping, k=None, ema_decay=0.95, update_interval=1):
  """`k=None`: explicit (moving average, refreshed inverse); else CG."""
  averages, inverses = {}, {}

  def rule(name, rows, layer, count):
    _, features, n = layer
    r, _, d = features.shape
    out = []
    for j in range(r):
      gram = _gram(features, j, n)
      if k is not None:
        out.append(explicit.textbook_cg(gram + damping * np.eye(d), rows[j], k))
        continue
      key = (name, j)
      averages[key] = (
        ema_decay * averages.get(key, 0.0) + (1 - ema_decay) * gram
      )
      if count % update_interval == 0:
        debiased = averages[key] / (1 - ema_decay ** (count + 1))
        inverses[key] = np.linalg.inv(debiased + damping * np.eye(d))
      out.append(inverses[key] @ rows[j])
    return np.stack(out)

  return rule


def adafisher_rule(*, damping, keep, take, update_interval=1):
  """Factors start at ones; `F ← keep·F + take·minmax(new)` on refreshes."""
  factors = {}

  def min_max(x):
    return (x - x.min()) / (x.max() - x.min() + 1e-12)

  def rule(name, rows, layer, count):
    dy, features, _ = layer
    r, _, d = features.shape
    h_new = np.stack([np.diag(features[j].T @ features[j]) for j in range(r)])
    s_new = (np.asarray(dy, np.float64).reshape(-1, r) ** 2).sum(0)
    h, s = factors.get(name, (np.ones((r, d)), np.ones(r)))
    if count % update_interval == 0:
      h = keep * h + take * min_max(h_new)
      s = keep * s + take * min_max(s_new)
    factors[name] = (h, s)
    return rows / (h * s[:, None] + damping)

  return rule
