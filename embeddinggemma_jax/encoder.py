"""The Gemma-3 text encoder run bidirectionally, its layers scanned over depth.

Layers are created with ``nnx.vmap`` (every parameter gets a leading ``layers`` axis) and run
with ``jax.lax.scan``: compiling a bucket costs one layer body, whatever the depth. Sliding and
full layers differ only in their mask radius and RoPE base; a per-layer flag picks the branch
with ``lax.cond`` inside the scan.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from embeddinggemma_jax.attention import Attention
from embeddinggemma_jax.config import EncoderConfig
from embeddinggemma_jax.layers import MLP, RMSNorm, param, rope_tables, take_rows
from embeddinggemma_jax.sharding import constrain

ACTIVATION_BLD = ("activation_batch", "activation_length", "activation_embed")  # the residual stream [B, L, D]


class Block(nnx.Module):
    """One decoder-style layer with Gemma's sandwich norms.

    The residual stream ``h`` is kept in fp32 whatever the compute dtype: attention and the MLP run in
    ``dtype`` (bf16 on TPU), but their normalised outputs are added in fp32. That costs nothing on
    the matmuls and keeps bf16 runs closer to the fp32 reference than the reference's own bf16 run.
    """

    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D = cfg.hidden_size
        kw = dict(param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        self.pre_feedforward_layernorm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        self.post_feedforward_layernorm = RMSNorm(D, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(D, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def attention(self, x, key_valid, rope, radius, impl):
        """The attention branch, the only part that differs between sliding and full layers: x, the
        normalised input [B, L, D] in ``dtype`` -> [B, L, D] in ``dtype`` (before the post-attention norm)."""
        return self.self_attn(x, key_valid, rope, radius, impl)

    def __call__(self, h, key_valid, rope, radius, impl, attn=None):
        """h: [B, L, D] fp32 residual stream; ``attn``: the attention branch's output when already computed."""
        if attn is None:
            attn = self.attention(self.input_layernorm(h, self.dtype), key_valid, rope, radius, impl)
        h = h + self.post_attention_layernorm(attn, jnp.float32)
        m = self.mlp(self.pre_feedforward_layernorm(h, self.dtype))
        h = h + self.post_feedforward_layernorm(m, jnp.float32)
        return constrain(h, ACTIVATION_BLD)


# What a layer keeps for the backward pass under remat (``remat=True`` is "full": nothing, every layer's
# forward is recomputed; "dots": the outputs of the weight matmuls, only the elementwise work and the
# attention's batched einsums are recomputed). Either way the values are the same; only memory and time differ.
REMAT_POLICIES = {"full": lambda: jax.checkpoint_policies.nothing_saveable,
                  "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Encoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = param(nnx.initializers.normal(1.0), rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype,
                                  ("vocab", "embed"))  # [V, D]

        # Every per-layer parameter gets a leading "layers" axis (in its logical axes too).
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        """ids: [B, L] -> [B, L, D]. The sqrt(D) scale is cast to the compute dtype first, as in
        the reference (in bf16 it is 27.75, not 27.7128)."""
        h = take_rows(self.embed_tokens, ids).astype(self.dtype)
        return h * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)

    def __call__(self, ids, mask, *, impl: str = "xla", return_hidden: bool = False, remat: bool = False):
        """ids, mask: [B, L] -> token embeddings [B, L, D] (after the final norm).

        With ``return_hidden`` also returns the residual stream after each layer: [layers, B, L, D].
        """
        cfg = self.cfg
        L = ids.shape[1]
        key_valid = mask.astype(bool)
        pos = jnp.arange(L)
        rope_local = rope_tables(pos, cfg.head_dim, cfg.rope_local_base_freq, self.dtype)
        rope_global = rope_tables(pos, cfg.head_dim, cfg.rope_theta, self.dtype)
        h = constrain(self.embed(ids).astype(jnp.float32), ACTIVATION_BLD)

        graphdef, layer_state = nnx.split(self.layers)
        flags = jnp.asarray(cfg.sliding_flags)

        def body(h, xs):
            state, sliding = xs
            block = nnx.merge(graphdef, state)
            if all(cfg.sliding_flags) or not any(cfg.sliding_flags):
                local = cfg.sliding_flags[0]
                h = block(h, key_valid, rope_local if local else rope_global, cfg.window_radius if local else None,
                          impl)
            else:
                # Only attention differs between sliding and full layers, so the conditional wraps it alone:
                # its result is a [B, L, D] temporary in ``dtype``, not the fp32 residual stream. (A
                # conditional's result cannot be the loop's carry: XLA:TPU copied the whole stream every
                # layer and fused less around it; docs/tpu.md, "What limits MFU".) Its input is the
                # normalised [B, L, D] in ``dtype`` too: passed the fp32 stream, XLA:TPU copied it in a branch.
                x = block.input_layernorm(h, block.dtype)
                a = jax.lax.cond(sliding,
                                 partial(block.attention, rope=rope_local, radius=cfg.window_radius, impl=impl),
                                 partial(block.attention, rope=rope_global, radius=None, impl=impl), x, key_valid)
                h = block(h, key_valid, None, None, impl, attn=a)
            return h, (h if return_hidden else None)

        if remat:
            body = jax.checkpoint(body, policy=REMAT_POLICIES["full" if remat is True else remat]())
        h, hidden = jax.lax.scan(body, h, (layer_state, flags))
        out = self.norm(h, jnp.float32)  # token embeddings in fp32 for the fp32 pooling
        return (out, hidden) if return_hidden else out
