"""`scale_by_frog`, the `frog` alias, and routing of parameters to a fallback.

Which parameters FROG preconditions is decided from the parameter tree alone
(so `init` knows it): every module dict that holds exactly a `kernel` of rank
>= 2 and optionally a 1-D `bias` (Flax `Dense` and `Conv`), unless its path is
excluded. Everything else goes to the fallback transformation.
"""

import warnings
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frog_optax._src import cg as cg_lib
from frog_optax._src import fisher
from frog_optax._src import stats as stats_lib
from frog_optax._src import validation

PRECONDITIONED = 'frog'
FALLBACK = 'fallback'
_MISSING = object()


def module_leaves(tree: Any) -> dict[str, dict[str, Any]]:
  """Groups the leaves of a tree by parent path: `{module: {name: leaf}}`."""
  modules: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parent = stats_lib.path_name(path[:-1])
    modules.setdefault(parent, {})[stats_lib.key_name(path[-1])] = leaf
  return modules


def _is_row_layer(leaves: dict[str, Any]) -> bool:
  """A Dense/Conv-like module: a kernel of rank >= 2 and maybe a 1-D bias."""
  if set(leaves) not in ({'kernel'}, {'kernel', 'bias'}):
    return False
  kernel = leaves['kernel']
  if getattr(kernel, 'ndim', 0) < 2:
    return False
  bias = leaves.get('bias')
  return bias is None or (getattr(bias, 'shape', None) == (kernel.shape[-1],))


def _is_excluded(module: str, exclude: Sequence[str]) -> bool:
  return any(module == e or module.startswith(e + '/') for e in exclude)


def _row_layers(modules: dict[str, dict[str, Any]]) -> list[str]:
  return sorted(m for m, leaves in modules.items() if _is_row_layer(leaves))


def preconditioned_modules(
  params: Any, exclude: Sequence[str] = ()
) -> list[str]:
  """The '/'-joined paths of the modules FROG preconditions in `params`.

  Args:
    params: a parameter tree.
    exclude: module paths (or path prefixes) routed to the fallback instead.

  Returns:
    Sorted module paths.

  Raises:
    ValueError: when an `exclude` entry matches no preconditionable module.
  """
  exclude = validation.normalize_paths('exclude', exclude)
  candidates = _row_layers(module_leaves(params))
  unmatched = [
    e for e in exclude if not any(_is_excluded(m, (e,)) for m in candidates)
  ]
  if unmatched:
    raise ValueError(
      f'exclude entries {unmatched} match no Dense/Conv module; modules'
      f' that can be excluded: {candidates[:20]}'
      + (' ...' if len(candidates) > 20 else '')
    )
  return [m for m in candidates if not _is_excluded(m, exclude)]


def frog_param_labels(params: Any, exclude: Sequence[str] = ()) -> Any:
  """Labels every leaf `'frog'` (preconditioned) or `'fallback'`.

  Suitable for `optax.partition`.
  """
  chosen = set(preconditioned_modules(params, exclude))
  return jax.tree_util.tree_map_with_path(
    lambda path, _: (
      PRECONDITIONED if stats_lib.path_name(path[:-1]) in chosen else FALLBACK
    ),
    params,
  )


def precondition_layer(
  layer_stats: stats_lib.LayerStats,
  direction: dict[str, jax.Array],
  *,
  damping: Any,
  cg_iters: int | jax.Array,
  eps: Any,
) -> dict[str, jax.Array]:
  """FROG's per-row update `u_j = z_j / sqrt(⟨z_j, m_j⟩ + ε)` for one layer.

  Args:
    layer_stats: the layer's captured statistics.
    direction: `{'kernel', 'bias'?}`, the momentum `m` to precondition.
    damping: τ (a scalar).
    cg_iters: number of CG iterations k.
    eps: ε in the step normalisation.

  Returns:
    `u` with the structure and dtypes of `direction`.
  """
  solve_dtype = jnp.promote_types(direction['kernel'].dtype, jnp.float32)
  m = {k: v.astype(solve_dtype) for k, v in direction.items()}
  matvec = fisher.row_fisher_operator(layer_stats, m, damping, solve_dtype)
  z = cg_lib.batched_cg(matvec, m, cg_iters, fisher.row_inner)
  # ⟨z, m⟩ > 0 in exact arithmetic (CG iterates of a PSD system); clip the
  # rounding so that the square root stays real.
  zm = jnp.maximum(fisher.row_inner(z, m), 0.0)
  scale = jax.lax.rsqrt(zm + eps)
  return {k: (z[k] * scale).astype(direction[k].dtype) for k in direction}


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


def _check_layer_shapes(name, layer_stats, leaves):
  kernel = leaves['kernel']
  rows = layer_stats.output_grads.shape[-1]
  if rows != kernel.shape[-1]:
    raise ValueError(
      f'frog_stats for {name!r} has {rows} output rows but its kernel has'
      f' shape {kernel.shape}: the stats do not belong to these parameters.'
    )


class ScaleByFrogState(NamedTuple):
  """State of `scale_by_frog`."""

  count: chex.Array  # shape=(), dtype=jnp.int32; for damping schedules.


