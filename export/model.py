"""Gemma 2 in plain PyTorch, written to export: one graph serves prefill and decode.

Parameter names match Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...), so a
checkpoint loads by name. Numerics follow `transformers.Gemma2ForCausalLM` (eager attention):

    h   = embed(ids) * sqrt(hidden)
    h   = h + post_attn_norm(attn(input_norm(h)))          # "sandwich" norms, 2 per layer
    h   = h + post_ffw_norm(mlp(pre_ffw_norm(h)))
    out = softcap(lm_head(norm(h)), 30)

Precision: norms, soft-caps and softmax always compute in fp32. With fp16 weights the residual stream
also stays fp32 (Gemma's residual exceeds fp16's 65504 in real checkpoints); with bf16 it stays bf16,
as in HF. Logits are always fp32.

KV cache, two contracts (export.io_contract):
- dynamic (`forward`): each layer takes `past [B, KV, P_l, Dh]` and returns `present = cat(past, new)`.
  The mask of a layer is built from *its own* past length and the last `P_l + S` columns of
  `attention_mask`, so a runner may keep only the last `sliding_window - 1` entries of a sliding layer.
- inplace (`forward_inplace`): fixed-size buffers written at each token's position and masked by the
  positions their slots hold (export.kv_cache has the rules); no cache is copied or grown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export import kv_cache
from export.config import GLOBAL, SLIDING, Gemma2Config

KV = tuple[Tensor, Tensor]


def softcap(x: Tensor, cap: float) -> Tensor:
    """`cap * tanh(x / cap)`: bounds `x` to (-cap, cap), near-identity for |x| << cap."""
    return torch.tanh(x / cap) * cap


def sliding_mask(seq_len: int, total_len: int, window: int) -> Tensor:
    """Allowed (query, key) pairs as a bool [S, T] matrix; queries are the last S of T positions.

    Causal always; with `window > 0` a query at position q also needs `k > q - window`, i.e. it sees
    itself and the `window - 1` keys before it (HF `sliding_window_overlay`). `window == 0` is global.
    """
    q_idx = torch.arange(seq_len).unsqueeze(-1) + (total_len - seq_len)  # [S, 1]
    kv_idx = torch.arange(total_len).unsqueeze(0)  # [1, T]
    allowed = kv_idx <= q_idx
    if window > 0:
        allowed = allowed & (kv_idx > q_idx - window)
    return allowed


def attention_bias(attention_mask: Tensor, seq_len: int, total_len: int, window: int) -> Tensor:
    """Additive fp32 bias [B, 1, S, T]: 0 where allowed, fp32 min where masked (padding or window).

    `attention_mask [B, >=T]` int64 marks real tokens with 1; its last T columns are this layer's keys.
    """
    pad = attention_mask[:, attention_mask.shape[1] - total_len :].bool()  # [B, T]
    allowed = sliding_mask(seq_len, total_len, window).to(pad.device)[None, None] & pad[:, None, None, :]
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


def rope_inv_freq(cfg: Gemma2Config) -> Tensor:
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, 1, S, Dh] for `position_ids [B, S]`, computed in fp32 then cast (as HF does)."""
    freqs = position_ids.unsqueeze(-1).float() * inv_freq  # [B, S, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, Dh]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, KV, T, Dh] -> [B, KV * n_rep, T, Dh] (GQA: each KV head serves `n_rep` query heads)."""
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """`x / rms(x)` over the last axis, in fp32 whatever the input dtype."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def attention_core(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, cap: float | None) -> Tensor:
    """softmax(softcap(q kᵀ * scale) + bias) v with GQA; scores and softmax in fp32.

    q [B, H, S, Dh]; k, v [B, KV, T, Dh]; bias [B, 1, S, T] additive fp32 -> [B, H, S, Dh].
    """
    n_rep = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, repeat_kv(k, n_rep).transpose(2, 3)).float() * scale  # [B, H, S, T]
    if cap is not None:
        scores = softcap(scores, cap)  # before the mask, as Gemma 2 does
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, repeat_kv(v, n_rep))


def grouped_attention(
    q: Tensor, keys: tuple[Tensor, ...], values: tuple[Tensor, ...], bias: Tensor, scale: float, cap: float | None
) -> Tensor:
    """`attention_core` over key/value blocks side by side, GQA by grouping queries (no cache is copied).

    q [B, H, S, Dh]; keys[i], values[i] [B, KV, T_i, Dh]; bias [B, 1, S, sum T_i] -> [B, H, S, Dh]. The
    H = KV * R query heads are reshaped to [B, KV, R * S, Dh] so each KV head is read once (repeat_kv
    would materialize R copies of the cache every step); the softmax spans all blocks.
    """
    b, h, s, d = q.shape
    kv = keys[0].shape[1]
    qg = q.reshape(b, kv, -1, d)  # [B, KV, R*S, Dh]
    scores = torch.cat([torch.matmul(qg, k.transpose(2, 3)) for k in keys], dim=-1)  # [B, KV, R*S, T]
    scores = scores.reshape(b, h, s, -1).float() * scale
    if cap is not None:
        scores = softcap(scores, cap)
    probs = torch.softmax(scores + bias, dim=-1).to(values[0].dtype).reshape(b, kv, -1, scores.shape[-1])
    out, start = None, 0
    for v in values:
        part = torch.matmul(probs[..., start : start + v.shape[2]], v)  # [B, KV, R*S, Dh]
        out = part if out is None else out + part
        start += v.shape[2]
    assert out is not None
    return out.reshape(b, h, s, d)


class RMSNorm(nn.Module):
    """RMSNorm in fp32 scaled by `(1 + weight)`; returns fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return rms_normalize(x, self.eps) * (1.0 + self.weight.float())


