"""The NNX transformer example: FROG inside nnx.scan learns."""

from examples.char_lm import corpus as corpus_lib
from examples.char_lm import nnx_train


def test_nnx_transformer_learns_with_frog_inside_the_scan():
  corpus = corpus_lib.load(20_000)
  config = nnx_train.Config(
    steps=30, eval_every=30, batch_size=16, length=32, width=32
  )
  _, history, stats = nnx_train.train(config, corpus)
  (_, first), (_, last) = history[0], history[-1]
  assert last < first - 0.5, history
  # The attention projections and MLPs of the scanned blocks carry the
  # layer axis: each layer is preconditioned on its own.
  blocks = stats['blocks']
  for path in (('attn', 'query'), ('attn', 'out'), ('mlp_in',)):
    layer = blocks
    for key in path:
      layer = layer[key]
    assert layer.layout.stacked_axes == 1
    assert layer.inputs.shape[0] == config.depth
  assert stats['tokens'] == {'embedding': None}