def scale_by_frog(
  damping: optax.ScalarOrSchedule = 1e-3,
  cg_iters: int = 4,
  eps: float = 1e-10,
  exclude: str | Sequence[str] = (),
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

  Args:
    damping: τ, relative to the mean eigenvalue of the normalised Fisher
      (which is 1). A float or an optax schedule of the step count. Default
      1e-3 (the reference's 1e-6 suits full-rank conv rows only).
    cg_iters: number of CG iterations k (3-5 recommended).
    eps: ε guarding the step normalisation; must be > 0.
    exclude: module paths ('/'-joined) not to precondition.

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
  validation.check_positive_int('cg_iters', cg_iters)
  if not isinstance(cg_iters, (int, np.integer)) and not isinstance(
    cg_iters, jax.core.Tracer
  ):
    # Only concrete arrays warn (e.g. inject_hyperparams' init), not every
    # traced update.
    warnings.warn(
      'cg_iters is an array, so the CG runs as a fori_loop, which XLA:CPU'
      ' executes several times slower than the unrolled loop of a Python int.'
      " With optax.inject_hyperparams pass static_args=('cg_iters',).",
      stacklevel=2,
    )
  validation.check_range('eps', eps, low=0.0, low_inclusive=False)
  exclude = validation.normalize_paths('exclude', exclude)

  def init_fn(params):
    preconditioned_modules(params, exclude)  # validates `exclude` early
    return ScaleByFrogState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, frog_stats=_MISSING, **extra):
    del params, extra
    modules = module_leaves(updates)
    chosen = [m for m in _row_layers(modules) if not _is_excluded(m, exclude)]
    if frog_stats is _MISSING:
      raise ValueError(
        'FROG needs the keyword argument frog_stats (from'
        ' frog_optax.linen.value_and_grad) to precondition'
        f' {[m + "/kernel" for m in chosen][:10]}.'
      )
    by_path = stats_lib.stats_by_path(frog_stats)
    missing = [m for m in chosen if m not in by_path]
    if missing:
      raise ValueError(
        'frog_stats has no LayerStats for the preconditioned parameters'
        f' {[m + "/kernel" for m in missing]}. Capture these layers with'
        ' frog_optax.linen.capture, or route them to the fallback with'
        f' exclude={tuple(missing)!r}.'
      )
    tau = damping(state.count) if callable(damping) else damping
    new_leaves = {}
    for m in chosen:
      _check_layer_shapes(m, by_path[m], modules[m])
      _warn_if_rank_deficient(m, by_path[m], modules[m], damping)
      new_leaves[m] = precondition_layer(
        by_path[m], modules[m], damping=tau, cg_iters=cg_iters, eps=eps
      )

    def replace(path, leaf):
      module = stats_lib.path_name(path[:-1])
      if module in new_leaves:
        return new_leaves[module][stats_lib.key_name(path[-1])]
      return leaf

    updates = jax.tree_util.tree_map_with_path(replace, updates)
    return updates, ScaleByFrogState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scaled(learning_rate: optax.ScalarOrSchedule, ratio: Any):
  if callable(learning_rate):
    return lambda count: learning_rate(count) * ratio
  return learning_rate * ratio


def reference_fallback(
  learning_rate: optax.ScalarOrSchedule,
  *,
  momentum: Any = 0.9,
  nesterov: bool = False,
  weight_decay: Any = 0.0,
  weight_decay_mask: Any = None,
  mu_dtype: Any = None,
) -> optax.GradientTransformation:
  """The reference FROG's rule for other parameters: momentum SGD.

  Coupled weight decay (`wd·θ` added to the gradient before momentum), as in
  `torch.optim.SGD`.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
    optax.scale_by_learning_rate(learning_rate),
  )


def _cast_to_param_dtypes() -> optax.GradientTransformation:
  """Returns updates in the parameter dtypes (momentum may be wider)."""

  def update_fn(updates, state, params=None):
    if params is None:
      return updates, state
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


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

  References:
    Breskanu, FROG: Fisher ROw-wise preconditioninG,
    https://github.com/Fullfix/frog-optimizer
  """
  validation.check_range(
    'learning_rate', learning_rate, low=0.0, allow_schedule=True
  )
  validation.check_range(
    'momentum', momentum, low=0.0, high=1.0, high_inclusive=False
  )
  validation.check_range('weight_decay', weight_decay, low=0.0)
  if not isinstance(nesterov, bool):
    raise ValueError(f'nesterov must be a bool; got {nesterov!r}.')
  if fallback is not None:
    if other_lr_ratio is not None:
      raise ValueError(
        'other_lr_ratio only configures the default fallback; set the'
        ' learning rate of your own fallback transformation instead.'
      )
    if not isinstance(fallback, optax.GradientTransformation):
      raise ValueError(
        f'fallback must be an optax.GradientTransformation; got {fallback!r}.'
      )
  else:
    other_lr_ratio = 0.25 if other_lr_ratio is None else other_lr_ratio
    validation.check_range('other_lr_ratio', other_lr_ratio, low=0.0)
    fallback = reference_fallback(
      _scaled(learning_rate, other_lr_ratio),
      momentum=momentum,
      nesterov=nesterov,
      weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask,
      mu_dtype=mu_dtype,
    )
  exclude = validation.normalize_paths('exclude', exclude)

  preconditioned = optax.chain(
    optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=mu_dtype),
    # `exclude` is applied by the labels below: excluded layers never
    # reach this branch.
    scale_by_frog(damping=damping, cg_iters=cg_iters, eps=eps),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  return optax.chain(
    optax.partition(
      {PRECONDITIONED: preconditioned, FALLBACK: fallback},
      lambda params: frog_param_labels(params, exclude),
    ),
    _cast_to_param_dtypes(),
  )
