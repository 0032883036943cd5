"""Weight-only quantized weights: the modes, the layout, and the reference math (quantize, dequantize, rows).

A quantized weight [N, K] (out, in) is a `QuantWeight` of three tensors:
- `q`: int8 codes [N, K] (8 bits, symmetric: -127..127), or 4-bit codes 0..15 packed two to a byte, uint8 [N, K/2]:
  in each chunk of 32 columns byte j holds column j in its low nibble and column j + 16 in its high one (the order
  of GGUF's Q4_0 / Q4_1 blocks, so their bytes are used as they are);
- `scale` [N, K/G]: one per group of G columns (G = K for int8's one scale per row), float16 or float32;
- `low` [N, K/G] or None: w = q * scale + low (4-bit: `low` is the group's minimum, llama.cpp's Q4_1); None for
  symmetric codes, w = q * scale.
The layout is the same whether the codes came from `quantize` (a float checkpoint, `--quantize int8|int4`) or from a
GGUF file's Q8_0 / Q4_0 / Q4_1 blocks (convert.py), so one set of products (model.linear, csrc/quant_linear.cpp)
serves both. Scales and minimums are stored in float16 (as GGUF's blocks hold them) unless that loses them.

A mode with `+a8` (`gguf+a8`, `int8+a8`, `int4:64+a8`) quantizes the activations too, at each product with a quantized
weight (`a8` on the QuantWeight): each block of 32 columns of an input row as int8 codes and one float32 scale
(`quantize_activations`, llama.cpp's Q8 scheme), so csrc multiplies integers. Not exact: it is the mode that trades
accuracy for speed, measured in bench/quantized.py.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from .errors import LcdError, shown

CHUNK = 32  # 4-bit codes are packed per chunk of this many columns (see the module docstring)
GROUPS = (32, 64, 128, 256)
MODES = "int8 (one scale per row), int8:G, int4 (= int4:32) or int4:G with G in 32, 64, 128, 256"
A8 = "+a8"  # the suffix of a mode whose activations are quantized too


class QuantWeight(NamedTuple):
    q: Tensor  # int8 [N, K] or packed 4-bit uint8 [N, K/2]
    scale: Tensor  # [N, K/G]
    low: Tensor | None  # [N, K/G], or None: symmetric
    a8: bool = False  # its products take the activations as int8 codes (quantize_activations)

    @property
    def bits(self) -> int:
        return 8 if self.q.dtype == torch.int8 else 4

    @property
    def shape(self) -> torch.Size:
        N, K = self.q.shape
        return torch.Size((N, K if self.bits == 8 else 2 * K))

    @property
    def group(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.low) if t is not None)


def split_a8(mode: str | None) -> tuple[str | None, bool]:
    """'gguf+a8' -> ('gguf', True): the weights' mode, and whether activations are quantized too."""
    if isinstance(mode, str) and mode.endswith(A8):
        return mode.removesuffix(A8), True
    return mode, False


def parse_mode(mode: str, name: str = "quantize") -> tuple[int, int]:
    """'int8' -> (8, 0: one scale per row), 'int8:G' -> (8, G), 'int4' -> (4, 32), 'int4:G' -> (4, G)."""
    bits_text, colon, group_text = mode.partition(":") if isinstance(mode, str) else ("", "", "")
    bits = {"int8": 8, "int4": 4}.get(bits_text)
    group = (int(group_text) if group_text.isdigit() else -1) if colon else 0 if bits == 8 else CHUNK
    if bits is None or not (group in GROUPS or (group == 0 and not colon)):
        raise LcdError(f"{name}: {shown(mode)} is not a quantization mode (expected {MODES})")
    return bits, group


