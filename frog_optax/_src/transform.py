"""FROG: `precondition_layer`, `scale_by_frog` and the `frog` alias.

FROG is one member of the family built on `family.scale_by_row_preconditioner`
(routing, stats checks and state are shared); this module holds only its
per-layer rule, its ablation switches, and the optimizer alias.
"""

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from frog_optax._src import cg as cg_lib
from frog_optax._src import dense_rows
from frog_optax._src import family
from frog_optax._src import fisher
from frog_optax._src import routing
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

# Re-exported: FROG's routing is the family's.
module_leaves = routing.module_leaves
preconditioned_modules = routing.preconditioned_modules
frog_param_labels = routing.frog_param_labels
ScaleByFrogState = family.RowPreconditionerState

SOLVERS = ('cg', 'cholesky')


def precondition_layer(
  layer_stats: stats_lib.LayerStats,
  direction: dict[str, jax.Array],
  *,
  damping: Any,
  cg_iters: int | jax.Array,
  eps: Any,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
) -> dict[str, jax.Array]:
  """FROG's per-row update `u_j = z_j / sqrt(⟨z_j, m_j⟩ + ε)` for one layer.

  Args:
    layer_stats: the layer's captured statistics.
    direction: `{'kernel', 'bias'?}`, the momentum `m` to precondition.
    damping: τ (a scalar).
    cg_iters: number of CG iterations k (`solver='cg'` only).
    eps: ε in the step normalisation.
    solver: `'cg'` (k batched CG iterations, FROG) or `'cholesky'` (the
      exact per-row solve; ablation, `rows·D²` memory).
    trace_normalization: divide each row Fisher by `tr(F_j)/D` (FROG).
    step_normalization: divide by `sqrt(⟨z_j, m_j⟩ + ε)` (FROG); `False`
      returns `z` itself.
    row_blocks: `'exact'` row Fishers (FROG) or `'kronecker'` blocks
      `S_jj·A` (ablation: K-FAC's approximation of the same blocks).

  Returns:
    `u` with the structure and dtypes of `direction`.
  """
  validation.check_choice('solver', solver, SOLVERS)
  validation.check_choice('row_blocks', row_blocks, fisher.ROW_BLOCKS)
  dtype = family.solve_dtype(direction)
  m = {k: v.astype(dtype) for k, v in direction.items()}
  curvature = dict(
    trace_normalization=trace_normalization, row_blocks=row_blocks
  )
  if solver == 'cholesky':
    fishers = fisher.row_fisher_matrices(layer_stats, m, dtype, **curvature)
    factors = dense_rows.damped_cholesky(fishers, damping)
    rhs = dense_rows.to_matrix(m)[:, :, None]
    z = dense_rows.from_matrix(
      dense_rows.cholesky_solve(factors, rhs)[:, :, 0], m
    )
  else:
    matvec = fisher.row_fisher_operator(
      layer_stats, m, damping, dtype, **curvature
    )
    z = cg_lib.batched_cg(matvec, m, cg_iters, fisher.row_inner)
  if step_normalization:
    # ⟨z, m⟩ > 0 in exact arithmetic (CG iterates of a PSD system); clip the
    # rounding so that the square root stays real.
    zm = jnp.maximum(fisher.row_inner(z, m), 0.0)
    scale = jax.lax.rsqrt(zm + eps)
    z = {k: v * scale for k, v in z.items()}
  return {k: z[k].astype(direction[k].dtype) for k in direction}


class RankDeficientFisherWarning(UserWarning):
  """A preconditioned layer's row Fisher has fewer samples than entries."""


SAFE_RANK_DEFICIENT_DAMPING = 1e-3


def _warn_if_rank_deficient(name, layer_stats, leaves, damping):
  """Warns (once per trace: shapes are static) about rank-deficient rows.

  Silent when damping is a number >= 1e-3, which kept every such layer
  stable in the README's sweeps.
  """
  if (
    validation.is_concrete_number(damping)
    and float(damping) >= SAFE_RANK_DEFICIENT_DAMPING
  ):
    return
  samples = layer_stats.num_samples
  row_size = fisher.row_dimension(leaves)
  if samples < row_size:
    warnings.warn(
      f'FROG preconditions {name!r} with a Fisher estimated from {samples}'
      f' samples for rows of D = {row_size} entries: it has rank < D, and'
      ' directions the sample did not see are scaled by 1/damping. Exclude'
      ' the layer (recommended for classifier heads), raise sample_size, or'
      f' use damping >= {SAFE_RANK_DEFICIENT_DAMPING} (got {damping!r}).',
      RankDeficientFisherWarning,
      stacklevel=3,
    )


