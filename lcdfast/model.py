"""One decoder-only Transformer for every family checkpoint.py loads (GPT-2 to Gemma 3), set by `ModelConfig`.

Shape legend: B batch, T tokens in this call, S cache slots (max_seq_len), H heads, K kv heads,
D head dim, C model width, E embedding width (OPT's word_embed_proj_dim, else C), V vocab,
L number of requested exit layers.

Layer indexing follows transformers' `hidden_states`: h[0] is the embedding output, h[i] the
residual stream after block i, h[N] the last block's output (before the final norm).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import csrc_on
from .parallel import VocabShard, all_reduce, gather_vocab
from .quant import QuantWeight, dense, dequantize, quantize_activations, weight_rows


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int  # C
    n_layers: int  # N
    n_heads: int
    n_kv_heads: int = 0  # 0 -> n_heads
    head_dim: int = 0  # 0 -> dim // n_heads
    hidden_dim: int = 0  # feed-forward width; 0 -> 4 * dim
    embed_dim: int = 0  # E: OPT's word_embed_proj_dim; 0 -> dim
    norm: str = "rmsnorm"  # "rmsnorm" | "rmsnorm1p" (Gemma: scaled by 1 + weight, in float32) | "layernorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # False: OPT-350m style post-LN blocks
    sandwich_norm: bool = False  # Gemma 2/3: a norm also after attention and after the MLP, before each residual add
    final_norm: bool = True
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu" (erf) | "relu"
    gated_mlp: bool = True  # SwiGLU: w2(act(w1 x) * w3 x)
    attn_bias: bool = False  # q, k, v and output projections
    attn_out_bias: bool | None = None  # the output projection's; None -> attn_bias (Qwen2: q, k and v only)
    qk_norm: bool = False  # Qwen3, Gemma 3: a norm (the model's kind) over each head's q and k before rotary
    attn_softcap: float = 0.0  # Gemma 2: attention scores -> cap * tanh(scores / cap) before the mask; 0: none
    final_softcap: float = 0.0  # Gemma 2: every head's logits (the final layer's and early exits') likewise
    embed_scale: float = 0.0  # Gemma: token embeddings times this (sqrt(dim)) in the model's dtype; 0: 1
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm1(x)) + mlp(norm2(x)), both read the block's input
    mlp_bias: bool = False
    positions: str = "rotary"  # "rotary" | "learned"
    max_positions: int = 2048  # learned table size (before OPT's offset)
    position_offset: int = 0  # OPT: 2
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # the leading dims of each head that rotate (GPT-NeoX's rotary_pct); 0 -> head_dim
    local_rope_theta: float = 0.0  # Gemma 3: the rotary base of windowed layers (no rope_scaling); 0: rope_theta
    rope_scaling: dict | None = None
    attention_window: int = 0  # Mistral's sliding_window: a query sees the last W positions, itself included; 0: all
    layer_windows: list[int] = field(default_factory=list)  # per layer (GPT-Neo's local layers); [] -> attention_window
    attn_scale: float = 0.0  # attention scores times this; 0 -> 1/sqrt(head_dim); GPT-Neo: 1 (unscaled)
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    family: str = "llama"  # for messages and the checkpoint name map only; forward never reads it

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or (self.dim // self.n_heads if self.n_heads else 0)  # 0 heads: refused later
        self.hidden_dim = self.hidden_dim or 4 * self.dim
        self.embed_dim = self.embed_dim or self.dim
        self.attn_out_bias = self.attn_bias if self.attn_out_bias is None else self.attn_out_bias
        self.rotary_dim = self.rotary_dim or self.head_dim
        self.layer_windows = list(self.layer_windows) or [self.attention_window] * self.n_layers
        self.attn_scale = self.attn_scale or (self.head_dim ** -0.5 if self.head_dim else 1.0)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> Tensor:
    """Inverse frequencies [R/2] (R = rotary_dim), with llama3 or linear `rope_scaling` applied; `local`: those of
    Gemma 3's windowed layers (local_rope_theta, unscaled)."""
    R = cfg.rotary_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    scaling = {} if local else cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq.float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    # x: [B, T, H, D]; cos, sin: [B, T, H, D] or broadcastable, `sin`'s first half of the R = rotary_dim rotating
    # dims negated and the dims past R at cos 1, sin 0 (see `rope_tables`): x * cos + rotate_half(x) * sin in
    # transformers' layout, the halves of the first R dims swapped by index (no copy under compile when R = D)
    B, T, H, D = x.shape
    R = rotary_dim
    if R == D:
        return x * cos + x.view(B, T, H, 2, D // 2).flip(3).view(B, T, H, D) * sin
    swapped = torch.cat([x[..., :R].reshape(B, T, H, 2, R // 2).flip(3).reshape(B, T, H, R), x[..., R:]], dim=-1)
    return x * cos + swapped * sin


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (2, batch, n_kv_heads, max_seq_len, head_dim)  # [2, B, K, S, D]: keys then values, one buffer
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k(self) -> Tensor:  # [B, K, S, D]
        return self.kv[0]

    @property
    def v(self) -> Tensor:
        return self.kv[1]

    def update(self, slots: Tensor, kv: Tensor) -> tuple[Tensor, Tensor]:
        # slots: [T]; kv: [B, T, 2K, D], keys then values (one copy: one loop, compiled) -> whole cache k, v
        B, T, K2, D = kv.shape
        self.kv.index_copy_(3, slots, kv.view(B, T, 2, K2 // 2, D).permute(2, 0, 3, 1, 4))
        return self.k, self.v


def make_norm(cfg: ModelConfig, width: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(width, eps=cfg.norm_eps)
    return RMSNorm(width, cfg.norm_eps, one_plus=cfg.norm == "rmsnorm1p")


class RMSNorm(nn.Module):
    """x / rms(x) * weight; `one_plus` (Gemma): * (1 + weight), the product in float32 before the cast back."""

    def __init__(self, width: int, eps: float, one_plus: bool = False) -> None:
        super().__init__()
        self.eps, self.one_plus = eps, one_plus
        self.weight = nn.Parameter(torch.zeros(width) if one_plus else torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def softcapped(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping); x itself when cap is 0."""
    return torch.tanh(x / cap) * cap if cap else x


ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def realized(t: Tensor) -> Tensor:
    """Under torch.compile: `t` as a buffer inductor computes once with these strides, not an expression it
    inlines into each consumer's loop or lays out its own way. Eager: `t` itself."""
    if not torch.compiler.is_compiling():
        return t
    from torch._inductor import inductor_prims

    return inductor_prims.force_stride_order(t, t.stride())


GEMV_ROWS = 12  # compiled CPU products with at most this many rows run as fused reductions (see `linear`)
SKINNY_ROWS = 128  # CPU products with at most this many rows go to csrc's skinny_linear when it is built


def linear(x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., in] times weight [out, in] transposed, plus bias: [..., out]. `weight` may be quantized (quant.py).

    Under torch.compile on CPU with few rows (decoding), the product is written as a reduction over `in` with
    the output laid out [out, M]: inductor turns it into one loop over the weight's rows that multiplies each
    row, while it sits in L1, by every input row. That streams the weights at close to the machine's read
    bandwidth, where BLAS's gemv reaches about 60% of it (bench/: 15.5 vs 25.7 ms for SmolLM2's layers). More
    rows are one such reduction per row, which inductor fuses into the same loop, M accumulators side by side (one
    reduction over [out, M, in] keeps one accumulator and waits on add latency: SmolLM2's head for DoLa's 9 rows
    14.0 -> 5.6 ms). A quantized weight's dequantization is part of the reduction's expression, so it is fused
    into the same loop and the weight is read as its codes. csrc's skinny_linear / quant_linear (kernels.py), when
    built, block weight rows by input rows in registers and take the products of 2 to SKINNY_ROWS rows (and, eager
    or quantized, of one). Otherwise a quantized weight is dequantized for the call (prefill, CUDA)."""
    rows, on_cpu = x.shape[:-1].numel(), x.device.type == "cpu"
    quantized = isinstance(weight, QuantWeight)
    fused = on_cpu and torch.compiler.is_compiling() and rows <= GEMV_ROWS
    out = weight.shape[0]
    if on_cpu and rows <= SKINNY_ROWS and (quantized or not (fused and rows == 1)) and csrc_on(x.device):
        if quantized:
            op = torch.ops.lcdfast.quant_linear_a8 if weight.a8 else torch.ops.lcdfast.quant_linear
            y = op(x.reshape(rows, -1), weight.q, weight.scale, weight.low)  # [M, out]
        else:
            y = torch.ops.lcdfast.skinny_linear(x.reshape(rows, -1), weight)
    elif quantized and weight.a8:  # the a8 products' reference: x on its int8 grid times the dequantized weight
        return linear(quantize_activations(x), weight._replace(a8=False), bias).to(x.dtype)
    elif fused:
        w = dequantize(weight, x.dtype) if quantized else weight  # an expression inductor fuses into the loop
        x_rows = realized(x.reshape(rows, -1))  # else inductor recomputes x's producers per weight row
        if rows == 1:  # the stacked form below, for one row, made a greedy step 10% slower (A/B)
            y = (w[:, None, :] * x_rows[None]).sum(-1).t().contiguous()  # [out, 1] -> [1, out]
        else:  # one reduction per input row, fused into one loop over the weight: M accumulators side by side
            y = torch.stack([(w * x_rows[m]).sum(-1) for m in range(rows)])  # [M, out]
    else:
        return F.linear(x, dense(weight, x.dtype), bias)
    y = y.reshape(*x.shape[:-1], out)
    return y if bias is None else y + bias


class Linear(nn.Module):
    """y = x @ weight.T + bias with weight [out, in], as nn.Linear and the checkpoints store it."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """Linear with a quantized weight: its codes, scales and minimums as buffers; `weight` is their QuantWeight."""

    def __init__(self, weight: QuantWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("low", weight.low)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.a8 = weight.a8

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.q, self.scale, self.low, self.a8)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
    """Attention of q [B, H, T, D] over the cache k, v [B, K, P, D] where mask [B, 1, T, P], the scores times
    `scale` (and soft-capped by `softcap`): [B, H, T, D].

    Under torch.compile on CPU, written out so inductor fuses it into the step (a decode step's 30 SDPA calls
    cost more in call overhead than in arithmetic); else SDPA, or with soft-capping (which SDPA lacks) two
    batched products."""
    B, H, T, D = q.shape
    K = k.shape[1]
    if not (torch.compiler.is_compiling() and q.device.type == "cpu"):
        if not softcap:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H, scale=scale)
        P = k.shape[2]
        scores = softcapped(q.reshape(B, K, H // K * T, D) @ k.transpose(-1, -2) * scale, softcap)  # [B, K, G*T, P]
        scores = scores.view(B, K, H // K, T, P).masked_fill(~mask[:, :, None], -math.inf)
        return (scores.softmax(-1).view(B, K, H // K * T, P) @ v).view(B, H, T, D)
    q = q.reshape(B, K, H // K, T, 1, D)  # query heads grouped by their kv head
    scores = softcapped((q * k[:, :, None, None]).sum(-1) * scale, softcap)  # [B, K, G, T, P]
    probs = scores.masked_fill(~mask[:, :, None], -math.inf).softmax(-1)
    return (probs[..., None] * v[:, :, None, None]).sum(-2).reshape(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rotary_dim, self.scale, self.softcap = cfg.rotary_dim, cfg.attn_scale, cfg.attn_softcap
        qkv_width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = Linear(cfg.dim, qkv_width, bias=cfg.attn_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attn_out_bias)
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.kv_cache: KVCache | None = None
        self.group = None  # tensor parallel (parallel.shard_model): this rank holds some heads; wo's sum all-reduced

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor, slots: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * K, D)
        if self.q_norm is not None:  # per head, over D
            q, k, v = qkv.split([H, K, K], dim=2)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=2)
        if rope is not None:  # one pass over q, k and v (v's heads get cos 1, sin 0)
            qkv = realized(apply_rotary(qkv, *rope, self.rotary_dim))  # realized: q is read at every attended slot
        k, v = self.kv_cache.update(slots, qkv[:, :, H:])  # [B, K, S, D]
        q = qkv[:, :, :H].transpose(1, 2)  # [B, H, T, D]
        n_slots = mask.shape[-1]  # P <= S slots attended
        y = attend(q, k[:, :, :n_slots], v[:, :, :n_slots], mask, self.scale, self.softcap)  # [B, H, T, D]
        y = self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # [B, T, C]
        return y if self.group is None else all_reduce(y, self.group)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act, self.gated = ACTIVATIONS[cfg.activation], cfg.gated_mlp
        # w13: gate and up side by side when gated (one product), else fc1; w2: down / fc2
        self.w13 = Linear(cfg.dim, cfg.hidden_dim * (2 if cfg.gated_mlp else 1), bias=cfg.mlp_bias)
        self.w2 = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        self.group = None  # tensor parallel: this rank holds some of the hidden columns; w2's sum all-reduced

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:
            y = self.w2(self.act(self.w13(x)))
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)  # [B, T, hidden] each
            y = self.w2(self.act(gate) * up)
        return y if self.group is None else all_reduce(y, self.group)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm, self.parallel_residual = cfg.pre_norm, cfg.parallel_residual
        self.attention_norm = make_norm(cfg, cfg.dim)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg, cfg.dim)
        self.feed_forward = FeedForward(cfg)
        self.post_attention_norm = make_norm(cfg, cfg.dim) if cfg.sandwich_norm else None
        self.post_ffn_norm = make_norm(cfg, cfg.dim) if cfg.sandwich_norm else None

    def forward(self, x: Tensor, rope, mask: Tensor, slots: Tensor) -> Tensor:
        if self.post_attention_norm is not None:
            x = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, mask, slots))
            return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))
        if self.parallel_residual:
            return x + self.attention(self.attention_norm(x), rope, mask, slots) + self.feed_forward(self.ffn_norm(x))
        if self.pre_norm:
            x = x + self.attention(self.attention_norm(x), rope, mask, slots)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(x + self.attention(x, rope, mask, slots))
        return self.ffn_norm(x + self.feed_forward(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = None if cfg.tie_embeddings else nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embeddings = (
            nn.Embedding(cfg.max_positions + cfg.position_offset, cfg.dim) if cfg.positions == "learned" else None
        )
        self.project_in = Linear(cfg.embed_dim, cfg.dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.project_out = Linear(cfg.dim, cfg.embed_dim, bias=False) if cfg.embed_dim != cfg.dim else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.dim) if cfg.final_norm else nn.Identity()
        self.output = Linear(cfg.embed_dim, cfg.vocab_size)  # [V, E]: also the tied embedding table
        self.max_batch = self.max_seq_len = -1
        self.quantization = ""  # the weights' quantization, set by the loader: "int8", "int4:32", "gguf", ...
        self.vocab_shard: VocabShard | None = None  # tensor parallel: `output` holds this rank's vocabulary rows

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms' weights are never quantized)."""
        return self.layers[0].attention_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].attention_norm.weight.device

    def quantizable(self) -> set[str]:
        """Our names of the weights quantization turns into codes: every linear's (the head's included) and the
        untied token embeddings; learned positions stay float."""
        names = {name + ".weight" for name, m in self.named_modules() if isinstance(m, Linear)}
        return names | ({"tok_embeddings.weight"} if self.tok_embeddings is not None else set())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as held (quantized codes and scales included, the KV cache not)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        """Allocate the static KV cache [B, K, S, D] per layer and the rotary table, once."""
        cfg = self.config
        if cfg.positions == "learned" and max_seq_len > cfg.max_positions:
            max_seq_len = cfg.max_positions
        if (max_batch, max_seq_len) == (self.max_batch, self.max_seq_len):
            return
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        dtype, device = self.dtype, self.device
        for layer in self.layers:
            heads = layer.attention.n_kv_heads  # this rank's, under tensor parallelism
            layer.attention.kv_cache = KVCache(max_batch, heads, max_seq_len, cfg.head_dim, dtype, device)
        if cfg.positions == "rotary":
            for suffix, local in [("", False)] + ([("_local", True)] if cfg.local_rope_theta else []):
                angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_frequencies(cfg, local))
                angles = torch.cat((angles, angles), dim=-1).to(device)  # [S, R]
                sign = torch.ones(cfg.rotary_dim, device=device)
                sign[: cfg.rotary_dim // 2] = -1  # rotate_half's negated half, folded into the sines
                still = cfg.head_dim - cfg.rotary_dim  # dims past R keep their values: cos 1, sin 0
                cos = F.pad(angles.cos(), (0, still), value=1.0)  # [S, D]
                sin = F.pad(angles.sin() * sign, (0, still), value=0.0)
                self.register_buffer("rope_cos" + suffix, cos.to(dtype), persistent=False)
                self.register_buffer("rope_sin" + suffix, sin.to(dtype), persistent=False)

    def forward(
        self, tokens: Tensor, slots: Tensor, pad: Tensor, exit_layers: tuple[int, ...] = (), span: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Run `tokens` [B, T] into cache `slots` [T]; rows are left-padded by `pad` [B] slots.

        Attention reads the cache slots `span` = [0, 1, .., P-1] (P past every slot written so far; None: the whole
        cache), so a step's attention costs what the sequence holds, not what the cache could hold.
        Returns the final hidden state after norm (and OPT's project_out) [B, T, E], and the
        residual stream at each requested layer stacked [L, B, T, C] (None if none requested).
        """
        positions = slots[None, :] - pad[:, None]  # [B, T], row-relative; negative on padding
        masks = {w: self.attention_mask(slots, pad, span, w) for w in sorted(set(self.config.layer_windows))}
        table = self.output if self.tok_embeddings is None else self.tok_embeddings  # tied: the head's rows
        x = weight_rows(table.weight, tokens, self.dtype)  # [B, T, E]; quantized rows dequantized alone
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)  # rounded to the dtype first, as Gemma's
        if self.project_in is not None:
            x = self.project_in(x)  # [B, T, C]
        ropes = {False: None, True: None}  # by whether the layer is windowed (Gemma 3's local base)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions.clamp(min=0) + self.config.position_offset)
        else:
            ropes[False] = ropes[True] = self.rope_tables(positions.clamp(min=0))
            if self.config.local_rope_theta:
                ropes[True] = self.rope_tables(positions.clamp(min=0), local=True)
        exits = []
        if 0 in exit_layers:
            exits.append(x)
        for i, (layer, window) in enumerate(zip(self.layers, self.config.layer_windows), start=1):
            x = layer(x, ropes[window > 0], masks[window], slots)
            if i in exit_layers:
                exits.append(x)
        return self.final_hidden(x), torch.stack(exits) if exits else None

    def rope_tables(self, positions: Tensor, local: bool = False) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, H + 2K, D] at `positions` [B, T] for apply_rotary over q, k and v at once: the value
        heads get cos 1, sin 0 (unchanged). `local`: Gemma 3's windowed layers' tables."""
        H, K = self.layers[0].attention.n_heads, self.layers[0].attention.n_kv_heads  # this rank's
        rotated = (torch.arange(H + 2 * K, device=positions.device) < H + K)[:, None]  # [H + 2K, 1]
        cos, sin = (self.rope_cos_local, self.rope_sin_local) if local else (self.rope_cos, self.rope_sin)
        cos, sin = cos[positions][:, :, None], sin[positions][:, :, None]  # [B, T, 1, D]
        return torch.where(rotated, cos, 1.0), torch.where(rotated, sin, 0.0)

    def attention_mask(self, slots: Tensor, pad: Tensor, span: Tensor | None = None, window: int = 0) -> Tensor:
        # [B, 1, T, P]: a query sees cached slots up to its own (`window`: only the last that many), never the row's
        # left padding. A padding query still sees itself, so no row of the softmax is empty (no NaNs).
        cache_slots = torch.arange(self.max_seq_len, device=slots.device) if span is None else span
        causal = cache_slots[None, :] <= slots[:, None]  # [T, P]
        if window:
            causal = causal & (cache_slots[None, :] > slots[:, None] - window)
        not_pad = cache_slots[None, :] >= pad[:, None]  # [B, P]
        mask = causal[None] & (not_pad[:, None] | (cache_slots[None, :] == slots[:, None])[None])
        return mask[:, None]

    def logits(self, h: Tensor, capped: bool = True) -> Tensor:
        """The head's logits [..., V] from a hidden state [..., E], soft-capped where the model caps; `capped`
        False: the bare head (DoLa's readout of an un-normed stream, as transformers computes it). Tensor parallel:
        every rank's vocabulary rows gathered."""
        logits = self.output(h) if self.vocab_shard is None else gather_vocab(self.output(h), self.vocab_shard)
        return softcapped(logits, self.config.final_softcap if capped else 0.0)

    def final_hidden(self, h: Tensor) -> Tensor:
        """Final norm then OPT's project_out: [..., C] -> [..., E]."""
        h = self.norm(h)
        return self.project_out(h) if self.project_out is not None else h

    def exit_hidden(self, h: Tensor, use_norm: bool) -> Tensor:
        """What an early-exit head reads from a residual stream [..., C]: normed or raw, -> [..., E]."""
        if use_norm:
            return self.final_hidden(h)
        return self.project_out(h) if self.project_out is not None else h
