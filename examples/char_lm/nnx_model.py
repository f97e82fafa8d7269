"""The character-level transformer in Flax NNX, its blocks scanned over.

The NNX twin of `model.py`: `nnx.MultiHeadAttention` (its projections are
`nnx.LinearGeneral`s) and an MLP of `nnx.Linear`s per block, the blocks
created by `nnx.vmap` and applied by `nnx.scan` (Flax's scan-over-layers
pattern). `fo.nnx.value_and_grad` captures every projection inside the scan
with the layer axis, so each layer is preconditioned on its own; the
`nnx.Embed`s and `nnx.LayerNorm`s go to the fallback.
"""

import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  def __init__(self, width: int, num_heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads, width, decode=False, rngs=rngs
    )
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class CharTransformer(nnx.Module):
  def __init__(
    self,
    vocab_size: int,
    length: int,
    *,
    width: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    rngs: nnx.Rngs,
  ):
    self.tokens = nnx.Embed(vocab_size, width, rngs=rngs)
    self.positions = nnx.Embed(length, width, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs):
      return Block(width, num_heads, rngs)

    self.blocks = create_blocks(rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(self.norm(forward(x, self.blocks)))
