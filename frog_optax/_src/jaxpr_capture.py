"""The capture for any JAX function: the matched jaxpr, re-evaluated with taps.

`jaxpr_match` finds the layers; here the same jaxpr is evaluated equation
by equation (every primitive bound as `jax.core.eval_jaxpr` binds it, so the
value and the gradients are those of `jax.value_and_grad`), except that the
output of every matched op passes through the zero-perturbation tap of the
sampled examples, and its sampled inputs are recorded. Calls that hold a tap are
entered (a `jax.checkpoint` stays one: its body is re-evaluated inside
`jax.checkpoint` with the same policy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend import core as jex_core

from frog_optax._src import jaxpr_match
from frog_optax._src import sampling
from frog_optax._src import scopes


@dataclasses.dataclass
class Pass:
  """One evaluation: the match, the sampling, and what the taps saw.

  Attributes:
    found: the match of the jaxpr.
    sample_size: examples per op for the Fisher (`None`: all).
    rng: optional key for random examples.
    perturbations: `{op key: zeros}`, or `None` to discover their shapes.
    shapes: `{op key: perturbation ShapeDtypeStruct}` (discovery).
    statics: `{op key: (geometry, layout, batch size)}`.
  """

  found: jaxpr_match.Match
  sample_size: int | None
  rng: jax.Array | None
  perturbations: dict[Any, jax.Array] | None = None
  shapes: dict[Any, Any] = dataclasses.field(default_factory=dict)
  statics: dict[Any, Any] = dataclasses.field(default_factory=dict)

  def tap(self, key, invals, y, inputs: dict) -> jax.Array:
    """`y` with the op's sampled examples tapped; records their inputs."""
    tap = self.found.taps[key]
    x = invals[tap.x_operand]
    with jax.named_scope(scopes.CAPTURE):
      examples = sampling.examples_of(
        x, self.sample_size, self.rng, f'op {key}'
      )
      sampled = tap.sample(x, y, examples)
      self.statics[key] = (sampled.geometry, sampled.layout, x.shape[0])
      inputs[key] = sampled.inputs
      if self.perturbations is None:
        self.shapes[key] = jax.ShapeDtypeStruct(
          sampled.perturbation_shape, y.dtype
        )
        return y
      return sampled.add_perturbation(self.perturbations[key])


def evaluate(jaxpr, consts, args, run: Pass, inputs: dict, prefix=()):
  """`jaxpr` on `args`, tapping the matched ops; fills `inputs`."""
  env = {}
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for index, eqn in enumerate(jaxpr.eqns):
    key = prefix + (index,)
    invals = [read(v) for v in eqn.invars]
    with eqn.ctx.manager:
      if key in run.found.nested:
        outvals = _enter(eqn, invals, run, inputs, key)
      else:
        params = eqn.primitive.get_bind_params(eqn.params)
        outvals = eqn.primitive.bind(*invals, **params)
        if not eqn.primitive.multiple_results:
          outvals = [outvals]
    if key in run.found.taps:
      outvals = [run.tap(key, invals, outvals[0], inputs)]
    for v, value in zip(eqn.outvars, outvals):
      if not isinstance(v, jex_core.DropVar):
        env[v] = value
  return [read(v) for v in jaxpr.outvars]


def _enter_scan(eqn, invals, run: Pass, inputs: dict, key):
  """A `lax.scan` over stacked layers: per-step taps, stacked records."""
  p = eqn.params
  body = p['jaxpr']
  n_fixed = p['num_consts'] + p['num_carry']
  consts, carry = invals[: p['num_consts']], invals[p['num_consts'] : n_fixed]
  xs = invals[n_fixed:]
  inside = [k for k in run.found.taps if k[: len(key)] == key]
  stacked = (
    None
    if run.perturbations is None
    else {k: run.perturbations[k] for k in inside}
  )

  def step(carry, sliced):
    x_slices, perturbations = sliced
    per_step = dataclasses.replace(run, perturbations=perturbations)
    recorded = {}
    outs = evaluate(
      body.jaxpr,
      body.consts,
      [*consts, *carry, *x_slices],
      per_step,
      recorded,
      key,
    )
    return outs[: p['num_carry']], (outs[p['num_carry'] :], recorded)

  carry, (ys, recorded) = jax.lax.scan(
    step,
    carry,
    (xs, stacked),
    length=p['length'],
    reverse=p['reverse'],
    unroll=p['unroll'],
  )
  inputs.update(recorded)
  return [*carry, *ys]


def _enter(eqn, invals, run: Pass, inputs: dict, key):
  """A call, checkpoint or scan that holds taps, evaluated by `evaluate`."""
  if eqn.primitive.name == 'scan':
    return _enter_scan(eqn, invals, run, inputs, key)
  sub, consts = jaxpr_match.sub_jaxpr(eqn)
  if eqn.primitive.name not in jaxpr_match.REMATS:
    return evaluate(sub, consts, invals, run, inputs, key)

  # The tapped inputs leave the checkpoint as outputs (no tracer escapes).
  def body(*args):
    inner = {}
    outs = evaluate(sub, consts, args, run, inner, key)
    return outs, inner

  remat = jax.checkpoint(
    body, prevent_cse=eqn.params['prevent_cse'], policy=eqn.params['policy']
  )
  outs, inner = remat(*invals)
  inputs.update(inner)
  return outs