def quantize(w: Tensor, bits: int, group: int, name: str = "weight") -> QuantWeight:
    """A float weight [N, K] as codes and per-group scales (group 0: one per row), computed in float32."""
    N, K = w.shape
    G = group or K  # 4-bit groups are multiples of CHUNK (GROUPS), so K % G == 0 packs whole chunks
    if K % G:
        raise LcdError(f"quantize: tensor '{name}' has {K} input columns, not a multiple of {G} (group size {G})")
    groups = w.float().reshape(N, K // G, G)
    if bits == 8:
        scale = groups.abs().amax(-1) / 127  # [N, K/G]
        scale = stored_scale(torch.where(scale > 0, scale, 1.0))
        q = (groups / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(N, K)
        return QuantWeight(q, scale, None)
    lowest, highest = groups.amin(-1), groups.amax(-1)
    scale = (highest - lowest) / 15
    scale, low = stored_scale(torch.where(scale > 0, scale, 1.0)), stored_scale(lowest)
    if scale.dtype != low.dtype:
        scale, low = scale.float(), low.float()
    codes = ((groups - low.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return QuantWeight(pack4(codes.reshape(N, K)), scale, low)


def stored_scale(t: Tensor) -> Tensor:
    """float32 scales as float16 when that keeps them (finite, no nonzero flushed to zero), else float32."""
    half = t.half()
    kept = half.isfinite().all() and not ((half == 0) & (t != 0)).any()
    return half if kept else t


def pack4(codes: Tensor) -> Tensor:
    """4-bit codes uint8 [N, K] -> [N, K/2]: per chunk of 32 columns, byte j = column j | column j + 16 << 4."""
    N, K = codes.shape
    chunks = codes.reshape(N, K // CHUNK, 2, CHUNK // 2)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack4(packed: Tensor) -> Tensor:
    """pack4's inverse on any leading dims: uint8 [..., K/2] -> codes [..., K] (uint8)."""
    *lead, half = packed.shape
    chunks = packed.reshape(*lead, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat((chunks & 15, chunks >> 4), dim=-2).reshape(*lead, 2 * half)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight [..., K] the codes stand for (any leading dims: whole weights or gathered rows), computed
    in float32 as q * scale + low (GGUF's formula, so Q4_1 blocks give what gguf's own dequantization gives)."""
    codes = w.q if w.bits == 8 else unpack4(w.q)
    *lead, K = codes.shape
    G = K // w.scale.shape[-1]
    groups = codes.reshape(*lead, K // G, G).float() * w.scale.float()[..., None]
    if w.low is not None:
        groups = groups + w.low.float()[..., None]
    return groups.reshape(*lead, K).to(dtype)


def quantize_activations(x: Tensor) -> Tensor:
    """x [..., K] on the int8 grid the a8 products use: per block of 32 columns (the last may be shorter) a scale
    d = max |x| / 127 (1 for an all-zero block) and codes round(x / d) (half to even), as float32 codes * d."""
    K = x.shape[-1]
    blocks = torch.nn.functional.pad(x.float(), (0, -K % CHUNK)).unflatten(-1, (-1, CHUNK))  # [..., B, 32]
    d = blocks.abs().amax(-1, keepdim=True) / 127
    d = torch.where(d > 0, d, 1.0)
    return ((blocks / d).round().clamp(-127, 127) * d).flatten(-2)[..., :K]


def weight_rows(weight: Tensor | QuantWeight, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rows `ids` [...] of a weight [N, K], float: [..., K] (a quantized weight's rows dequantized alone)."""
    if isinstance(weight, QuantWeight):
        low = None if weight.low is None else weight.low[ids]
        rows = weight._replace(q=weight.q[ids], scale=weight.scale[ids], low=low)
        return dequantize(rows, dtype or torch.float32)
    return weight[ids] if dtype is None else weight[ids].to(dtype)


def dense(weight: Tensor | QuantWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The whole weight as a float tensor (a quantized one dequantized: a copy)."""
    if isinstance(weight, QuantWeight):
        return dequantize(weight, dtype or torch.float32)
    return weight if dtype is None else weight.to(dtype)


def describe(weight: QuantWeight) -> str:
    """'int8', 'int8:32', 'int4:32' ... as parse_mode reads it."""
    return f"int{weight.bits}" + ("" if weight.bits == 8 and weight.group == weight.shape[1] else f":{weight.group}")
