"""A tiny decoder-only transformer, its blocks stacked with `nn.scan`.

Every Dense-like layer FROG can precondition is here: the attention
projections (`nn.DenseGeneral` inside `nn.MultiHeadDotProductAttention`),
the MLP's `nn.Dense`s, all of them stacked over layers by `nn.scan`, and the
head. The token and position `nn.Embed`s and the `LayerNorm`s go to the
fallback. The scan gives the FROG capture collections the parameters'
layer axis, so each layer of the stack is preconditioned on its own.
"""

import flax.linen as nn
import jax.numpy as jnp

import frog_optax as fo


class Block(nn.Module):
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x, _):
    width = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.num_heads, name='attn')(
      h, mask=mask
    )
    h = nn.LayerNorm()(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * width, name='mlp_in')(h))
    return x + nn.Dense(width, name='mlp_out')(h), None


class CharTransformer(nn.Module):
  vocab_size: int
  length: int
  width: int = 64
  depth: int = 2
  num_heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[1])
    x = nn.Embed(self.vocab_size, self.width, name='tokens')(tokens)
    x = x + nn.Embed(self.length, self.width, name='positions')(positions)
    blocks = nn.scan(
      Block,
      variable_axes={
        'params': 0,
        fo.linen.INPUTS: 0,
        fo.linen.PERTURBATIONS: 0,
      },
      split_rngs={'params': True},
      length=self.depth,
    )
    x, _ = blocks(self.num_heads, name='blocks')(x, None)
    return nn.Dense(self.vocab_size, name='head')(nn.LayerNorm()(x))