class Attention(nn.Module):
    def __init__(self, cfg: Gemma2Config, window: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = window
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, Dh], k and v [B, KV, S, Dh], RoPE applied to q and k."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def output(self, out: Tensor) -> Tensor:
        b, _, s, _ = out.shape  # [B, H, S, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.cfg.num_attention_heads * self.cfg.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past: KV) -> tuple[Tensor, KV]:
        cfg = self.cfg
        q, k, v = self.project(x, cos, sin)
        k = torch.cat((past[0], k), dim=2)  # [B, KV, P+S, Dh]
        v = torch.cat((past[1], v), dim=2)
        out = attention_core(q, k, v, bias, cfg.attn_scale, cfg.attn_logit_softcapping)  # [B, H, S, Dh]
        return self.output(out), (k, v)

    def forward_inplace(
        self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, bias: Tensor, cache: KV
    ) -> tuple[Tensor, KV]:
        """The in-place contract (export.kv_cache): write this step's keys, then attend.

        `bias` [B, 1, S, C] (global) or [B, 1, S, C + S] (sliding: ring, then this step's own keys).
        """
        cfg = self.cfg
        q, k, v = self.project(x, cos, sin)
        present = (kv_cache.write(cache[0], k, pos), kv_cache.write(cache[1], v, pos))
        blocks = (present, (k, v)) if self.window else (present,)
        keys, values = tuple(kv[0] for kv in blocks), tuple(kv[1] for kv in blocks)
        out = grouped_attention(q, keys, values, bias, cfg.attn_scale, cfg.attn_logit_softcapping)
        return self.output(out), present


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma2Config, window: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, window)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past: KV) -> tuple[Tensor, KV]:
        return self.sandwich(h, cos.dtype, lambda x: self.self_attn(x, cos, sin, bias, past))

    def forward_inplace(
        self, h: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, bias: Tensor, cache: KV
    ) -> tuple[Tensor, KV]:
        return self.sandwich(h, cos.dtype, lambda x: self.self_attn.forward_inplace(x, cos, sin, pos, bias, cache))

    def sandwich(self, h: Tensor, cdt: torch.dtype, attend: Callable[[Tensor], tuple[Tensor, KV]]) -> tuple[Tensor, KV]:
        """`h + post_attn_norm(attn(input_norm(h)))`, then the same around the MLP; `cdt`: weights' dtype."""
        rdt = h.dtype  # residual dtype
        a, present = attend(self.input_layernorm(h).to(cdt))
        h = h + self.post_attention_layernorm(a).to(rdt)
        m = self.mlp(self.pre_feedforward_layernorm(h).to(cdt))
        h = h + self.post_feedforward_layernorm(m).to(rdt)
        return h, present


