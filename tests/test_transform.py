"""`frog`/`scale_by_frog`: reference loop, scale invariance, optax rules."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import frog_optax as fo

import explicit
import models
import reference_loops
from layer_cases import LAYERS
from layer_cases import make_layer

# --------------------------------------------------------------------------
# The whole optimizer against a plain NumPy loop with explicit row Fishers.


@pytest.mark.parametrize('nesterov', [False, True])
def test_matches_reference_loop(nesterov):
  prob = reference_loops.problem()
  hp = dict(lr=0.1, momentum=0.9, nesterov=nesterov, wd=0.01, ratio=0.5)
  rule = reference_loops.frog_rule(damping=1e-3, k=3, eps=1e-10)
  want = reference_loops.heavy_ball_loop(prob, rule, **hp)

  tx = fo.frog(
    hp['lr'],
    momentum=hp['momentum'],
    nesterov=nesterov,
    weight_decay=hp['wd'],
    damping=1e-3,
    cg_iters=3,
    eps=1e-10,
    other_lr_ratio=hp['ratio'],
  )
  state = tx.init(prob.params)
  got = prob.params
  for grads, stats in zip(prob.grads, prob.stats):
    updates, state = tx.update(grads, state, got, frog_stats=stats)
    got = optax.apply_updates(got, updates)
  chex.assert_trees_all_close(got, want, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------
# Scale invariance and routing on a captured Flax model.


@pytest.mark.parametrize(
  'dtype, tol', [(jnp.float64, 1e-6), (jnp.float32, 1e-4)]
)
def test_update_invariant_to_loss_scale(dtype, tol):
  # The loss is reduced in float32, so gradients of the scaled loss differ by
  # rounding (~1e-7), which CG amplifies by the row condition number; errors
  # are measured relative to each leaf's largest entry.
  params, grads, stats = models.grads_and_stats(dtype=dtype)
  _, grads_big, stats_big = models.grads_and_stats(dtype=dtype, scale=1e3)
  # scale_by_frog alone preconditions every layer; optax.partition with the
  # family's labels routes the excluded head around it.
  tx = optax.partition(
    {'frog': fo.scale_by_frog(), 'fallback': optax.identity()},
    fo.frog_param_labels(params, exclude='head'),
  )
  u, _ = tx.update(grads, tx.init(params), frog_stats=stats)
  u_big, _ = tx.update(grads_big, tx.init(params), frog_stats=stats_big)
  for name in ('Conv_0', 'Conv_1'):
    for a, b in zip(jax.tree.leaves(u_big[name]), jax.tree.leaves(u[name])):
      assert np.abs(a - b).max() <= tol * np.abs(b).max()
  # Parameters FROG does not touch pass through unchanged, hence scaled.
  chex.assert_trees_all_close(
    u_big['head'], jax.tree.map(lambda g: 1e3 * g, grads['head']), rtol=1e-4
  )


def test_each_row_moves_unit_fisher_distance():
  # With an exact solve (k = D), uᵀ F̂ u = 1 for every row.
  stats, params, features = make_layer(LAYERS[1], True)
  g = jax.tree.map(
    lambda a: jnp.asarray(np.random.default_rng(3).normal(size=a.shape)), params
  )
  d = features.shape[-1]
  u = fo.precondition_layer(stats, g, damping=1e-3, cg_iters=d, eps=0.0)
  fishers = explicit.normalized_row_fishers(features, stats.output_grads, 1e-3)
  rows = explicit.rows_to_vectors(u['kernel'], u['bias'])
  dist = np.einsum('jd,jde,je->j', rows, fishers, rows)
  np.testing.assert_allclose(dist, 1.0, rtol=1e-6)


def test_excluded_layer_gets_default_fallback():
  params, grads, stats = models.grads_and_stats()
  tx = fo.frog(
    0.2, momentum=0.9, weight_decay=0.1, exclude=('head',), other_lr_ratio=0.5
  )
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  want = jax.tree.map(
    lambda g, p: -0.2 * 0.5 * (g + 0.1 * p), grads['head'], params['head']
  )
  chex.assert_trees_all_close(updates['head'], want, rtol=1e-6)
  chex.assert_trees_all_close(
    updates['BatchNorm_0'],
    jax.tree.map(
      lambda g, p: -0.1 * (g + 0.1 * p),
      grads['BatchNorm_0'],
      params['BatchNorm_0'],
    ),
    rtol=1e-6,
  )
  # A custom fallback replaces the default one.
  tx = fo.frog(0.2, exclude='head', fallback=optax.sgd(0.03))
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  chex.assert_trees_all_close(
    updates['head'], jax.tree.map(lambda g: -0.03 * g, grads['head'])
  )


def test_decoupled_weight_decay_and_mask():
  params, grads, stats = models.grads_and_stats()
  zeros = jax.tree.map(jnp.zeros_like, grads)
  tx = fo.frog(
    0.5,
    weight_decay=0.1,
    exclude='head',
    weight_decay_mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p),
  )
  updates, _ = tx.update(zeros, tx.init(params), params, frog_stats=stats)
  chex.assert_trees_all_close(
    updates['Conv_0']['kernel'], -0.5 * 0.1 * params['Conv_0']['kernel']
  )
  np.testing.assert_array_equal(updates['Conv_0']['bias'], 0.0)
  np.testing.assert_array_equal(updates['BatchNorm_0']['scale'], 0.0)


def test_damping_schedule_equals_constant():
  params, grads, stats = models.grads_and_stats()
  a = fo.frog(0.1, damping=0.05, exclude='head')
  b = fo.frog(0.1, damping=optax.constant_schedule(0.05), exclude='head')
  ua, _ = a.update(grads, a.init(params), params, frog_stats=stats)
  ub, _ = b.update(grads, b.init(params), params, frog_stats=stats)
  chex.assert_trees_all_close(ua, ub)
  c = fo.frog(0.1, damping=10.0, exclude='head')
  uc, _ = c.update(grads, c.init(params), params, frog_stats=stats)
  assert not np.allclose(uc['Conv_0']['kernel'], ua['Conv_0']['kernel'])


# --------------------------------------------------------------------------
# Optax rules specific to FROG (the battery every member passes is in
# test_family.py).


def _frog(**kw):
  return fo.frog(0.1, exclude='head', **kw)


def test_inject_hyperparams_traced_cg_iters_warns_and_matches():
  params, grads, stats = models.grads_and_stats(jnp.float64)
  with pytest.warns(UserWarning, match="static_args=\\('cg_iters',\\)"):
    tx = optax.inject_hyperparams(fo.frog)(learning_rate=0.1, exclude='head')
    state = tx.init(params)
  rolled, _ = jax.jit(lambda s: tx.update(grads, s, params, frog_stats=stats))(
    state
  )
  want, _ = _frog().update(
    grads, _frog().init(params), params, frog_stats=stats
  )
  chex.assert_trees_all_close(rolled, want, rtol=1e-8)


def test_chain_and_partition():
  params, grads, stats = models.grads_and_stats(jnp.float64)
  clip = optax.clip_by_global_norm(1e-3)
  chained = optax.chain(clip, _frog())
  got, _ = chained.update(grads, chained.init(params), params, frog_stats=stats)
  clipped, _ = clip.update(grads, clip.init(params))
  want, _ = _frog().update(
    clipped, _frog().init(params), params, frog_stats=stats
  )
  chex.assert_trees_all_close(got, want, rtol=1e-6)

  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: 'adam' if path[0].key == 'head' else 'frog', params
  )
  part = optax.partition(
    {'frog': fo.frog(0.1), 'adam': optax.adam(1e-2)}, labels
  )
  got, _ = part.update(grads, part.init(params), params, frog_stats=stats)
  adam = optax.adam(1e-2)
  want_head, _ = adam.update(grads['head'], adam.init(params['head']))
  chex.assert_trees_all_close(got['head'], want_head, rtol=1e-6)
  want, _ = _frog().update(
    grads, _frog().init(params), params, frog_stats=stats
  )
  chex.assert_trees_all_close(got['Conv_1'], want['Conv_1'], rtol=1e-6)


def test_one_update_builds_the_layer_table_once(monkeypatch):
  # The alias's routing builds the table and hands the owned layers down;
  # neither the shell nor the stats check builds it again.
  from frog_optax._src import routing

  params, grads, stats = models.grads_and_stats()
  tx = fo.frog(0.1, exclude='head')
  state = tx.init(params)
  calls = []
  build = routing.layer_table
  monkeypatch.setattr(
    routing, 'layer_table', lambda *a, **k: calls.append(1) or build(*a, **k)
  )
  updates, _ = tx.update(grads, state, params, frog_stats=stats)
  assert len(calls) == 1
  # What was handed down is what the shell preconditions: the head is not
  # among it, so it got the fallback's update.
  want, _ = fo.scale_by_frog().update(
    grads, fo.scale_by_frog().init(params), frog_stats=stats
  )
  assert not np.allclose(
    updates['head']['kernel'], -0.1 * want['head']['kernel']
  )


def test_stats_are_read_by_layer_not_by_the_stats_trees_nesting():
  # The shell puts the owned layers' stats on the parameters' nesting
  # itself: a stats tree with only the layers' entries (no node for the
  # BatchNorm) gives the same update as the one value_and_grad returns.
  params, grads, stats = models.grads_and_stats()
  layers_only = {k: v for k, v in stats.items() if k != 'BatchNorm_0'}
  tx = fo.frog(0.1)
  state = tx.init(params)
  want, want_state = tx.update(grads, state, params, frog_stats=stats)
  got, got_state = tx.update(grads, state, params, frog_stats=layers_only)
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(got_state, want_state)


def test_an_alias_state_of_the_earlier_layout_does_not_restore():
  # Earlier builds chained a separate dtype cast after the routing, so an
  # alias's state was (PartitionState, EmptyState()); it is now the
  # PartitionState alone. Restoring the old form must fail loudly.
  from flax import serialization

  params, _, _ = models.grads_and_stats()
  new = fo.frog(0.1).init(params)
  old = serialization.to_state_dict((new, optax.EmptyState()))
  with pytest.raises(ValueError, match='do not match'):
    serialization.from_state_dict(new, old)


# --------------------------------------------------------------------------
# Errors that name what is wrong.


def test_missing_layer_stats_names_parameter():
  params, grads, stats = models.grads_and_stats()
  stats = dict(stats, Conv_1=None)
  tx = _frog()
  with pytest.raises(ValueError, match=r"Conv_1/kernel.*exclude=\('Conv_1',\)"):
    tx.update(grads, tx.init(params), params, frog_stats=stats)


def test_stats_of_wrong_layer_are_refused():
  params, grads, stats = models.grads_and_stats()
  bad, _, _ = make_layer(LAYERS[0], True)  # 3 rows, Conv_1 has 4
  stats = dict(stats, Conv_1=bad)
  tx = _frog()
  with pytest.raises(ValueError, match='Conv_1'):
    tx.update(grads, tx.init(params), params, frog_stats=stats)


def test_unmatched_exclude_is_an_error():
  params, _, _ = models.grads_and_stats()
  with pytest.raises(ValueError, match="exclude entries \\['hed'\\]"):
    fo.frog(0.1, exclude='hed').init(params)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(learning_rate=-1.0), 'learning_rate'),
    (dict(momentum=1.0), 'momentum'),
    (dict(momentum=-0.5), 'momentum'),
    (dict(weight_decay=-1e-4), 'weight_decay'),
    (dict(damping=-1e-6), 'damping'),
    (dict(cg_iters=0), 'cg_iters'),
    (dict(cg_iters=2.5), 'cg_iters'),
    (dict(eps=0.0), 'eps'),
    (dict(other_lr_ratio=-1.0), 'other_lr_ratio'),
    (dict(nesterov='yes'), 'nesterov'),
    (dict(exclude=[3]), 'exclude'),
    (dict(exclude=['']), 'exclude'),
    (dict(fallback='sgd'), 'fallback'),
    (dict(fallback=optax.sgd(0.1), other_lr_ratio=1.0), 'other_lr_ratio'),
    (dict(momentum=float('nan')), 'momentum'),
  ],
)
def test_bad_hyperparameters(kwargs, match):
  kwargs = {'learning_rate': 0.1, **kwargs}
  with pytest.raises(ValueError, match=match):
    fo.frog(**kwargs)


# --------------------------------------------------------------------------
# Edge cases stay finite.


def test_zero_gradient_gives_zero_update():
  params, grads, stats = models.grads_and_stats()
  zeros = jax.tree.map(jnp.zeros_like, grads)
  tx = _frog()
  updates, _ = tx.update(zeros, tx.init(params), params, frog_stats=stats)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0.0)


def test_zero_activations_stay_finite():
  params, grads, stats = models.grads_and_stats()
  conv = stats['Conv_0']
  stats = dict(
    stats,
    Conv_0=fo.LayerStats(
      jnp.zeros_like(conv.inputs), conv.output_grads, conv.geometry
    ),
  )
  tx = _frog()
  updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf))


def test_rank_deficient_fisher_warns_only_without_rank_damping():
  # Dense head: D = 5 > s = 2 samples.
  params, grads, stats = models.grads_and_stats(sample_size=2)
  assert stats['head'].output_grads.shape[0] < params['head']['kernel'].shape[0]
  tx = fo.frog(0.1, damping=0.0, rank_damping=0.0)
  with pytest.warns(fo.RankDeficientFisherWarning, match="'head'.*2 samples"):
    updates, _ = tx.update(grads, tx.init(params), params, frog_stats=stats)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf))
  with warnings.catch_warnings():
    warnings.simplefilter('error', fo.RankDeficientFisherWarning)
    # The default rank_damping protects such rows: no warning.
    tx = fo.frog(0.1, damping=0.0)
    tx.update(grads, tx.init(params), params, frog_stats=stats)
    # Conv rows count every output location: 4 images x 9 positions >= D.
    params, grads, stats = models.grads_and_stats(sample_size=4)
    tx = fo.frog(0.1, damping=0.0, rank_damping=0.0, exclude='head')
    tx.update(grads, tx.init(params), params, frog_stats=stats)


def test_no_rank_warning_under_inject_hyperparams():
  # The damping is traced there; it used to warn "got JitTracer(...)".
  params, grads, stats = models.grads_and_stats(sample_size=2)
  tx = optax.inject_hyperparams(fo.frog, static_args=('cg_iters',))(
    learning_rate=0.1
  )
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    step = jax.jit(lambda g, s, p, st: tx.update(g, s, p, frog_stats=st))
    updates, _ = step(grads, tx.init(params), params, stats)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.isfinite(leaf))


def test_compiled_step_names_frog_parts_for_profiles():
  # Profiles and compiled programs show FROG's parts by these scope names.
  model, variables, x, y = models.setup()
  loss_fn = models.make_loss(model)
  tx = fo.frog(0.1, exclude='head', cg_iters=2)

  def step(params, batch_stats, opt_state):
    _, grads, stats = fo.linen.value_and_grad(
      loss_fn, sample_size=4, has_aux=True
    )(params, batch_stats, x, y)
    updates, _ = tx.update(grads, opt_state, params, frog_stats=stats)
    return optax.apply_updates(params, updates)

  params = variables['params']
  text = (
    jax.jit(step)
    .lower(params, variables['batch_stats'], tx.init(params))
    .compile()
    .as_text()
  )
  for scope in ('frog_capture', 'frog_layer', 'frog_curvature', 'frog_cg'):
    assert f'/{scope}/' in text, scope
