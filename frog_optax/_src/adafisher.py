"""AdaFisher and AdaFisherW (Gomes et al., ICLR 2025) on FROG's capture.

AdaFisher keeps diagonal Kronecker factors per layer: `H`, the diagonal of
the input second moment `XᵀX` (one entry per kernel entry, plus the bias
coordinate), and `S`, the diagonal of `YᵀY` (one entry per row). Each is
min-max normalised to [0, 1] before it enters a moving average. The update
is Adam-like without the square root:

  u[..., j] = m̂[..., j] / (H[..., j] · S[j] + λ)

where m̂ is the bias-corrected moving average of the gradients. Scales
cancel in the min-max normalisation, so N (examples, locations) does not
matter. For grouped convolutions `H` holds each group's entries and one
normalisation spans them all.

Moving averages, two forms:
- the paper's (default): `F ← γF + (1 − γ)·minmax(new)`, γ = `decay`
  (0.92), refreshed every step;
- the released PyTorch code's (`released_code=True`):
  `F ← 0.08·F + 0.008·minmax(new)` (its `gammas=[0.92, 0.008]` enter as
  `1 − γ₀` and `γ₁`, so the weights do not sum to one), refreshed every 100
  steps by default.
Both start from all-ones factors, as the released code does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from frog_optax._src import aliases
from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import routing
from frog_optax._src import validation

PAPER_DECAY = 0.92
RELEASED_GAMMAS = (0.92, 0.008)
RELEASED_UPDATE_INTERVAL = 100
_MIN_MAX_EPS = 1e-12  # as the released code


class AdaFisherLayerState(NamedTuple):
  """AdaFisher's diagonal factors for one layer (min-max normalised EMAs)."""

  input_diag: dict[str, jax.Array]  # H, shaped like the parameters.
  output_diag: jax.Array  # S, (rows,).


def _min_max(tree):
  """(x − min)/(max − min + 1e-12), min and max over all leaves together."""
  leaves = jax.tree.leaves(tree)
  low = jnp.min(jnp.stack([leaf.min() for leaf in leaves]))
  high = jnp.max(jnp.stack([leaf.max() for leaf in leaves]))
  return jax.tree.map(lambda x: (x - low) / (high - low + _MIN_MAX_EPS), tree)


def _moving_average(released_code, decay):
  if not released_code:  # the paper's average: an optax moment
    return lambda old, new: optax.tree.update_moment(new, old, decay, 1)
  # The released code's weights do not sum to one.
  keep, take = 1.0 - RELEASED_GAMMAS[0], RELEASED_GAMMAS[1]
  return lambda old, new: jax.tree.map(
    lambda o, n: keep * o + take * n, old, new
  )


def _resolve_schedule(decay, update_interval, released_code):
  validation.check_bool('released_code', released_code)
  if released_code:
    if decay is not None:
      raise ValueError(
        'decay sets the paper-form moving average; released_code=True uses'
        f' the released weights {RELEASED_GAMMAS} instead. Pass one of them.'
      )
    default_interval = RELEASED_UPDATE_INTERVAL
  else:
    decay = PAPER_DECAY if decay is None else decay
    validation.check_range(
      'decay', decay, low=0.0, high=1.0, high_inclusive=False
    )
    default_interval = 1
  if update_interval is None:
    update_interval = default_interval
  validation.check_positive_int('update_interval', update_interval)
  return decay, update_interval


