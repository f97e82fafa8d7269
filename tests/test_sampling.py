"""The capture's row sampling and its zero perturbation of the outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import frog_optax as fo
from frog_optax._src import sampling

BATCH = 7  # strided examples 0, 3 (sample 2): a tail row after the last stride


def _examples(kind):
  if kind == 'strided':
    return sampling.sample_examples(BATCH, 2, None)
  return sampling.sample_examples(BATCH, 2, jax.random.key(3))


@pytest.mark.parametrize('kind', ['strided', 'random'])
def test_tap_examples_is_the_input_and_differentiates_like_a_scatter_add(kind):
  examples = _examples(kind)
  a = jax.random.normal(jax.random.key(0), (BATCH, 3))
  zeros = jnp.zeros((2, 3))
  scatter = lambda a, z: a.at[np.asarray(jnp.arange(BATCH)[examples])].add(z)
  tap = lambda a, z: sampling.tap_examples(a, examples, z)
  np.testing.assert_array_equal(tap(a, zeros), a)
  cotangent = jax.random.normal(jax.random.key(1), (BATCH, 3))
  for got, want in zip(
    jax.vjp(tap, a, zeros)[1](cotangent),
    jax.vjp(scatter, a, zeros)[1](cotangent),
  ):
    np.testing.assert_array_equal(got, want)
  tangents = (cotangent, jax.random.normal(jax.random.key(2), (2, 3)))
  np.testing.assert_array_equal(
    jax.jvp(tap, (a, zeros), tangents)[1],
    jax.jvp(scatter, (a, zeros), tangents)[1],
  )


def _spreads(jaxpr, full_sizes):
  """Pads and scatter-adds as large as a full-batch output, nested too."""
  found = 0
  for eqn in jaxpr.eqns:
    if (
      eqn.primitive.name in ('pad', 'scatter-add')
      and eqn.outvars[0].aval.size in full_sizes
    ):
      found += 1
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        found += _spreads(inner, full_sizes)
  return found


def test_capture_never_spreads_the_sample_over_the_whole_batch():
  # The perturbation is zero: adding it to the full-batch outputs would be
  # a pass over every captured layer's outputs, in the forward pass.
  model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Dense(2)])
  x = jnp.ones((8, 5, 5, 3))
  params = model.init(jax.random.key(0), x)['params']
  apply = fo.linen.capture(model.apply)
  loss = lambda p, x: jnp.sum(apply({'params': p}, x) ** 2)
  step = fo.linen.value_and_grad(loss, sample_size=2)
  output_sizes = {8 * 5 * 5 * 4, 8 * 5 * 5 * 2}  # the two layers' outputs
  jaxpr = jax.make_jaxpr(step)(params, x).jaxpr
  assert _spreads(jaxpr, output_sizes) == 0
  # The same walk finds the spread of an explicit add to the sampled examples.
  for examples in (slice(0, 8, 4), jnp.array([0, 4])):
    spread = jax.make_jaxpr(
      lambda a, z, examples=examples: sampling.add_to_examples(a, examples, z)
    )(jnp.ones((8, 5, 5, 4)), jnp.ones((2, 5, 5, 4))).jaxpr
    assert _spreads(spread, output_sizes) == 1