class Gemma2Model(nn.Module):
    def __init__(self, cfg: Gemma2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma2ForCausalLM(nn.Module):
    """Gemma 2 decoder with an explicit KV cache.

    `forward(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past)` with
    `past[i] = (key, value)`, each `[B, KV, P_i, Dh]`, returns `(logits, presents)`; logits are
    `[B, S, V]` fp32, or `[B, 1, V]` when built with `last_logits_only=True`.
    """

    def __init__(
        self, cfg: Gemma2Config, last_logits_only: bool = False, residual_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = cfg
        self.last_logits_only = last_logits_only
        self.residual_dtype = residual_dtype  # None: fp32 under fp16 weights, else the weight dtype
        self.model = Gemma2Model(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the RoPE frequencies on the CPU (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def cast(self, dtype: torch.dtype) -> Gemma2ForCausalLM:
        """Weights to `dtype`; norm weights and the RoPE frequencies stay fp32."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.to(dtype)
        return self

    def empty_past(self, batch: int, device: torch.device | str = "cpu") -> list[KV]:
        cfg = self.config
        shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        z = torch.zeros(shape, dtype=self.dtype, device=device)
        return [(z, z) for _ in range(cfg.num_hidden_layers)]

    def empty_cache(
        self, batch: int, length: int, ring: int | None = None, device: torch.device | str = "cpu"
    ) -> list[KV]:
        """In-place contract buffers: `length` slots for global layers, `ring` (default `length`) for sliding."""
        cfg = self.config
        out = []
        for kind in cfg.layer_types:
            slots = length if kind == GLOBAL or ring is None else ring
            shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
            out.append(
                (
                    torch.zeros(shape, dtype=self.dtype, device=device),
                    torch.zeros(shape, dtype=self.dtype, device=device),
                )
            )
        return out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[KV]
    ) -> tuple[Tensor, list[KV]]:
        """The dynamic contract: presents are `cat(past, new)`."""
        cfg = self.config
        seq = input_ids.shape[1]
        h, cos, sin = self.embed(input_ids, position_ids)

        # One bias per layer type, from the first such layer's own past length (see module docstring).
        biases: dict[str, Tensor] = {}
        for kind, window, (pk, _) in zip(cfg.layer_types, cfg.windows, past, strict=True):
            if kind not in biases:
                biases[kind] = attention_bias(attention_mask, seq, pk.shape[2] + seq, window)

        presents: list[KV] = []
        for layer, kind, kv in zip(self.model.layers, cfg.layer_types, past, strict=True):
            h, present = layer(h, cos, sin, biases[kind], kv)
            presents.append(present)
        return self.logits(h), presents

    def forward_inplace(self, input_ids: Tensor, position_ids: Tensor, cache: list[KV]) -> tuple[Tensor, list[KV]]:
        """The in-place contract (export.kv_cache): `cache[i]` is written at this step's positions and returned.

        Padding is marked by negative positions; there is no attention_mask.
        """
        cfg = self.config
        h, cos, sin = self.embed(input_ids, position_ids)

        # One bias per layer type, from the first such layer's buffer length (layers of a kind share it).
        biases: dict[str, Tensor] = {}
        for kind, window, (ck, _) in zip(cfg.layer_types, cfg.windows, cache, strict=True):
            if kind not in biases:
                keys = kv_cache.key_positions(position_ids, ck.shape[2], window)
                biases[kind] = kv_cache.position_bias(position_ids, keys, window)

        presents: list[KV] = []
        layers = cast(list[DecoderLayer], list(self.model.layers))
        for layer, kind, kv in zip(layers, cfg.layer_types, cache, strict=True):
            h, present = layer.forward_inplace(h, cos, sin, position_ids, biases[kind], kv)
            presents.append(present)
        return self.logits(h), presents

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The residual stream's start `[B, S, D]` and the RoPE tables."""
        cfg, cdt = self.config, self.dtype
        rdt = self.residual_dtype or (torch.float32 if cdt == torch.float16 else cdt)
        scale = torch.tensor(cfg.embed_scale, dtype=cdt).to(rdt)  # HF rounds sqrt(hidden) to the weight dtype
        h = F.embedding(input_ids, self.model.embed_tokens.weight).to(rdt) * scale  # [B, S, D]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, cdt)
        return h, cos, sin

    def logits(self, h: Tensor) -> Tensor:
        """fp32 logits [B, S or 1, V] of the final residual stream."""
        cfg = self.config
        if self.last_logits_only:
            h = h[:, -1:, :]
        x = self.model.norm(h).to(self.dtype)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head).float()  # [B, S, V]
        if cfg.final_logit_softcapping is not None:
            logits = softcap(logits, cfg.final_logit_softcapping)
        return logits


__all__ = [
    "GLOBAL",
    "SLIDING",
    "Gemma2ForCausalLM",
    "attention_bias",
    "attention_core",
    "grouped_attention",
    "repeat_kv",
    "rms_normalize",
    "rope_cos_sin",
    "rope_inv_freq",
    "sliding_mask",
    "softcap",
]
