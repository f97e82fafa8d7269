"""The family (FROG ablations, K-FROG, FOOF, AdaFisher(W)) against NumPy.

Each member's whole optimizer runs three steps on a Dense and a Conv layer
plus a fallback parameter and must match `reference_loops` in float64.
Then one registry of all members goes through the optax property battery.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import frog_optax as fo

import models
import reference_loops as ref
from layer_cases import LAYERS


def run(tx, prob):
  state = tx.init(prob.params)
  params = prob.params
  for grads, stats in zip(prob.grads, prob.stats):
    updates, state = tx.update(grads, state, params, frog_stats=stats)
    params = optax.apply_updates(params, updates)
  return params


def assert_matches(got, want):
  chex.assert_trees_all_close(got, want, rtol=1e-7, atol=1e-10)


# --------------------------------------------------------------------------
# FROG's ablation switches.


@pytest.mark.parametrize(
  'options',
  [
    dict(solver='cholesky'),
    dict(trace_normalization=False),
    dict(step_normalization=False),
    dict(row_blocks='kronecker'),
    dict(solver='cholesky', row_blocks='kronecker', step_normalization=False),
    dict(warm_start=True),
    dict(warm_start=True, step_normalization=False, row_blocks='kronecker'),
  ],
  ids=lambda o: '-'.join(f'{k}={v}' for k, v in o.items()),
)
def test_frog_ablations(options):
  prob = ref.problem()
  damping = 1e-2
  tx = fo.frog(
    0.1,
    momentum=0.9,
    weight_decay=0.01,
    damping=damping,
    cg_iters=3,
    other_lr_ratio=0.5,
    **options,
  )
  rule = ref.frog_rule(
    damping=damping,
    k=None if options.get('solver') == 'cholesky' else 3,
    trace_normalization=options.get('trace_normalization', True),
    step_normalization=options.get('step_normalization', True),
    row_blocks=options.get('row_blocks', 'exact'),
    warm_start=options.get('warm_start', False),
  )
  want = ref.heavy_ball_loop(
    prob, rule, lr=0.1, momentum=0.9, wd=0.01, ratio=0.5
  )
  assert_matches(run(tx, prob), want)


def test_frog_ablations_change_the_update():
  # Guards the test above: every switch must matter on this problem.
  prob = ref.problem()
  base = run(fo.frog(0.1, cg_iters=3), prob)
  for options in (
    dict(solver='cholesky'),
    dict(trace_normalization=False),
    dict(step_normalization=False),
    dict(row_blocks='kronecker'),
    dict(warm_start=True),
  ):
    other = run(fo.frog(0.1, cg_iters=3, **options), prob)
    assert not np.allclose(other['conv']['kernel'], base['conv']['kernel'])


# --------------------------------------------------------------------------
# K-FROG.


@pytest.mark.parametrize('y_momentum, nesterov', [(0.0, False), (0.9, True)])
def test_kfrog(y_momentum, nesterov):
  prob = ref.problem()
  tx = fo.kfrog(
    0.05,
    momentum=0.9,
    nesterov=nesterov,
    weight_decay=0.01,
    damping=1e-3,
    cg_iters=3,
    eps=1e-6,
    y_momentum=y_momentum,
  )
  rule = ref.kfrog_rule(damping=1e-3, k=3, eps=1e-6, y_momentum=y_momentum)
  want = ref.heavy_ball_loop(
    prob, rule, lr=0.05, momentum=0.9, nesterov=nesterov, wd=0.01
  )
  assert_matches(run(tx, prob), want)


# --------------------------------------------------------------------------
# FOOF.


@pytest.mark.parametrize('update_interval', [1, 2])
def test_foof_explicit(update_interval):
  # A bias-carrying conv with input dilation; groups = 1.
  prob = ref.problem(conv_spec=LAYERS[3], conv_bias=True)
  tx = fo.foof(
    0.1,
    weight_decay=0.01,
    damping=0.5,
    ema_decay=0.8,
    update_interval=update_interval,
    solver='cholesky',
  )
  rule = ref.foof_rule(
    damping=0.5, ema_decay=0.8, update_interval=update_interval
  )
  want = ref.heavy_ball_loop(prob, rule, lr=0.1, momentum=0.9, wd=0.01)
  assert_matches(run(tx, prob), want)


@pytest.mark.parametrize('solver', ['cg', 'auto'])
def test_foof_cg(solver):
  # 'auto' sends the grouped conv to CG, and with max_explicit_dim=1 the
  # Dense layer too.
  prob = ref.problem()
  tx = fo.foof(0.1, damping=0.5, solver=solver, max_explicit_dim=1, cg_iters=3)
  want = ref.heavy_ball_loop(
    prob, ref.foof_rule(damping=0.5, k=3), lr=0.1, momentum=0.9
  )
  assert_matches(run(tx, prob), want)


def test_foof_auto_solves_small_layers_explicitly():
  prob = ref.problem(conv_spec=LAYERS[3])
  tx = fo.foof(0.1, damping=0.5, solver='auto', max_explicit_dim=10)
  state = tx.init(prob.params)
  layers = state.inner_states['frog'].inner_state[1].layers
  # Dense rows have D = 6 <= 10; the conv's D = 27 goes to CG (no state).
  assert layers['dense'] is not None and layers['conv'] is None
  want = ref.heavy_ball_loop(
    prob,
    _by_layer(
      dense=ref.foof_rule(damping=0.5), conv=ref.foof_rule(damping=0.5, k=4)
    ),
    lr=0.1,
    momentum=0.9,
  )
  assert_matches(run(tx, prob), want)


def _by_layer(**rules):
  return lambda name, *args: rules[name](name, *args)


def test_foof_refuses_explicit_grouped_conv():
  prob = ref.problem()  # LAYERS[2] has 2 feature groups
  tx = fo.foof(0.1, solver='cholesky')
  with pytest.raises(ValueError, match="grouped convolution 'conv'"):
    tx.update(prob.grads[0], tx.init(prob.params), frog_stats=prob.stats[0])


# --------------------------------------------------------------------------
# AdaFisher(W).


@pytest.mark.parametrize(
  'name, kwargs, keep_take, interval',
  [
    ('adafisher', {}, (0.92, 0.08), 1),
    ('adafisherw', {'decay': 0.5}, (0.5, 0.5), 1),
    ('adafisher', {'released_code': True}, (0.08, 0.008), 100),
    ('adafisherw', {'released_code': True, 'update_interval': 2}, None, 2),
  ],
)
def test_adafisher(name, kwargs, keep_take, interval):
  prob = ref.problem()
  keep, take = keep_take or (0.08, 0.008)
  tx = getattr(fo, name)(
    0.01, beta=0.8, weight_decay=0.05, damping=1e-3, **kwargs
  )
  rule = ref.adafisher_rule(
    damping=1e-3, keep=keep, take=take, update_interval=interval
  )
  want = ref.adam_like_loop(
    prob, rule, lr=0.01, beta=0.8, wd=0.05, decoupled=name == 'adafisherw'
  )
  assert_matches(run(tx, prob), want)


def test_adafisher_factors_are_min_max_normalised_averages():
  prob = ref.problem()
  tx = fo.scale_by_adafisher(decay=0.0)  # the factors are the last estimate
  _, state = tx.update(
    prob.grads[0], tx.init(prob.params), frog_stats=prob.stats[0]
  )
  for name in ('dense', 'conv'):
    layer = state.layers[name]
    values = np.concatenate(
      [np.ravel(v) for v in jax.tree.leaves(layer.input_diag)]
    )
    np.testing.assert_allclose([values.min(), values.max()], [0, 1], atol=1e-9)
    np.testing.assert_allclose(
      [layer.output_diag.min(), layer.output_diag.max()], [0, 1], atol=1e-9
    )


# --------------------------------------------------------------------------
# Hyper-parameter errors name the parameter.


@pytest.mark.parametrize(
  'factory, kwargs, match',
  [
    (fo.frog, dict(solver='lu'), 'solver'),
    (fo.frog, dict(row_blocks='diag'), 'row_blocks'),
    (fo.frog, dict(trace_normalization=1), 'trace_normalization'),
    (fo.frog, dict(step_normalization='no'), 'step_normalization'),
    (fo.kfrog, dict(y_momentum=1.0), 'y_momentum'),
    (fo.kfrog, dict(eps=-1.0), 'eps'),
    (fo.kfrog, dict(cg_iters=0), 'cg_iters'),
    (fo.kfrog, dict(damping=-1.0), 'damping'),
    (fo.kfrog, dict(momentum=1.0), 'momentum'),
    (fo.foof, dict(ema_decay=1.0), 'ema_decay'),
    (fo.foof, dict(update_interval=0), 'update_interval'),
    (fo.foof, dict(solver='cg', update_interval=10), 'update_interval'),
    (fo.foof, dict(solver='svd'), 'solver'),
    (fo.foof, dict(max_explicit_dim=0), 'max_explicit_dim'),
    (fo.foof, dict(other_lr_ratio=-1.0), 'other_lr_ratio'),
    (fo.adafisher, dict(beta=1.0), 'beta'),
    (fo.adafisher, dict(decay=-0.1), 'decay'),
    (fo.adafisher, dict(released_code=True, decay=0.9), 'decay'),
    (fo.adafisher, dict(update_interval=1.5), 'update_interval'),
    (fo.adafisherw, dict(released_code='yes'), 'released_code'),
    (fo.adafisherw, dict(weight_decay=-1.0), 'weight_decay'),
    (fo.adafisherw, dict(fallback='adam'), 'fallback'),
    (fo.adafisherw, dict(learning_rate=-1.0), 'learning_rate'),
  ],
)
def test_bad_hyperparameters(factory, kwargs, match):
  kwargs = {'learning_rate': 0.1, **kwargs}
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


# --------------------------------------------------------------------------
# The optax property battery, over one registry of all members.

MEMBERS = {
  'frog': (fo.frog, {}),
  'frog_cholesky': (fo.frog, dict(solver='cholesky')),
  'frog_no_trace_normalization': (fo.frog, dict(trace_normalization=False)),
  'frog_no_step_normalization': (fo.frog, dict(step_normalization=False)),
  'frog_kronecker_rows': (fo.frog, dict(row_blocks='kronecker')),
  'kfrog': (fo.kfrog, dict(y_momentum=0.9)),
  'foof_cholesky': (fo.foof, dict(solver='cholesky', update_interval=2)),
  'foof_cg': (fo.foof, dict(solver='cg')),
  'adafisher': (fo.adafisher, dict(weight_decay=0.01)),
  'adafisherw': (fo.adafisherw, dict(weight_decay=0.01)),
  'adafisher_released': (fo.adafisher, dict(released_code=True)),
}
_member_ids = list(MEMBERS)


def member(name, **kwargs):
  factory, options = MEMBERS[name]
  return factory(0.1, exclude='head', **options, **kwargs)


def test_registry_covers_every_optimizer_alias():
  aliases = {fo.frog, fo.kfrog, fo.foof, fo.adafisher, fo.adafisherw}
  assert {f for f, _ in MEMBERS.values()} == aliases


@pytest.mark.parametrize('name', _member_ids)
def test_unknown_extra_args_are_ignored(name):
  params, grads, stats = models.grads_and_stats()
  tx = member(name)
  a, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  b, _ = tx.update(
    grads, tx.init(params), params, frog_stats=stats, loss=jnp.ones(()), x=3
  )
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize('name', _member_ids)
def test_no_recompile_and_state_evolves(name):
  params, grads, stats = models.grads_and_stats()
  _, grads2, stats2 = models.grads_and_stats(seed=1)
  tx = member(name)
  traces = []

  @jax.jit
  def update(grads, state, params, stats):
    traces.append(1)
    return tx.update(grads, state, params, frog_stats=stats)

  state = tx.init(params)
  u1, state = update(grads, state, params, stats)
  u2, state = update(grads, state, params, stats)
  u3, state = update(grads2, state, params, stats2)
  assert len(traces) == 1
  for u in (u1, u2, u3):
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(u))
  assert not np.allclose(u1['Conv_0']['kernel'], u3['Conv_0']['kernel'])


@pytest.mark.parametrize('name', _member_ids)
def test_inject_hyperparams(name):
  params, grads, stats = models.grads_and_stats()
  factory, options = MEMBERS[name]
  static = [
    a for a in ('cg_iters',) if a in inspect.signature(factory).parameters
  ]
  tx = optax.inject_hyperparams(factory, static_args=static)(
    learning_rate=0.1, exclude='head', **options
  )
  state = tx.init(params)
  update = jax.jit(lambda s: tx.update(grads, s, params, frog_stats=stats))
  u1, _ = update(state)
  state.hyperparams['learning_rate'] = jnp.asarray(0.3, jnp.float32)
  u3, _ = update(state)
  chex.assert_trees_all_close(u3, jax.tree.map(lambda u: 3 * u, u1), rtol=1e-5)


@pytest.mark.parametrize('name', _member_ids)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dtypes_are_kept(name, dtype):
  params, grads, stats = models.grads_and_stats(dtype=dtype)
  tx = member(name)
  updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, frog_stats=st))(
    grads, tx.init(params), params, stats
  )
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
    assert np.all(np.isfinite(np.asarray(u, np.float32)))
  # With mu_dtype=float32 every kernel-shaped state (momentum, factors) is
  # float32 for bfloat16 parameters.
  tx = member(name, mu_dtype=jnp.float32)
  updates, state = tx.update(grads, tx.init(params), params, frog_stats=stats)
  kernel_shape = params['Conv_0']['kernel'].shape
  kernel_like = [
    leaf for leaf in jax.tree.leaves(state) if leaf.shape == kernel_shape
  ]
  assert kernel_like and all(leaf.dtype == jnp.float32 for leaf in kernel_like)
  assert updates['Conv_0']['kernel'].dtype == dtype


@pytest.mark.parametrize('name', _member_ids)
def test_multi_steps_accumulates_and_forwards_stats(name):
  params, grads, stats = models.grads_and_stats(jnp.float64)
  _, grads2, stats2 = models.grads_and_stats(jnp.float64, seed=1)
  tx = optax.MultiSteps(member(name), every_k_schedule=2)
  state = tx.init(params)
  u1, state = tx.update(grads, state, params, frog_stats=stats)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, u1))
  u2, state = tx.update(grads2, state, params, frog_stats=stats2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, grads2)
  direct = member(name)
  want, _ = direct.update(mean, direct.init(params), params, frog_stats=stats2)
  chex.assert_trees_all_close(u2, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('name', _member_ids)
def test_missing_frog_stats_names_parameters(name):
  params, grads, _ = models.grads_and_stats()
  tx = member(name)
  with pytest.raises(ValueError, match='frog_stats.*Conv_0/kernel'):
    tx.update(grads, tx.init(params), params)


def test_state_from_other_parameters_is_an_error():
  prob = ref.problem()
  tx = fo.scale_by_kfrog()
  state = tx.init({'dense': prob.params['dense']})
  with pytest.raises(
    ValueError, match=r'(?s)other parameters.*\bconv\b.*\bnorm\b'
  ):
    tx.update(prob.grads[0], state, frog_stats=prob.stats[0])


def test_frog_warm_start_validation_and_state():
  with pytest.raises(ValueError, match='warm_start'):
    fo.frog(0.1, warm_start=True, solver='cholesky')
  with pytest.raises(ValueError, match='warm_start'):
    fo.scale_by_frog(warm_start=1)
  prob = ref.problem()
  tx = fo.scale_by_frog(warm_start=True)
  state = tx.init(prob.params)
  # The state has the stats tree's structure: a layer's state where its
  # LayerStats sit, None at every other leaf.
  assert jax.tree.structure(state.layers, is_leaf=_is_kernel_dict) == (
    jax.tree.structure(prob.stats[0], is_leaf=_is_stats)
  )
  chex.assert_trees_all_equal_shapes(
    state.layers['dense'], prob.params['dense']
  )
  _, state = tx.update(prob.grads[0], state, frog_stats=prob.stats[0])
  assert np.any(state.layers['conv']['kernel'] != 0)  # the solution is kept
  stateless = fo.scale_by_frog().init(prob.params).layers
  assert jax.tree.leaves(stateless) == []


def _is_kernel_dict(x):
  return isinstance(x, dict) and 'kernel' in x


def _is_stats(x):
  return isinstance(x, fo.LayerStats)


@pytest.mark.parametrize('make', [fo.scale_by_frog, fo.scale_by_kfrog])
def test_a_checkpoint_of_the_path_keyed_state_does_not_restore(make):
  # Earlier builds kept the per-layer state as {'block/Dense_0': state}; it
  # now has the parameters' nesting. Restoring an old checkpoint must fail
  # loudly, never load one layer's state into another.
  from flax import serialization

  params = {
    'block': {'Dense_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}},
    'norm': {'scale': jnp.ones(2)},
  }
  new = make().init(params)
  layer = new.layers['block']['Dense_0']
  flat = {} if layer is None else {'block/Dense_0': layer}
  old = serialization.to_state_dict(new._replace(layers=flat))
  with pytest.raises(ValueError, match='keys do not match'):
    serialization.from_state_dict(new, old)
  # The new layout round-trips.
  again = serialization.from_state_dict(new, serialization.to_state_dict(new))
  chex.assert_trees_all_equal(again, new)
