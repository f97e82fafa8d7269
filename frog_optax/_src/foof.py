"""FOOF (Benzing 2022, "gradient descent on neurons") on FROG's capture.

Each layer's update is `(Σ + λI)⁻¹ m` applied to every row, where `Σ` is the
second moment `XᵀX/N` of the layer inputs (N = the leading axis of the
captured inputs: examples, or examples × positions for a Dense layer whose
leading axes were folded) and `m` the momentum. The output gradients `Y` are
not used: FOOF is FROG with `y²` constant across samples.

Two solvers share the captured inputs:
- explicit (small row size D): `Σ` is an exponential moving average of the
  per-step `XᵀX/N`, normalised like the paper's (the first average equals
  the first estimate), and its damped Cholesky factor is refreshed every
  `update_interval` steps, as the paper's Algorithm 1 does (its statistics
  are updated every step, the paper's choice `S = T` for dense layers).
  Memory: two `D × D` matrices per feature group.
- CG (large D): `cg_iters` matrix-free CG iterations on the current sample's
  `XᵀX/N + λI`, one forward and one transposed layer op each. No matrix is
  stored, so there is no moving average and no refresh interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from frog_optax._src import aliases
from frog_optax._src import cholesky
from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation
from frog_optax._src.geometry import RowParams

SOLVERS = ('auto', 'cholesky', 'cg')


class FoofLayerState(NamedTuple):
  """FOOF's state for one explicitly solved layer."""

  second_moment: jax.Array  # (groups, D, D): EMA of XᵀX/N, not debiased.
  factor: jax.Array  # (groups, D, D): Cholesky factor of the damped average.


def input_second_moment(
  layer_stats: stats_lib.LayerStats, params_like: RowParams, dtype: Any
) -> jax.Array:
  """`XᵀX/N` of every feature group, `(groups, D, D)`, from the patches."""
  patches = layer_stats.geometry.patches(
    layer_stats.inputs.astype(dtype),
    params_like['kernel'].shape,
    'bias' in params_like,
  )
  gram = jnp.einsum('gtd,gte->gde', patches, patches)
  return gram / layer_stats.inputs.shape[0]


def _explicit_rule(solver, max_explicit_dim):
  def uses_explicit(leaves):
    if solver != 'auto':
      return solver == 'cholesky'
    if isinstance(max_explicit_dim, jax.core.Tracer):
      raise ValueError(
        'max_explicit_dim decides the solver at trace time; with'
        " optax.inject_hyperparams pass static_args=('max_explicit_dim',)."
      )
    return fisher.row_dimension(leaves) <= int(max_explicit_dim)

  return uses_explicit