def scale_by_frog(
  damping: optax.ScalarOrSchedule = 1e-3,
  cg_iters: int = 4,
  eps: float = 1e-10,
  exclude: str | Sequence[str] = (),
  *,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
) -> optax.GradientTransformationExtraArgs:
  r"""Row-wise Fisher preconditioning with batched conjugate gradient.

  For every output row `j` of each preconditioned layer (a Dense unit or a
  Conv channel, its bias as a homogeneous coordinate) this solves, with `k`
  CG iterations from zero,

  .. math::
    (F_j / (\operatorname{tr} F_j / D) + \tau I)\, z_j = g_j, \qquad
    u_j = z_j / \sqrt{\langle z_j, g_j\rangle + \epsilon},

  where `F_j` is the empirical Fisher of the row estimated from the captured
  sample. `u` is invariant to the scale of the loss. This is the
  preconditioning step alone; see :func:`frog` for the full optimizer.

  Leaves of modules that are not Dense/Conv-like (see
  :func:`preconditioned_modules`) or that are excluded pass through unchanged;
  a preconditioned module without stats is an error.

  The keyword-only switches are ablations for benchmarks; their defaults are
  FROG.

  Args:
    damping: τ, relative to the mean eigenvalue of the normalised Fisher
      (which is 1). A float or an optax schedule of the step count. Default
      1e-3 (the reference's 1e-6 suits full-rank conv rows only).
    cg_iters: number of CG iterations k (3-5 recommended); used by
      `solver='cg'` only.
    eps: ε guarding the step normalisation; must be > 0.
    exclude: module paths ('/'-joined) not to precondition.
    solver: `'cg'` or `'cholesky'` (exact per-row solve, `rows·D²` memory:
      small layers only).
    trace_normalization: `False` drops the `tr(F_j)/D` normalisation, so τ
      becomes absolute and `F_j = Σ y² x xᵀ / N` (N = leading axis of the
      captured inputs).
    step_normalization: `False` returns `z` instead of `z/√⟨z, g⟩`.
    row_blocks: `'kronecker'` replaces each row's `y²` weights by their
      mean, giving K-FAC's block `S_jj·A` instead of the exact row Fisher.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update` requires the
    keyword argument `frog_stats` (see :func:`frog_optax.linen.value_and_grad`).

  Example:
    >>> import jax.numpy as jnp, frog_optax as fo
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
    >>> stats = {'Dense_0': fo.LayerStats(
    ...     inputs=jnp.arange(12.).reshape(4, 3),
    ...     output_grads=jnp.ones((4, 2)), geometry=fo.DenseGeometry())}
    >>> tx = fo.scale_by_frog(cg_iters=4)
    >>> u, _ = tx.update(params, tx.init(params), frog_stats=stats)
    >>> u['Dense_0']['kernel'].shape
    (3, 2)
  """
  validation.check_range('damping', damping, low=0.0, allow_schedule=True)
  validation.check_cg_iters(cg_iters)
  validation.check_range('eps', eps, low=0.0, low_inclusive=False)
  validation.check_choice('solver', solver, SOLVERS)
  validation.check_bool('trace_normalization', trace_normalization)
  validation.check_bool('step_normalization', step_normalization)
  validation.check_choice('row_blocks', row_blocks, fisher.ROW_BLOCKS)
  exclude = validation.normalize_paths('exclude', exclude)

  def update_layer(name, layer_stats, direction, state, count):
    _warn_if_rank_deficient(name, layer_stats, direction, damping)
    u = precondition_layer(
      layer_stats,
      direction,
      damping=family.schedule_value(damping, count),
      cg_iters=cg_iters,
      eps=eps,
      solver=solver,
      trace_normalization=trace_normalization,
      step_normalization=step_normalization,
      row_blocks=row_blocks,
    )
    return u, state

  return family.scale_by_row_preconditioner(
    family.LayerPreconditioner(init=lambda leaves: None, update=update_layer),
    exclude,
  )