def scale_by_adafisher(
  damping: optax.ScalarOrSchedule = 1e-3,
  decay: float | None = None,
  update_interval: int | None = None,
  released_code: bool = False,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaFisher's preconditioning: divide by `H ⊗ S + λ` (no square root).

  Args:
    damping: λ >= 0 added to the normalised factors (the paper's 1e-3);
      float or schedule.
    decay: γ in [0, 1) of the paper-form moving average (default 0.92); not
      allowed with `released_code=True`.
    update_interval: steps between refreshes of the factors (default 1, or
      100 with `released_code=True`); the first step always refreshes.
    released_code: use the released code's moving-average weights (see the
      module docstring).
    layouts: which kernel axes are rows, for DenseGeneral, Einsum and
      scan-stacked modules (see :func:`frog_optax.linen.layouts`); `None`
      for plain Dense/Conv kernels.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires the
    keyword argument `frog_stats`.

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
    >>> stats = {'Dense_0': fo.LayerStats(
    ...     inputs=jnp.arange(12.).reshape(4, 3),
    ...     output_grads=jnp.ones((4, 2)), geometry=fo.DenseGeometry())}
    >>> tx = fo.scale_by_adafisher()
    >>> u, state = tx.update(params, tx.init(params), frog_stats=stats)
    >>> state.layers['Dense_0'].output_diag.shape
    (2,)
  """
  validation.check_range('damping', damping, low=0.0, allow_schedule=True)
  decay, update_interval = _resolve_schedule(
    decay, update_interval, released_code
  )
  average = _moving_average(released_code, decay)

  def init_layer(leaves):
    dtype = family.solve_dtype(leaves)
    return AdaFisherLayerState(
      input_diag={k: jnp.ones(v.shape, dtype) for k, v in leaves.items()},
      output_diag=jnp.ones(leaves['kernel'].shape[-1:], dtype),
    )

  def update_layer(name, layer_stats, direction, state, count):
    del name
    dtype = direction['kernel'].dtype  # the solve dtype
    fresh = AdaFisherLayerState(
      input_diag=_min_max(fisher.input_sq_sums(layer_stats, direction, dtype)),
      output_diag=_min_max(fisher.output_sq_sums(layer_stats, dtype)),
    )
    refresh = count % update_interval == 0
    state = jax.tree.map(
      lambda new, old: jnp.where(refresh, new, old),
      average(state, fresh),
      state,
    )
    tau = validation.schedule_value(damping, count)
    u = {
      k: direction[k] / (h * state.output_diag + tau)
      for k, h in state.input_diag.items()
    }
    return u, state

  return family.scale_by_row_preconditioner(
    family.LayerPreconditioner(init=init_layer, update=update_layer),
    layouts,
  )


def _adafisher(
  decoupled: bool,
  learning_rate,
  *,
  beta,
  weight_decay,
  weight_decay_mask,
  damping,
  decay,
  update_interval,
  released_code,
  exclude,
  layouts,
  fallback,
  mu_dtype,
):
  aliases.check_common(learning_rate, weight_decay)
  validation.check_range('beta', beta, low=0.0, high=1.0, high_inclusive=False)
  exclude = validation.normalize_paths('exclude', exclude)
  decay_weights = optax.add_decayed_weights(weight_decay, weight_decay_mask)

  def chain(precondition):
    # AdaFisher couples the weight decay (added to the gradient before the
    # moving average); AdaFisherW decouples it (AdamW-style).
    return optax.chain(
      *([] if decoupled else [decay_weights]),
      optax.ema(beta, debias=True, accumulator_dtype=mu_dtype),
      *precondition,
      *([decay_weights] if decoupled else []),
      optax.scale_by_learning_rate(learning_rate),
    )

  preconditioned = chain(
    [
      scale_by_adafisher(
        damping=damping,
        decay=decay,
        update_interval=update_interval,
        released_code=released_code,
        layouts=layouts,
      )
    ]
  )
  # Without factors the released code divides by 1: the same chain, with no
  # preconditioning.
  fallback = chain([]) if fallback is None else fallback
  return routing.route(preconditioned, fallback, exclude, layouts)


def adafisher(
  learning_rate: optax.ScalarOrSchedule,
  *,
  beta: float = 0.9,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  damping: optax.ScalarOrSchedule = 1e-3,
  decay: float | None = None,
  update_interval: int | None = None,
  released_code: bool = False,
  exclude: str | Sequence[str] = (),
  layouts: Any = None,
  fallback: optax.GradientTransformation | None = None,
  mu_dtype: Any = None,
  decoupled_weight_decay: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaFisher: Adam with diagonal Kronecker Fisher factors, coupled decay.

  .. math::
    m_t = \beta m_{t-1} + (1-\beta)(g_t + \rho\theta), \quad
    \theta \leftarrow \theta - \eta\,
      \frac{m_t / (1-\beta^t)}{H \otimes S + \lambda}.

  With `decoupled_weight_decay` it is AdaFisherW (:func:`adafisherw`).

  Args:
    learning_rate: η, a float or an optax schedule (the paper's grid picks
      around 1e-3).
    beta: decay of the gradient moving average m (bias-corrected), in [0, 1).
    weight_decay: ρ >= 0, coupled: added to the gradient.
    weight_decay_mask: optional mask, as in `optax.add_decayed_weights`.
    damping: λ >= 0 added to the normalised factors.
    decay: γ of the paper-form factor average (default 0.92).
    update_interval: steps between factor refreshes (default 1; 100 with
      `released_code=True`).
    released_code: average the factors as the authors' released PyTorch
      code does, `F ← 0.08·F + 0.008·minmax(new)` (its weights do not sum
      to one), refreshed every 100 steps, instead of the paper's
      `F ← γF + (1 − γ)·minmax(new)` every step.
    exclude: module paths sent to the fallback.
    layouts: see :func:`scale_by_adafisher`.
    fallback: optax transformation for parameters without factors (BatchNorm,
      LayerNorm, embeddings, excluded layers). Default: this same update with
      the factors replaced by 1, as the released code treats parameters it
      has no factors for. The paper's BatchNorm/LayerNorm factors are not
      implemented.
    mu_dtype: dtype of the moving average of the gradients.
    decoupled_weight_decay: subtract `η·ρ·θ` after the preconditioning
      (AdamW-style) instead of adding `ρθ` to the gradient.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires the keyword
    argument `frog_stats`.

  Example:
    Built like :func:`frog` and updated with the same capture and
    `frog_stats` (see its example):

    >>> import frog_optax as fo
    >>> tx = fo.adafisher(1e-3, weight_decay=5e-4)

  References:
    Gomes et al., AdaFisher: Adaptive Second Order Optimization via Fisher
    Information, ICLR 2025, https://arxiv.org/abs/2405.16397
  """
  validation.check_bool('decoupled_weight_decay', decoupled_weight_decay)
  return _adafisher(
    decoupled_weight_decay,
    learning_rate,
    beta=beta,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    damping=damping,
    decay=decay,
    update_interval=update_interval,
    released_code=released_code,
    exclude=exclude,
    layouts=layouts,
    fallback=fallback,
    mu_dtype=mu_dtype,
  )


adafisherw = functools.partial(adafisher, decoupled_weight_decay=True)
adafisherw.__doc__ = r"""AdaFisherW: AdaFisher, weight decay decoupled (AdamW).

  .. math::
    m_t = \beta m_{t-1} + (1-\beta) g_t, \quad
    \theta \leftarrow \theta - \eta \left(
      \frac{m_t / (1-\beta^t)}{H \otimes S + \lambda} + \rho\theta\right).

  Args:
    learning_rate: η, a float or an optax schedule (the paper's grid picks
      around 1e-3).
    beta: decay of the gradient moving average m (bias-corrected), in [0, 1).
    weight_decay: ρ >= 0, decoupled: subtracted as η·ρ·θ.
    weight_decay_mask: optional mask, as in `optax.add_decayed_weights`.
    damping: λ >= 0 added to the normalised factors.
    decay: γ of the paper-form factor average (default 0.92).
    update_interval: steps between factor refreshes (default 1; 100 with
      `released_code=True`).
    released_code: average the factors as the authors' released PyTorch
      code does, `F ← 0.08·F + 0.008·minmax(new)` (its weights do not sum
      to one), refreshed every 100 steps, instead of the paper's
      `F ← γF + (1 − γ)·minmax(new)` every step.
    exclude: module paths sent to the fallback.
    layouts: see :func:`scale_by_adafisher`.
    fallback: optax transformation for parameters without factors (BatchNorm,
      LayerNorm, embeddings, excluded layers). Default: this same update with
      the factors replaced by 1, as the released code treats parameters it
      has no factors for. The paper's BatchNorm/LayerNorm factors are not
      implemented.
    mu_dtype: dtype of the moving average of the gradients.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires the keyword
    argument `frog_stats`.

  Example:
    Built like :func:`frog` and updated with the same capture and
    `frog_stats` (see its example):

    >>> import frog_optax as fo
    >>> tx = fo.adafisherw(1e-3, weight_decay=0.05)

  References:
    Gomes et al., AdaFisher: Adaptive Second Order Optimization via Fisher
    Information, ICLR 2025, https://arxiv.org/abs/2405.16397
"""
