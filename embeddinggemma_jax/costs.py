"""Model arithmetic from a config alone: parameter count and matmul FLOPs per token.

Used by the benchmark (MFU), the TPU memory model and the compile command's projections; nothing
here runs the model.
"""

from __future__ import annotations

from embeddinggemma_jax.config import EncoderConfig, HeadConfig


def param_count(cfg: EncoderConfig | None = None, head: HeadConfig | None = None) -> int:
    """Parameters of the encoder and the Dense head (EmbeddingGemma-300m: 307,581,696)."""
    c, h = cfg or EncoderConfig(), head or HeadConfig()
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    per_layer = D * (N * H + 2 * K * H) + N * H * D + 3 * D * F + 4 * D + 2 * H
    return (c.vocab_size * D + c.num_layers * per_layer + D + h.in_features * h.hidden_features
            + h.hidden_features * h.out_features)


def flops_per_token(cfg: EncoderConfig, L: int) -> float:
    """Model FLOPs per token at length L (matmuls only; sliding layers see at most 2r+1 keys)."""
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = 2 * D * (N * H + 2 * K * H) + 2 * N * H * D
    mlp = 2 * 3 * D * F
    total = 0.0
    for sliding in cfg.sliding_flags:
        keys = min(L, 2 * cfg.window_radius + 1) if sliding else L
        total += proj + mlp + 2 * 2 * N * H * keys
    return total  # the Dense head runs once per text: negligible per token


__all__ = ["param_count", "flops_per_token"]