def frog(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = None,
  damping: optax.ScalarOrSchedule = 1e-3,
  cg_iters: int = 4,
  exclude: str | Sequence[str] = (),
  fallback: optax.GradientTransformation | None = None,
  other_lr_ratio: float | None = None,
  eps: float = 1e-10,
  mu_dtype: Any = None,
  solver: str = 'cg',
  trace_normalization: bool = True,
  step_normalization: bool = True,
  row_blocks: str = 'exact',
) -> optax.GradientTransformationExtraArgs:
  r"""FROG: Fisher row-wise preconditioning (Breskanu), as an optax optimizer.

  For each preconditioned row `j` (a Dense unit or Conv channel):

  .. math::
    m_t = \beta m_{t-1} + g_t, \quad
    z_j = \mathrm{CG}_k(F_j/(\operatorname{tr}F_j/D) + \tau I,\ m_j), \quad
    \theta_j \leftarrow (1-\eta\rho)\theta_j - \eta\, z_j /
      \sqrt{\langle z_j, m_j\rangle + \epsilon}.

  Every row moves a fixed Fisher distance η per step, whatever the gradient
  scale, so the learning-rate schedule controls convergence. Parameters FROG
  does not precondition (BatchNorm, embeddings, excluded layers) go to
  `fallback`.

  Args:
    learning_rate: η, a float or an optax schedule. A good start is 2-4× the
      momentum-SGD learning rate for the same model.
    momentum: heavy-ball momentum β in [0, 1) (like `optax.trace`). The
      reference defaults to 0; 0.9 is what its CIFAR-10 runs used.
    nesterov: use `g + β m` instead of `m`.
    weight_decay: ρ >= 0, decoupled for preconditioned rows.
    weight_decay_mask: optional mask (tree or callable) selecting the
      parameters that decay, as in `optax.add_decayed_weights`.
    damping: τ >= 0 relative to the mean Fisher eigenvalue; float or schedule.
      Default 1e-3 (the reference uses 1e-6, which diverged in our sweeps
      whenever a rank-deficient layer such as a classifier head was
      preconditioned; see the README).
    cg_iters: CG iterations k >= 1 (3-5 recommended; more fits noise). A
      Python int is unrolled; under `optax.inject_hyperparams` pass
      `static_args=('cg_iters',)` to keep it so (a traced count runs a
      `fori_loop`, which XLA:CPU executes several times slower).
    exclude: module paths ('/'-joined, e.g. `('head', 'block3/Dense_0')`)
      sent to the fallback even when captured. Excluding the final classifier
      is recommended.
    fallback: optax transformation for parameters FROG does not precondition.
      Default: momentum SGD at `learning_rate * other_lr_ratio` with coupled
      weight decay, as the reference does.
    other_lr_ratio: learning-rate ratio of the default fallback (default
      0.25); not allowed together with `fallback`.
    eps: ε > 0 in the step normalisation.
    mu_dtype: dtype of the momentum buffers (default: the parameter dtype);
      updates are returned in the parameter dtypes either way.
    solver: `'cg'` (FROG) or `'cholesky'` (ablation: exact per-row solve).
    trace_normalization: ablation switch, see :func:`scale_by_frog`.
    step_normalization: ablation switch, see :func:`scale_by_frog`.
    row_blocks: `'exact'` (FROG) or `'kronecker'` (ablation), see
      :func:`scale_by_frog`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires the keyword
    argument `frog_stats`.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import frog_optax as fo
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros(16, jnp.int32)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> apply_fn = fo.linen.capture(model.apply)
    >>> def loss_fn(params, x, y):
    ...   logits = apply_fn({'params': params}, x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, y).mean()
    >>> tx = fo.frog(0.01, exclude=('layers_2',))
    >>> opt_state = tx.init(params)
    >>> vg = fo.linen.value_and_grad(loss_fn, sample_size=8)
    >>> loss, grads, stats = vg(params, x, y)
    >>> updates, opt_state = tx.update(grads, opt_state, params,
    ...                                frog_stats=stats)
    >>> params = optax.apply_updates(params, updates)

    An ablation for benchmarks, e.g. the exact per-row solve:

    >>> exact = fo.frog(0.01, exclude=('layers_2',), solver='cholesky')

  References:
    Breskanu, FROG: Fisher ROw-wise preconditioninG,
    https://github.com/Fullfix/frog-optimizer
  """
  # `exclude` is applied by the routing: excluded layers never reach
  # scale_by_frog.
  return family.heavy_ball_optimizer(
    scale_by_frog(
      damping=damping,
      cg_iters=cg_iters,
      eps=eps,
      solver=solver,
      trace_normalization=trace_normalization,
      step_normalization=step_normalization,
      row_blocks=row_blocks,
    ),
    learning_rate,
    momentum=momentum,
    nesterov=nesterov,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    exclude=exclude,
    fallback=fallback,
    other_lr_ratio=other_lr_ratio,
    default_other_lr_ratio=0.25,
    mu_dtype=mu_dtype,
  )
