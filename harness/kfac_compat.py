"""Lets kfac-jax 0.0.8 (the newest release) run on jax 0.10, and run fairly
on XLA:CPU. Neither change touches what K-FAC computes.

1. kfac-jax re-evaluates jaxpr equations through one helper,
`tag_graph_matcher.eval_jaxpr_eqn`, written for jax < 0.10, where
`Primitive.get_bind_params` returned `(subfuns, params)`. jax 0.10 returns
the params alone (sub-functions travel inside them), so every K-FAC step
fails with "too many values to unpack". `patch()` swaps in the same helper
for the new convention.

2. kfac-jax's convolution input factor (`patches_moments`) runs one
   convolution per kernel tap inside a `while_loop`. XLA:CPU runs
   convolutions inside loops many times slower (the same effect that makes
   FROG unroll its CG), which made a K-FAC step 40x an SGD step on the
   MNIST-10k net. kfac-jax also ships `patches_moments_explicit`, the same
   moments from explicitly extracted patches (same values to float32
   rounding, more memory); on CPU the harness uses it, 11x faster there.
"""

import jax.extend as jex


def _eval_jaxpr_eqn(eqn, in_values):
  """Binds one equation to concrete inputs (jax >= 0.10 convention)."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.10: (subfuns, params)
    subfuns, bind_params = bind_params
    in_values = [*subfuns, *in_values]
  with jex.source_info_util.user_context(eqn.source_info.traceback):
    output = eqn.primitive.bind(*in_values, **bind_params)
  return output if isinstance(output, list) else [output]


def patch() -> None:
  """Installs both changes (the second on the CPU backend only)."""
  import jax  # noqa: PLC0415
  from kfac_jax._src import patches_second_moment  # noqa: PLC0415
  from kfac_jax._src import tag_graph_matcher  # noqa: PLC0415
  from kfac_jax._src.curvature_blocks import kronecker_factored  # noqa: PLC0415

  tag_graph_matcher.eval_jaxpr_eqn = _eval_jaxpr_eqn
  if jax.default_backend() == 'cpu':
    kronecker_factored.psm.patches_moments = (
      patches_second_moment.patches_moments_explicit
    )


def import_error() -> str | None:
  """Why kfac-jax does not import here, or None when it does.

  Its releases import removed jax APIs, so on a newer jax the import fails
  with an AttributeError rather than an ImportError.
  """
  try:
    import kfac_jax  # noqa: F401, PLC0415
  except (ImportError, AttributeError) as e:
    return f'{type(e).__name__}: {e}'
  return None
