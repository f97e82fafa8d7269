"""Trains the character-level transformer with FROG or AdamW.

One run = one optimizer at one learning rate for a fixed number of steps.
The jitted step is compiled ahead of time (its compile time is recorded
apart); the wall-clock of a run counts training steps only, and validation
(on fixed held-out windows) runs every `eval_every` steps outside the clock.
"""

import dataclasses
import time

import jax
import numpy as np
import optax

import frog_optax as fo
from examples.char_lm import corpus as corpus_lib
from examples.char_lm import model as model_lib

OPTIMIZERS = ('adamw', 'frog')


@dataclasses.dataclass(frozen=True)
class Config:
  optimizer: str = 'frog'
  learning_rate: float = 0.03
  steps: int = 600
  warmup_steps: int = 50
  batch_size: int = 32
  length: int = 64
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  sample_size: int = 8  # FROG: sequences per batch for the Fisher
  damping: float = 1e-3  # FROG
  # FROG: None = the reference fallback (momentum SGD at learning_rate) for
  # embeddings, LayerNorms and the head; a number = AdamW at that rate.
  fallback_learning_rate: float | None = None
  weight_decay: float = 0.0
  eval_every: int = 50
  eval_batches: int = 8
  seed: int = 0


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """AdamW, or FROG for the Dense-like layers plus a fallback.

  FROG's fallback (embeddings, LayerNorms, and the excluded head) is the
  reference FROG's momentum SGD at the same learning rate, or AdamW at
  `fallback_learning_rate`.
  """
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(
      f'optimizer must be one of {OPTIMIZERS}; got {config.optimizer!r}.'
    )
  if not 0 <= config.warmup_steps < config.steps:
    raise ValueError(
      f'warmup_steps must be in [0, steps = {config.steps}); got'
      f' {config.warmup_steps}.'
    )
  schedule = lambda lr: optax.warmup_cosine_decay_schedule(
    0.0, lr, config.warmup_steps, config.steps
  )
  adamw = lambda lr: optax.adamw(
    schedule(lr), b2=0.99, weight_decay=config.weight_decay
  )
  if config.optimizer == 'adamw':
    return adamw(config.learning_rate)
  fallback = None
  if config.fallback_learning_rate is not None:
    fallback = adamw(config.fallback_learning_rate)
  return fo.frog(
    schedule(config.learning_rate),
    damping=config.damping,
    weight_decay=config.weight_decay,
    exclude='head',
    fallback=fallback,
  )


def make_model(config: Config) -> model_lib.CharTransformer:
  return model_lib.CharTransformer(
    vocab_size=corpus_lib.VOCAB_SIZE,
    length=config.length,
    width=config.width,
    depth=config.depth,
    num_heads=config.num_heads,
  )


def make_loss(apply_fn):
  """`(params, inputs, targets) -> mean next-character cross-entropy`."""

  def loss_fn(params, inputs, targets):
    logits = apply_fn({'params': params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets
    ).mean()

  return loss_fn


def make_step(model, tx, config: Config):
  """`(params, opt_state), inputs, targets -> (params, opt_state), loss`."""
  if config.optimizer == 'frog':
    loss_fn = make_loss(fo.linen.capture(model.apply))
    grad_fn = fo.linen.value_and_grad(loss_fn, sample_size=config.sample_size)
  else:
    plain = jax.value_and_grad(make_loss(model.apply))
    grad_fn = lambda *args: plain(*args) + (None,)

  def step(state, inputs, targets):
    params, opt_state = state
    loss, grads, stats = grad_fn(params, inputs, targets)
    extra = {} if stats is None else {'frog_stats': stats}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def train(config: Config, corpus: corpus_lib.Corpus) -> dict:
  """Trains one run; returns its curves and timings (JSON-ready)."""
  model = make_model(config)
  tx = make_optimizer(config)
  train_batches = corpus_lib.batches(
    corpus.train, config.batch_size, config.length, config.seed
  )
  valid = corpus_lib.batches(
    corpus.valid, config.batch_size, config.length, seed=12345
  )
  valid = [next(valid) for _ in range(config.eval_batches)]
  inputs, targets = next(train_batches)
  params = model.init(jax.random.key(config.seed), inputs)['params']
  state = (params, tx.init(params))

  start = time.perf_counter()
  step = (
    jax.jit(make_step(model, tx, config), donate_argnums=0)
    .lower(state, inputs, targets)
    .compile()
  )
  compile_seconds = time.perf_counter() - start
  eval_loss = jax.jit(make_loss(model.apply))

  def validation_loss(params):
    return float(np.mean([eval_loss(params, x, y) for x, y in valid]))

  curve = {'step': [0], 'seconds': [0.0], 'train_loss': [None]}
  curve['valid_loss'] = [validation_loss(params)]
  seconds, recent = 0.0, []
  for i in range(1, config.steps + 1):
    start = time.perf_counter()
    state, loss = step(state, inputs, targets)
    recent.append(float(loss))  # waits for the step
    seconds += time.perf_counter() - start
    inputs, targets = next(train_batches)
    if i % config.eval_every == 0 or i == config.steps:
      curve['step'].append(i)
      curve['seconds'].append(seconds)
      curve['train_loss'].append(float(np.mean(recent)))
      curve['valid_loss'].append(validation_loss(state[0]))
      recent = []
  return {
    'config': dataclasses.asdict(config),
    'compile_seconds': compile_seconds,
    'seconds_per_step': seconds / config.steps,
    'final_valid_loss': curve['valid_loss'][-1],
    'finite': bool(np.isfinite(curve['valid_loss'][-1])),
    'curve': curve,
  }
