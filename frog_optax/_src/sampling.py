"""Which examples of the batch the capture samples, and how it touches them.

Strided examples `x[::B // s]` are the default: taken by a reshape, they stay on
their device when the batch axis is sharded. A key gives random examples.
"""

import jax
import jax.numpy as jnp

from frog_optax._src import scopes
from frog_optax._src.stats import CaptureRefused


def examples_of(
  x: jax.Array,
  sample_size: int | None,
  rng: jax.Array | None,
  where: str,
) -> jax.Array | slice:
  """The sampled examples of a layer's inputs `x`; `where` names the layer."""
  if x.ndim < 1:
    raise CaptureRefused('its inputs are a scalar')
  if x.shape[0] == 0:
    raise ValueError(
      f'{where} was called on an empty batch (inputs of shape {x.shape}):'
      " FROG estimates each layer's Fisher from the examples of the batch,"
      ' so every call needs at least one example.'
    )
  return sample_examples(x.shape[0], sample_size, rng)


def sample_examples(
  batch: int, sample_size: int | None, rng: jax.Array | None
) -> jax.Array | slice:
  s = batch if sample_size is None or sample_size >= batch else sample_size
  if rng is None:
    # Strided examples stay local to each shard when the batch axis is sharded.
    step = batch // s
    return slice(0, step * s, step)
  return jnp.sort(jax.random.choice(rng, batch, (s,), replace=False))


# Strided examples are taken by a reshape to (s, stride, ...) and a slice of
# the second axis, not by a gather: with the batch axis sharded over devices,
# the s axis inherits the sharding, so neither the sampled inputs nor the output
# gradients of the sample leave their device (a gather or scatter with row
# indices made XLA all-reduce the sampled output gradients).


def _strided(a: jax.Array, examples: slice) -> jax.Array:
  """`a[:s·stride]` as `(s, stride, ...)`."""
  step = examples.step
  s = (examples.stop - examples.start) // step
  return a[: s * step].reshape((s, step) + a.shape[1:])


def take_examples(a: jax.Array, examples: jax.Array | slice) -> jax.Array:
  if isinstance(examples, slice):
    return _strided(a, examples)[:, 0]
  return a[examples]


def add_to_examples(
  a: jax.Array, examples: jax.Array | slice, values: jax.Array
) -> jax.Array:
  """`a.at[examples].add(values)`, sharding-friendly for strided examples."""
  if not isinstance(examples, slice):
    return a.at[examples].add(values)
  # Zeros between the sampled examples: (s, 1, ...) → (s, stride, ...) → batch.
  pad = [(0, 0), (0, examples.step - 1)] + [(0, 0)] * (values.ndim - 1)
  spread = jnp.pad(values[:, None], pad).reshape((-1,) + a.shape[1:])
  tail = a.shape[0] - spread.shape[0]  # examples after the last whole stride
  if tail:
    spread = jnp.pad(spread, [(0, tail)] + [(0, 0)] * (a.ndim - 1))
  return a + spread


def tap_examples(
  a: jax.Array, examples: jax.Array | slice, zeros: jax.Array
) -> jax.Array:
  """`a.at[examples].add(zeros)` for an all-zero `zeros`, without touching `a`.

  The capture's perturbation is always zero, so the value is `a` itself;
  only derivatives see `zeros`: the tangent adds it to the sampled
  examples, and reverse mode transposes that into a slice of the cotangent.
  Adding the zeros in the forward pass instead cost one more pass over every
  captured layer's full-batch output.
  """

  @jax.custom_jvp
  def tap(a, zeros):
    del zeros
    return a

  @tap.defjvp
  def tap_jvp(primals, tangents):
    a, _ = primals
    a_dot, zeros_dot = tangents
    with jax.named_scope(scopes.CAPTURE):
      return a, add_to_examples(a_dot, examples, zeros_dot.astype(a_dot.dtype))

  return tap(a, zeros)
