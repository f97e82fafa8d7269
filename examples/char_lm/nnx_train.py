"""Trains the NNX character-level transformer with FROG (`nnx.Optimizer`).

  python -m examples.char_lm.nnx_train --steps=300

FROG preconditions every attention projection and MLP layer of the scanned
blocks, and the head; AdamW (the `fallback`) trains the embeddings and
LayerNorms. Prints the validation loss every `--eval_every` steps.
"""

import argparse
import dataclasses

import numpy as np
import optax
from flax import nnx

import frog_optax as fo
from examples.char_lm import corpus as corpus_lib
from examples.char_lm import nnx_model


@dataclasses.dataclass(frozen=True)
class Config:
  learning_rate: float = 0.03
  fallback_learning_rate: float = 1e-2
  steps: int = 300
  batch_size: int = 32
  length: int = 64
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  sample_size: int = 8  # sequences per batch for the Fisher
  max_chars: int = 1_000_000
  eval_every: int = 50
  eval_batches: int = 4
  seed: int = 0


def _cross_entropy(model, inputs, targets):
  logits = model(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train(config: Config, corpus: corpus_lib.Corpus | None = None):
  """Returns `(model, [(step, validation loss)], stats of the last step)`."""
  corpus = corpus or corpus_lib.load(config.max_chars)
  model = nnx_model.CharTransformer(
    corpus_lib.VOCAB_SIZE,
    config.length,
    width=config.width,
    depth=config.depth,
    num_heads=config.num_heads,
    rngs=nnx.Rngs(config.seed),
  )
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
  tx = fo.frog(
    schedule,
    fallback=optax.adamw(
      optax.cosine_decay_schedule(config.fallback_learning_rate, config.steps)
    ),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = fo.nnx.value_and_grad(
    _cross_entropy, sample_size=config.sample_size
  )

  @nnx.jit
  def step(model, optimizer, inputs, targets):
    loss, grads, stats = grad_fn(model, inputs, targets)
    optimizer.update(model, grads, frog_stats=stats)
    return loss, stats

  evaluate = nnx.jit(_cross_entropy)
  valid = list(
    zip(
      range(config.eval_batches),
      corpus_lib.batches(
        corpus.valid, config.batch_size, config.length, seed=1
      ),
    )
  )
  history, stats = [], None
  train_batches = corpus_lib.batches(
    corpus.train, config.batch_size, config.length, seed=config.seed
  )
  for i, (inputs, targets) in zip(range(config.steps + 1), train_batches):
    if i % config.eval_every == 0 or i == config.steps:
      losses = [evaluate(model, x, y) for _, (x, y) in valid]
      history.append((i, float(np.mean(losses))))
      print(f'step {i:5d}  validation loss {history[-1][1]:.4f}', flush=True)
    if i == config.steps:
      break
    _, stats = step(model, optimizer, inputs, targets)
  return model, history, stats


def main(argv=None):
  # argparse, not absl flags: main.py defines flags of the same names.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=Config.steps)
  parser.add_argument('--max_chars', type=int, default=Config.max_chars)
  args = parser.parse_args(argv)
  train(Config(steps=args.steps, max_chars=args.max_chars))


if __name__ == '__main__':
  main()