def scale_by_foof(
  damping: optax.ScalarOrSchedule = 1.0,
  ema_decay: float = 0.95,
  update_interval: int = 1,
  solver: str = 'auto',
  max_explicit_dim: int = 2048,
  cg_iters: int = 4,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF's preconditioning step: `(XᵀX/N + λI)⁻¹` applied to every row.

  Args:
    damping: λ >= 0, absolute (on the scale of `XᵀX/N`); float or schedule
      (the explicit solver reads it at each refresh).
    ema_decay: m in [0, 1), the moving average of `XᵀX/N` (explicit solver).
    update_interval: T >= 1, steps between refreshes of the Cholesky factor
      (explicit solver); the first step always refreshes.
    solver: `'cholesky'` (explicit), `'cg'` (matrix-free), or `'auto'`:
      explicit for layers whose row size D <= `max_explicit_dim`, except
      grouped convolutions (CG; their explicit state would need the group
      count, which `init` cannot see).
    max_explicit_dim: the `'auto'` threshold, an int >= 1.
    cg_iters: CG iterations k >= 1 of the matrix-free solver.
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
    >>> tx = fo.scale_by_foof(damping=1.0)
    >>> u, state = tx.update(params, tx.init(params), frog_stats=stats)
    >>> state.layers['Dense_0'].factor.shape  # one group, D = 3 + 1 (bias)
    (1, 4, 4)
  """
  validation.check_range('damping', damping, low=0.0, allow_schedule=True)
  validation.check_range(
    'ema_decay', ema_decay, low=0.0, high=1.0, high_inclusive=False
  )
  validation.check_positive_int('update_interval', update_interval)
  validation.check_choice('solver', solver, SOLVERS)
  validation.check_positive_int('max_explicit_dim', max_explicit_dim)
  validation.check_cg_iters(cg_iters)
  if solver == 'cg' and validation.is_concrete_number(update_interval):
    if int(update_interval) != 1:
      raise ValueError(
        "update_interval only applies to the explicit solver; solver='cg'"
        ' solves with the current sample at every step.'
      )
  uses_explicit = _explicit_rule(solver, max_explicit_dim)

  def init_layer(leaves):
    if not uses_explicit(leaves):
      return None
    dtype = family.solve_dtype(leaves)
    d = fisher.row_dimension(leaves)
    eye = jnp.eye(d, dtype=dtype)[None]
    return FoofLayerState(second_moment=jnp.zeros_like(eye), factor=eye)

  def update_layer(name, layer_stats, direction, state, count):
    m, dtype = direction, direction['kernel'].dtype  # the solve dtype
    tau = validation.schedule_value(damping, count)
    groups = getattr(layer_stats.geometry, 'feature_group_count', 1)
    if state is not None and groups > 1 and solver == 'cholesky':
      raise ValueError(
        f"FOOF's explicit solver does not support the grouped convolution"
        f" {name!r} ({groups} groups); use solver='auto' or 'cg', or"
        ' exclude it.'
      )
    if state is None or groups > 1:
      z = fisher.input_gram_cg(layer_stats, m, tau, cg_iters)
    else:
      estimate = input_second_moment(layer_stats, m, dtype)
      second_moment = optax.tree.update_moment(
        estimate, state.second_moment, ema_decay, 1
      )
      debiased = optax.tree.bias_correction(second_moment, ema_decay, count + 1)

      def refresh():
        return cholesky.damped_cholesky(debiased, tau)

      factor = lax.cond(
        count % update_interval == 0, refresh, lambda: state.factor
      )
      state = FoofLayerState(second_moment, factor)
      z = cholesky.grouped_cholesky_solve(factor, m)
    return z, state

  return family.scale_by_row_preconditioner(
    family.LayerPreconditioner(init=init_layer, update=update_layer),
    layouts,
  )


def foof(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  damping: optax.ScalarOrSchedule = 1.0,
  ema_decay: float = 0.95,
  update_interval: int = 1,
  solver: str = 'auto',
  max_explicit_dim: int = 2048,
  cg_iters: int = 4,
  exclude: str | Sequence[str] = (),
  layouts: Any = None,
  fallback: optax.GradientTransformation | None = None,
  other_lr_ratio: float | None = None,
  mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""FOOF: gradient descent on neurons (Benzing 2022), as an optax optimizer.

  .. math::
    m_t = \beta m_{t-1} + g_t, \quad
    \theta \leftarrow (1-\eta\rho)\theta - \eta\,
      m_t (\Sigma + \lambda I)^{-1},

  with `Σ` the (averaged) second moment `XᵀX/N` of each layer's inputs,
  shared by all rows of the layer. See :func:`scale_by_foof` for the
  solvers, the moving average and the refresh interval.

  Args:
    learning_rate: η, a float or an optax schedule.
    momentum: heavy-ball momentum β in [0, 1).
    nesterov: use `g + β m` instead of `m`.
    weight_decay: ρ >= 0, decoupled for preconditioned layers.
    weight_decay_mask: optional mask, as in `optax.add_decayed_weights`.
    damping: λ >= 0, absolute; the paper tunes it on a 10^{2i} grid.
    ema_decay: m, the moving average of `XᵀX/N` (0.95 in the paper).
    update_interval: T, steps between refreshes of the inverse.
    solver: `'auto'`, `'cholesky'` or `'cg'`.
    max_explicit_dim: the `'auto'` threshold on the row size D.
    cg_iters: CG iterations of the matrix-free solver.
    exclude: module paths sent to the fallback.
    layouts: see :func:`scale_by_foof`.
    fallback: optax transformation for the other parameters. Default:
      momentum SGD at `learning_rate * other_lr_ratio`, coupled weight decay.
    other_lr_ratio: learning-rate ratio of the default fallback (default
      1.0); not allowed together with `fallback`.
    mu_dtype: dtype of the momentum buffers (default: the parameter dtype).

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires the keyword
    argument `frog_stats`.

  Example:
    Built like :func:`frog` and updated with the same capture and
    `frog_stats` (see its example):

    >>> import frog_optax as fo
    >>> tx = fo.foof(0.1, damping=1.0, update_interval=10)

  References:
    Benzing, Gradient descent on neurons and its link to approximate
    second-order optimization, ICML 2022, https://arxiv.org/abs/2201.12250
  """
  return aliases.heavy_ball_optimizer(
    scale_by_foof(
      damping=damping,
      ema_decay=ema_decay,
      update_interval=update_interval,
      solver=solver,
      max_explicit_dim=max_explicit_dim,
      cg_iters=cg_iters,
      layouts=layouts,
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    exclude=exclude,
    fallback=fallback,
    other_lr_ratio=other_lr_ratio,
    default_other_lr_ratio=1.0,
    mu_dtype=mu_dtype,
    layouts=layouts,
  )
