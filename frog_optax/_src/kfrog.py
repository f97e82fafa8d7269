"""K-FROG, the reference's legacy Kronecker FROG, on FROG's capture.

Per layer:

  m̃_j = m_j / sqrt(ȳ_j + ε),          ȳ_j = Σ_{n,t} y²_{n,t,j} / N
  z   = CG_k(XᵀX/N + δI, m̃)           (all rows at once)
  u   = z ⊙ sqrt(diag(XᵀX)/N)          (column-wise: per input entry)

`ȳ` may be an exponential moving average over steps (`y_momentum`,
bias-corrected like Adam's). N is the leading axis of the captured inputs.
The input side is FOOF's solve (`fisher.input_gram_cg`); the output side is a
per-row scalar, so K-FROG is a diagonal-times-Kronecker preconditioner
rather than FROG's per-row Fisher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from frog_optax._src import aliases
from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import validation


def scale_by_kfrog(
  damping: optax.ScalarOrSchedule = 1e-6,
  cg_iters: int = 4,
  eps: float = 1e-6,
  y_momentum: float = 0.0,
  layouts: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FROG's preconditioning step (see the module docstring).

  Args:
    damping: δ >= 0 added to `XᵀX/N` (absolute); float or schedule. The
      reference uses its `eps` (1e-6) here.
    cg_iters: CG iterations k >= 1.
    eps: ε >= 0 under the square root of the output scaling.
    y_momentum: β_y in [0, 1), decay of the moving average of `ȳ`; 0 uses
      the current sample only.
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
    >>> tx = fo.scale_by_kfrog(y_momentum=0.9)
    >>> u, state = tx.update(params, tx.init(params), frog_stats=stats)
    >>> state.layers['Dense_0'].shape  # the moving average of ȳ, per row
    (2,)
  """
  validation.check_range('damping', damping, low=0.0, allow_schedule=True)
  validation.check_cg_iters(cg_iters)
  validation.check_range('eps', eps, low=0.0)
  validation.check_range(
    'y_momentum', y_momentum, low=0.0, high=1.0, high_inclusive=False
  )

  def init_layer(leaves):
    rows = leaves['kernel'].shape[-1]
    return jnp.zeros((rows,), family.solve_dtype(leaves))

  def update_layer(name, layer_stats, direction, y_average, count):
    del name
    m, dtype = direction, direction['kernel'].dtype  # the solve dtype
    n = layer_stats.inputs.shape[0]
    y_mean = fisher.output_sq_sums(layer_stats, dtype) / n
    y_average = optax.tree.update_moment(y_mean, y_average, y_momentum, 1)
    debiased = optax.tree.bias_correction(y_average, y_momentum, count + 1)
    row_scale = jax.lax.rsqrt(debiased + eps)
    rhs = {k: v * row_scale for k, v in m.items()}
    z = fisher.input_gram_cg(
      layer_stats, rhs, validation.schedule_value(damping, count), cg_iters
    )
    x_mean = fisher.input_sq_sums(layer_stats, m, dtype)
    return {k: z[k] * jnp.sqrt(x_mean[k] / n) for k in z}, y_average

  return family.scale_by_row_preconditioner(
    family.LayerPreconditioner(init=init_layer, update=update_layer),
    layouts,
  )


def kfrog(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  damping: optax.ScalarOrSchedule = 1e-6,
  cg_iters: int = 4,
  eps: float = 1e-6,
  y_momentum: float = 0.0,
  exclude: str | Sequence[str] = (),
  layouts: Any = None,
  fallback: optax.GradientTransformation | None = None,
  other_lr_ratio: float | None = None,
  mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FROG, the legacy Kronecker FROG of the reference, as an optimizer.

  momentum → :func:`scale_by_kfrog` → decoupled weight decay → learning
  rate; other parameters go to `fallback`. Unlike FROG the step is not
  normalised, so its size follows the gradient scale.

  Args:
    learning_rate: η, a float or an optax schedule.
    momentum: heavy-ball momentum β in [0, 1) (the reference defaults to 0).
    nesterov: use `g + β m` instead of `m`.
    weight_decay: ρ >= 0, decoupled for preconditioned layers (the
      reference has none).
    weight_decay_mask: optional mask, as in `optax.add_decayed_weights`.
    damping: δ added to `XᵀX/N`.
    cg_iters: CG iterations k.
    eps: ε in `sqrt(ȳ + ε)`.
    y_momentum: moving-average decay of `ȳ` (bias-corrected).
    exclude: module paths sent to the fallback.
    layouts: see :func:`scale_by_kfrog`.
    fallback: optax transformation for the other parameters. Default:
      momentum SGD at `learning_rate * other_lr_ratio`, coupled weight decay
      (the reference updates them with the same learning rate).
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
    >>> tx = fo.kfrog(0.01, y_momentum=0.9)

  References:
    Breskanu, FROG (legacy `kfrog.py`),
    https://github.com/Fullfix/frog-optimizer
  """
  return aliases.heavy_ball_optimizer(
    scale_by_kfrog(
      damping=damping,
      cg_iters=cg_iters,
      eps=eps,
      y_momentum=y_momentum,
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
