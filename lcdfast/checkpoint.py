"""Hugging Face checkpoint directory -> ModelConfig + a loaded Transformer.

One small function per family turns `config.json` into a `ModelConfig`, and one table per family
maps our parameter names onto the checkpoint's tensor names. Tensors are read memory-mapped from
safetensors (never pickles), shape-checked, and assigned into a model built on the meta device.
"""

import dataclasses
import json
import math
import mmap
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from . import quant
from .errors import LcdError, flag, is_int, number, shown, whole
from .model import ModelConfig, QuantLinear, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LcdError(f"{path}: file not found")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an int past Python's digit limit, too deep
        raise LcdError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise LcdError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise LcdError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# Sane bounds, far past any released model, so a bad config.json is refused before anything is built or allocated;
# the tensors in the safetensors header are then checked against the sizes (load_model) before any is read.
LIMITS = {"vocab_size": 1 << 22, "dim": 1 << 18, "n_layers": 1024, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
          "head_dim": 1 << 12, "hidden_dim": 1 << 20, "embed_dim": 1 << 18, "max_positions": 1 << 24,
          "attention_window": 1 << 31}
EPS, THETA, FACTOR = (1e-30, 1.0), (1.0, 1e12), (1e-2, 1e4)  # norm epsilon, rope base, rope_scaling factors


class Checked:
    """A config.json object read key by key, each value checked as it is read: the error names the file and key,
    the value seen and what is allowed. Null or absent: the default, where the key has one."""

    def __init__(self, hf: dict, path: Path | str, prefix: str = "") -> None:
        self.hf, self.path, self.where = hf, path, f"{path}: {prefix}"

    def size(self, key: str, field: str, default: int | None = None, low: int = 1) -> int:
        """An integer in low..LIMITS[field] (`field`: the ModelConfig size it sets); no default: required."""
        value = default if self.hf.get(key) is None else self.hf[key]
        if value is None:
            raise LcdError(f"{self.where}missing key '{key}'")
        return whole(f"{self.where}{key} ({field})", value, low, LIMITS[field])

    def number(self, key: str, default: float | None, bounds: tuple[float, float]) -> float:
        return number(f"{self.where}{key}", self.hf.get(key, default), *bounds)

    def flag(self, key: str, default: bool) -> bool:
        return flag(f"{self.where}{key}", self.hf.get(key, default))

    def tokens(self, key: str, vocab: int, many: bool = False) -> list[int]:
        """A token id (`many`: or a list of them) inside the vocabulary, as a list; null: none."""
        value = self.hf.get(key)
        ids = [] if value is None else value if many and isinstance(value, list) else [value]
        if not all(is_int(i) and 0 <= i < vocab for i in ids):
            raise LcdError(f"{self.where}{key} {shown(value)} must be null or {'token ids' if many else 'a token id'} "
                           f"in 0..{vocab - 1}")
        return ids

    def special_tokens(self, vocab: int) -> dict:
        return {"bos_token_id": (self.tokens("bos_token_id", vocab) or [None])[0],
                "eos_token_ids": self.tokens("eos_token_id", vocab, many=True),
                "pad_token_id": (self.tokens("pad_token_id", vocab) or [None])[0]}


def gpt2_config(c: Checked) -> ModelConfig:
    if c.flag("scale_attn_by_inverse_layer_idx", False) or c.flag("reorder_and_upcast_attn", False):
        raise LcdError(f"{c.path}: GPT-2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported")
    if not c.flag("scale_attn_weights", True):
        raise LcdError(f"{c.path}: GPT-2 option scale_attn_weights=false unsupported")
    act = c.hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LcdError(f"{c.path}: activation_function {shown(act)} unsupported (expected gelu_new)")
    dim, vocab = c.size("n_embd", "dim"), c.size("vocab_size", "vocab_size")
    return ModelConfig(
        family="gpt2", vocab_size=vocab, dim=dim, n_layers=c.size("n_layer", "n_layers"),
        n_heads=c.size("n_head", "n_heads"), hidden_dim=c.size("n_inner", "hidden_dim", 4 * dim), norm="layernorm",
        norm_eps=c.number("layer_norm_epsilon", 1e-5, EPS), activation="gelu_tanh", gated_mlp=False,
        attn_bias=True, mlp_bias=True, positions="learned", max_positions=c.size("n_positions", "max_positions", 1024),
        tie_embeddings=c.flag("tie_word_embeddings", True), **c.special_tokens(vocab),
    )


def gpt_neo_config(c: Checked) -> ModelConfig:
    """GPT-Neo: GPT-2's block with unscaled attention scores, q/k/v without biases, and layers alternating global
    and local (a window of window_size) attention as attention_types lists them."""
    act = c.hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LcdError(f"{c.path}: activation_function {shown(act)} unsupported (expected gelu_new)")
    dim, vocab, n = c.size("hidden_size", "dim"), c.size("vocab_size", "vocab_size"), c.size("num_layers", "n_layers")
    heads = c.size("num_heads", "n_heads")
    if dim % heads:
        raise LcdError(f"{c.path}: hidden_size {dim} does not split into {heads} attention heads")
    types = c.hf.get("attention_types", [[["global", "local"], n // 2]])
    try:
        kinds = [kind for pattern, repeat in types for _ in range(whole("repeat", repeat, 0, n)) for kind in pattern]
    except (TypeError, ValueError, LcdError):
        kinds = None
    if kinds is None or len(kinds) != n or not set(kinds) <= {"global", "local"}:
        raise LcdError(f"{c.path}: attention_types {shown(types)} must be [[[\"global\" or \"local\", ...], repeat], "
                       f"...] naming {n} layers (num_layers)")
    window = c.size("window_size", "attention_window", 256)
    return ModelConfig(
        family="gpt_neo", vocab_size=vocab, dim=dim, n_layers=n, n_heads=heads,
        hidden_dim=c.size("intermediate_size", "hidden_dim", 4 * dim), norm="layernorm",
        norm_eps=c.number("layer_norm_epsilon", 1e-5, EPS), activation="gelu_tanh", gated_mlp=False,
        attn_bias=False, attn_out_bias=True, mlp_bias=True, attn_scale=1.0, positions="learned",
        max_positions=c.size("max_position_embeddings", "max_positions", 2048),
        layer_windows=[window if kind == "local" else 0 for kind in kinds],
        tie_embeddings=c.flag("tie_word_embeddings", True), **c.special_tokens(vocab),
    )


def opt_config(c: Checked) -> ModelConfig:
    act = c.hf.get("activation_function", "relu")
    if act != "relu":
        raise LcdError(f"{c.path}: activation_function {shown(act)} unsupported for OPT (expected relu)")
    dim, vocab = c.size("hidden_size", "dim"), c.size("vocab_size", "vocab_size")
    pre_norm, bias = c.flag("do_layer_norm_before", True), c.flag("enable_bias", True)
    if not c.flag("layer_norm_elementwise_affine", True):
        raise LcdError(f"{c.path}: OPT option layer_norm_elementwise_affine=false unsupported")
    return ModelConfig(
        family="opt", vocab_size=vocab, dim=dim, n_layers=c.size("num_hidden_layers", "n_layers"),
        n_heads=c.size("num_attention_heads", "n_heads"), hidden_dim=c.size("ffn_dim", "hidden_dim"),
        embed_dim=c.size("word_embed_proj_dim", "embed_dim", dim), norm="layernorm", norm_eps=1e-5,
        pre_norm=pre_norm, final_norm=pre_norm and not c.flag("_remove_final_layer_norm", False), activation="relu",
        gated_mlp=False, attn_bias=bias, mlp_bias=bias, positions="learned",
        max_positions=c.size("max_position_embeddings", "max_positions", 2048), position_offset=2,
        tie_embeddings=c.flag("tie_word_embeddings", True), **c.special_tokens(vocab),
    )


def rope_scaling(c: Checked) -> dict | None:
    scaling = c.hf.get("rope_scaling")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise LcdError(f"{c.path}: rope_scaling must be an object, got {shown(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "llama3", "default"):
        raise LcdError(f"{c.path}: rope_scaling type {shown(kind)} unsupported (expected linear or llama3)")
    s = Checked(scaling, c.path, "rope_scaling.")
    if kind != "default":
        s.number("factor", None, FACTOR)
    if kind == "llama3":
        s.size("original_max_position_embeddings", "max_positions")
        low, high = s.number("low_freq_factor", None, FACTOR), s.number("high_freq_factor", None, FACTOR)
        if low >= high:
            raise LcdError(f"{c.path}: rope_scaling.low_freq_factor {low:g} must be below high_freq_factor {high:g}")
    return scaling


def llama_config(c: Checked, family: str = "llama", head_dim: int = 0) -> ModelConfig:
    """LLaMA and Mistral; the block Qwen and Phi-3 build on (`head_dim`: the default when config.json has none)."""
    act = c.hf.get("hidden_act", "silu")
    if act != "silu":
        raise LcdError(f"{c.path}: hidden_act {shown(act)} unsupported (expected silu)")
    dim, vocab = c.size("hidden_size", "dim"), c.size("vocab_size", "vocab_size")
    heads = c.size("num_attention_heads", "n_heads")
    # Mistral, Phi-3: a query sees only the last `sliding_window` positions (itself included); 0: all
    windowed = c.hf.get("model_type") in ("mistral", "phi3")
    window = c.size("sliding_window", "attention_window", 0, low=0) if windowed else 0
    return ModelConfig(
        family=family, vocab_size=vocab, dim=dim, n_layers=c.size("num_hidden_layers", "n_layers"), n_heads=heads,
        n_kv_heads=c.size("num_key_value_heads", "n_kv_heads", heads),
        head_dim=c.size("head_dim", "head_dim", head_dim or dim // heads),
        hidden_dim=c.size("intermediate_size", "hidden_dim"),
        norm="rmsnorm", norm_eps=c.number("rms_norm_eps", 1e-6, EPS), activation="silu", gated_mlp=True,
        attn_bias=c.flag("attention_bias", False), mlp_bias=c.flag("mlp_bias", False), positions="rotary",
        rope_theta=c.number("rope_theta", 10000.0, THETA), rope_scaling=rope_scaling(c),
        max_positions=c.size("max_position_embeddings", "max_positions", 2048), attention_window=window,
        tie_embeddings=c.flag("tie_word_embeddings", False), **c.special_tokens(vocab),
    )


def rotary_dims(c: Checked, key: str, default: float, head_dim: int) -> int:
    """How many of each head's dims rotate: head_dim times the fraction `key` (NeoX's rotary_pct, Phi's
    partial_rotary_factor), an even number of at least 2."""
    rotary = int(head_dim * c.number(key, default, (0.0, 1.0)))
    if rotary < 2 or rotary % 2:
        raise LcdError(f"{c.path}: {key} {c.hf.get(key, default)} rotates {rotary} of each head's {head_dim} dims; "
                       "lcdfast needs an even number >= 2")
    return rotary


def neox_config(c: Checked) -> ModelConfig:
    """GPT-NeoX / Pythia: LayerNorm, rotary over the first rotary_pct of each head, fused per-head QKV, biases,
    erf GELU, parallel residual (use_parallel_residual), untied embed_out."""
    act = c.hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise LcdError(f"{c.path}: hidden_act {shown(act)} unsupported (expected gelu or gelu_new)")
    dim, vocab, heads = c.size("hidden_size", "dim"), c.size("vocab_size", "vocab_size"), c.size("num_attention_heads",
                                                                                                  "n_heads")
    if dim % heads:
        raise LcdError(f"{c.path}: hidden_size {dim} does not split into {heads} attention heads")
    rotary = rotary_dims(c, "rotary_pct", 0.25, dim // heads)
    bias = c.flag("attention_bias", True)
    return ModelConfig(
        family="gpt_neox", vocab_size=vocab, dim=dim, n_layers=c.size("num_hidden_layers", "n_layers"), n_heads=heads,
        hidden_dim=c.size("intermediate_size", "hidden_dim"), norm="layernorm",
        norm_eps=c.number("layer_norm_eps", 1e-5, EPS), activation="gelu" if act == "gelu" else "gelu_tanh",
        gated_mlp=False, attn_bias=bias, mlp_bias=True, parallel_residual=c.flag("use_parallel_residual", True),
        positions="rotary", rope_theta=c.number("rotary_emb_base", 10000.0, THETA), rotary_dim=rotary,
        rope_scaling=rope_scaling(c), max_positions=c.size("max_position_embeddings", "max_positions", 2048),
        tie_embeddings=c.flag("tie_word_embeddings", False), **c.special_tokens(vocab),
    )


def qwen_config(c: Checked) -> ModelConfig:
    """Qwen2/2.5: LLaMA with biases on q, k and v (not on the output projection); Qwen3: no biases unless
    attention_bias, an RMSNorm over each head's q and k, head_dim its own key."""
    if c.flag("use_sliding_window", False):  # released Qwen2.5/Qwen3 checkpoints keep it off
        raise LcdError(f"{c.path}: use_sliding_window=true unsupported (windowed layers past max_window_layers)")
    qwen3 = c.hf.get("model_type") == "qwen3"
    bias = c.flag("attention_bias", False) if qwen3 else True
    cfg = llama_config(c, family="qwen3" if qwen3 else "qwen2", head_dim=128 if qwen3 else 0)  # Qwen3Config's: 128
    return dataclasses.replace(cfg, attn_bias=bias, attn_out_bias=bias and qwen3, qk_norm=qwen3)


def phi3_config(c: Checked) -> ModelConfig:
    """Phi-3 (and Phi-4-mini): the LLaMA block with fused qkv_proj and gate_up_proj, a sliding_window over every
    layer, rotary over the first partial_rotary_factor of each head; longrope scaling is refused."""
    cfg = llama_config(c, family="phi3")
    return dataclasses.replace(cfg, rotary_dim=rotary_dims(c, "partial_rotary_factor", 1.0, cfg.head_dim))


GELU = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}  # transformers' names -> ours


def gemma_config(c: Checked) -> ModelConfig:
    """Gemma: the LLaMA block with norms scaled by 1 + weight, embeddings times sqrt(hidden_size), GeGLU and its
    own head_dim; Gemma 2 adds norms after attention and the MLP, scores scaled by query_pre_attn_scalar^-1/2,
    attention and final soft-capping, and a window on every other layer (the even ones); Gemma 3 (text) drops the
    soft-capping for q/k norms, windows five layers in six (sliding_window_pattern) with their own rotary base."""
    kind = c.hf.get("model_type")
    key = "hidden_act" if kind == "gemma" else "hidden_activation"
    act = c.hf.get(key) or "gelu_pytorch_tanh"
    if not isinstance(act, str) or act not in GELU:
        raise LcdError(f"{c.path}: {key} {shown(act)} unsupported (expected gelu_pytorch_tanh or gelu)")
    dim, vocab, heads = c.size("hidden_size", "dim"), c.size("vocab_size", "vocab_size"), c.size("num_attention_heads",
                                                                                                  "n_heads")
    n, head_dim = c.size("num_hidden_layers", "n_layers"), c.size("head_dim", "head_dim", 256)
    cfg = dict(
        family=kind, vocab_size=vocab, dim=dim, n_layers=n, n_heads=heads, head_dim=head_dim,
        n_kv_heads=c.size("num_key_value_heads", "n_kv_heads", heads), hidden_dim=c.size("intermediate_size",
                                                                                         "hidden_dim"),
        norm="rmsnorm1p", norm_eps=c.number("rms_norm_eps", 1e-6, EPS), activation=GELU[act], gated_mlp=True,
        attn_bias=c.flag("attention_bias", False), positions="rotary", embed_scale=dim ** 0.5,
        rope_theta=c.number("rope_theta", 1e6 if kind == "gemma3_text" else 1e4, THETA), rope_scaling=rope_scaling(c),
        max_positions=c.size("max_position_embeddings", "max_positions", 8192),
        tie_embeddings=c.flag("tie_word_embeddings", True), **c.special_tokens(vocab))
    if kind == "gemma":
        return ModelConfig(**cfg)
    cap = lambda k: 0.0 if c.hf.get(k) is None else c.number(k, None, (1e-3, 1e6))  # noqa: E731 - null: no capping
    window = c.size("sliding_window", "attention_window", 4096)
    if kind == "gemma2":
        windowed = [i % 2 == 0 for i in range(n)]
    else:
        pattern = c.size("sliding_window_pattern", "n_layers", 6)
        windowed = [(i + 1) % pattern != 0 for i in range(n)]
    return ModelConfig(**cfg, sandwich_norm=True, qk_norm=kind == "gemma3_text",
                       attn_scale=c.number("query_pre_attn_scalar", 256, (1e-6, 1e9)) ** -0.5,
                       attn_softcap=cap("attn_logit_softcapping") if kind == "gemma2" else 0.0,  # 3: never (as HF)
                       final_softcap=cap("final_logit_softcapping"),
                       layer_windows=[window if w else 0 for w in windowed],
                       local_rope_theta=c.number("rope_local_base_freq", 1e4, THETA) if kind == "gemma3_text" else 0.0)


FAMILIES = {"gpt2": gpt2_config, "gpt_neo": gpt_neo_config, "opt": opt_config, "gpt_neox": neox_config,
            "llama": llama_config, "mistral": llama_config, "qwen2": qwen_config, "qwen3": qwen_config,
            "gemma": gemma_config, "gemma2": gemma_config, "gemma3_text": gemma_config, "phi3": phi3_config}


def model_config(hf: dict, path: Path | str = "config.json") -> ModelConfig:
    """A config.json object -> ModelConfig, every value checked (an LcdError naming `path` and the key if not)."""
    family = hf.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise LcdError(f"{path}: model_type {shown(family)} unsupported (expected one of {', '.join(FAMILIES)})")
    cfg = FAMILIES[family](Checked(hf, path))
    if cfg.n_heads % cfg.n_kv_heads:
        raise LcdError(f"{path}: {cfg.n_heads} attention heads do not split into {cfg.n_kv_heads} key/value heads")
    return cfg


def read_config(model_dir: str | Path) -> ModelConfig:
    if not Path(model_dir).is_dir():
        raise LcdError(f"{model_dir}: model directory not found")
    path = Path(model_dir) / "config.json"
    return model_config(read_json(path), path)


# Per family: our parameter name -> (checkpoint names concatenated along dim 0, their layout: "" as ours,
# "conv1d" [in, out] (GPT-2's Conv1D, transposed), "per_head_qkv" (GPT-NeoX's q, k, v rows head by head);
# stored_as_ours). Our Linear weights are [out, in] like nn.Linear's.
def gpt2_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    names = {"tok_embeddings.weight": (["wte.weight"], ""), "pos_embeddings.weight": (["wpe.weight"], "")}
    # GPT-2's head is always tied to wte
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"h.{i}."
        for part in ("weight", "bias"):
            names[ours + f"attention_norm.{part}"] = ([hf + f"ln_1.{part}"], "")
            names[ours + f"ffn_norm.{part}"] = ([hf + f"ln_2.{part}"], "")
            layout = "conv1d" if part == "weight" else ""
            names[ours + f"attention.wqkv.{part}"] = ([hf + f"attn.c_attn.{part}"], layout)
            names[ours + f"attention.wo.{part}"] = ([hf + f"attn.c_proj.{part}"], layout)
            names[ours + f"feed_forward.w13.{part}"] = ([hf + f"mlp.c_fc.{part}"], layout)
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"mlp.c_proj.{part}"], layout)
    names["norm.weight"], names["norm.bias"] = (["ln_f.weight"], ""), (["ln_f.bias"], "")
    return names


def gpt_neo_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    names = {"tok_embeddings.weight": (["wte.weight"], ""), "pos_embeddings.weight": (["wpe.weight"], "")}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"h.{i}."
        names[ours + "attention.wqkv.weight"] = ([hf + f"attn.attention.{p}_proj.weight" for p in "qkv"], "")
        for part in ("weight", "bias"):
            names[ours + f"attention_norm.{part}"] = ([hf + f"ln_1.{part}"], "")
            names[ours + f"ffn_norm.{part}"] = ([hf + f"ln_2.{part}"], "")
            names[ours + f"attention.wo.{part}"] = ([hf + f"attn.attention.out_proj.{part}"], "")
            names[ours + f"feed_forward.w13.{part}"] = ([hf + f"mlp.c_fc.{part}"], "")
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"mlp.c_proj.{part}"], "")
    names["norm.weight"], names["norm.bias"] = (["ln_f.weight"], ""), (["ln_f.bias"], "")
    return names


def opt_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    names = {"tok_embeddings.weight": (["embed_tokens.weight"], ""),
             "pos_embeddings.weight": (["embed_positions.weight"], "")}
    if cfg.embed_dim != cfg.dim:
        names["project_in.weight"] = (["project_in.weight"], "")
        names["project_out.weight"] = (["project_out.weight"], "")
    parts = ("weight", "bias")
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        for part in parts:
            names[ours + f"attention_norm.{part}"] = ([hf + f"self_attn_layer_norm.{part}"], "")
            names[ours + f"ffn_norm.{part}"] = ([hf + f"final_layer_norm.{part}"], "")
        for part in parts if cfg.attn_bias else parts[:1]:
            qkv = [hf + f"self_attn.{p}_proj.{part}" for p in "qkv"]
            names[ours + f"attention.wqkv.{part}"] = (qkv, False)
            names[ours + f"attention.wo.{part}"] = ([hf + f"self_attn.out_proj.{part}"], "")
        for part in parts if cfg.mlp_bias else parts[:1]:
            names[ours + f"feed_forward.w13.{part}"] = ([hf + f"fc1.{part}"], "")
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"fc2.{part}"], "")
    if cfg.final_norm:
        names["norm.weight"] = (["final_layer_norm.weight"], "")
        names["norm.bias"] = (["final_layer_norm.bias"], "")
    return names


def llama_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    names = {"tok_embeddings.weight": (["embed_tokens.weight"], ""), "norm.weight": (["norm.weight"], "")}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        names[ours + "attention_norm.weight"] = ([hf + "input_layernorm.weight"], "")
        names[ours + "ffn_norm.weight"] = ([hf + "post_attention_layernorm.weight"], "")
        for part in ("weight", "bias") if cfg.attn_bias else ("weight",):
            names[ours + f"attention.wqkv.{part}"] = ([hf + f"self_attn.{p}_proj.{part}" for p in "qkv"], "")
        for part in ("weight", "bias") if cfg.attn_out_bias else ("weight",):
            names[ours + f"attention.wo.{part}"] = ([hf + f"self_attn.o_proj.{part}"], "")
        if cfg.qk_norm:
            names[ours + "attention.q_norm.weight"] = ([hf + "self_attn.q_norm.weight"], "")
            names[ours + "attention.k_norm.weight"] = ([hf + "self_attn.k_norm.weight"], "")
        for part in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            gate_up = [hf + f"mlp.gate_proj.{part}", hf + f"mlp.up_proj.{part}"]
            names[ours + f"feed_forward.w13.{part}"] = (gate_up, False)
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"mlp.down_proj.{part}"], "")
    return names


def neox_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    names = {"tok_embeddings.weight": (["embed_in.weight"], "")}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            names[ours + f"attention_norm.{part}"] = ([hf + f"input_layernorm.{part}"], "")
            names[ours + f"ffn_norm.{part}"] = ([hf + f"post_attention_layernorm.{part}"], "")
            names[ours + f"feed_forward.w13.{part}"] = ([hf + f"mlp.dense_h_to_4h.{part}"], "")
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"mlp.dense_4h_to_h.{part}"], "")
        for part in ("weight", "bias") if cfg.attn_bias else ("weight",):
            names[ours + f"attention.wqkv.{part}"] = ([hf + f"attention.query_key_value.{part}"], "per_head_qkv")
            names[ours + f"attention.wo.{part}"] = ([hf + f"attention.dense.{part}"], "")
    names["norm.weight"], names["norm.bias"] = (["final_layer_norm.weight"], ""), (["final_layer_norm.bias"], "")
    return names


def phi3_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    """LLaMA's names with q, k, v and gate, up each stored fused, in our order."""
    names = llama_names(cfg)
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        names[ours + "attention.wqkv.weight"] = ([hf + "self_attn.qkv_proj.weight"], "")
        names[ours + "feed_forward.w13.weight"] = ([hf + "mlp.gate_up_proj.weight"], "")
    return names


def gemma_names(cfg: ModelConfig) -> dict[str, tuple[list[str], str]]:
    """LLaMA's names; Gemma 2/3's post_attention_layernorm follows attention, and pre_feedforward_layernorm is the
    norm before the MLP."""
    names = llama_names(cfg)
    if cfg.sandwich_norm:
        for i in range(cfg.n_layers):
            ours, hf = f"layers.{i}.", f"layers.{i}."
            names[ours + "ffn_norm.weight"] = ([hf + "pre_feedforward_layernorm.weight"], "")
            names[ours + "post_attention_norm.weight"] = ([hf + "post_attention_layernorm.weight"], "")
            names[ours + "post_ffn_norm.weight"] = ([hf + "post_feedforward_layernorm.weight"], "")
    return names


# Buffers some checkpoints carry that a model recomputes: GPT-2's, GPT-Neo's and NeoX's causal masks, rotary tables.
IGNORED = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
NAME_TABLES = {"gpt2": gpt2_names, "gpt_neo": gpt_neo_names, "opt": opt_names, "gpt_neox": neox_names,
               "llama": llama_names, "qwen2": llama_names, "qwen3": llama_names, "gemma": gemma_names,
               "gemma2": gemma_names, "gemma3_text": gemma_names, "phi3": phi3_names}
BODY_PREFIXES = {"gpt2": ("transformer.", ""), "gpt_neo": ("transformer.", ""), "gpt_neox": ("gpt_neox.", ""),
                 "opt": ("model.decoder.", "decoder.", "")}  # the others: ("model.", "")
HEAD_NAMES = {"gpt_neox": "embed_out.weight"}  # the untied head's checkpoint name (no prefix); else lm_head.weight


SHARD_NAME = re.compile(r"[^/\\:\x00]{1,240}\.safetensors")  # a file name in the checkpoint's directory, not a path


def open_safetensors(model_dir: Path) -> dict[str, tuple[Path, object]]:
    """Tensor name -> (file, open safetensors handle), over one file or an index of shards."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LcdError(f"{index_path}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        bad = next((f for f in files if not SHARD_NAME.fullmatch(f)), None)
        if bad is not None:  # a path would read outside the checkpoint: /etc/passwd, ../other/model.safetensors
            raise LcdError(f"{index_path}: shard {shown(bad)} is not a .safetensors file name in the checkpoint's "
                           "directory")
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt*")):
            raise LcdError(f"{model_dir}: only pickle weights found; lcdfast loads safetensors only")
        raise LcdError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise LcdError(f"{path}: shard listed in the index is missing")
        try:
            handle = safe_open(str(path), framework="pt")
            for key in handle.keys():
                if key in tensors:
                    raise LcdError(f"{path}: tensor '{key}' is also in {tensors[key][0].name}")
                tensors[key] = (path, handle)
        except (SafetensorError, OSError) as e:
            raise LcdError(f"{path}: unreadable safetensors file ({e})") from None
    return tensors


def finite(t: Tensor) -> bool:
    """No NaN or infinity in `t`, in one pass: min and max propagate NaN (on CPU 40x faster than isfinite().all())."""
    return all(map(math.isfinite, torch.aminmax(t)))


def part_shapes(cfg: ModelConfig, want: torch.Size, n: int, layout: str) -> list[tuple[int, ...]]:
    """The stored shape of each of the `n` checkpoint tensors that make up one of ours of shape `want`: q, k, v or
    gate, up stacked along dim 0; a GPT-2 Conv1D weight transposed."""
    if layout == "conv1d":
        return [tuple(want)[::-1]]
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {1: [want[0]], 2: [cfg.hidden_dim] * 2, 3: [q, kv, kv]}[n]
    return [(r, *want[1:]) for r in rows]


def stored_as_ours(cfg: ModelConfig, tensor: Tensor, layout: str) -> Tensor:
    """A checkpoint tensor (its parts concatenated) in our layout: a Conv1D weight transposed; GPT-NeoX's fused
    QKV rows, head by head [H * (q, k, v) * D, ...], as all q rows, all k, all v."""
    if layout == "conv1d":
        return tensor.t().contiguous()
    if layout == "per_head_qkv":
        return tensor.view(cfg.n_heads, 3, cfg.head_dim, -1).transpose(0, 1).reshape(tensor.shape)
    return tensor.contiguous()


def read_tensor(tensors: dict, key: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """One checkpoint tensor as `dtype` on `device`: its header's shape checked before it is read, then its dtype,
    then its values (a NaN or infinity in a weight would decode garbage with exit code 0)."""
    path, handle = tensors[key]
    try:
        stored = tuple(handle.get_slice(key).get_shape())
        if stored != shape:
            raise LcdError(f"{path}: tensor '{key}' has shape {stored}, expected {shape} from config.json")
        tensor = handle.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise LcdError(f"{path}: cannot read tensor '{key}' ({e})") from None
    if not tensor.is_floating_point():
        raise LcdError(f"{path}: tensor '{key}' has dtype {tensor.dtype}, expected floating point")
    out = tensor.to(device=device, dtype=dtype)
    if not finite(out):
        why = "holds NaN or infinite values" if not finite(tensor) else f"overflows {dtype}"
        raise LcdError(f"{path}: tensor '{key}' {why}")
    return out


CODES = "quantized.safetensors"  # quantized weights in our names ('<linear>.q', '.scale', '.low'; other tensors too)
CODES_NOTE = "quantized.json"  # {"format": CODES_FORMAT, "mode": "int4:32" | ... | "gguf", "source": ...}
CODES_FORMAT = "lcdfast-quantized/1"


def read_codes(model_dir: Path) -> tuple[str, dict[str, tuple[Path, object]]] | None:
    """A checkpoint's quantized weights (written by `lcdfast quantize` or, GGUF blocks, by convert): their mode and
    tensors (name -> (file, handle)); None if it has none."""
    note_path, path = model_dir / CODES_NOTE, model_dir / CODES
    if not note_path.is_file():
        return None
    note = read_json(note_path)
    mode = note.get("mode")
    if note.get("format") != CODES_FORMAT or not isinstance(mode, str):
        raise LcdError(f"{note_path}: not a {CODES_FORMAT} note with a 'mode'")
    if mode != "gguf":
        quant.parse_mode(mode, f"{note_path}: mode")
    if not path.is_file():
        raise LcdError(f"{path}: missing ({note_path} says the quantized weights are there)")
    try:
        handle = safe_open(str(path), framework="pt")
        return mode, {key: (path, handle) for key in handle.keys()}
    except (SafetensorError, OSError) as e:
        raise LcdError(f"{path}: unreadable safetensors file ({e})") from None


def read_codes_weight(codes: dict, name: str, shape: tuple[int, int], device) -> quant.QuantWeight:
    """The codes, scales and minimums of linear `name` (ours, e.g. 'layers.0.attention.wqkv') for a float weight
    of `shape` [N, K], each checked against the layout (quant.py) before use."""
    N, K = shape
    path, handle = codes[name + ".q"]

    def get(key: str) -> Tensor:
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise LcdError(f"{path}: cannot read tensor '{key}' ({e})") from None

    q, scale = get(name + ".q"), get(name + ".scale") if name + ".scale" in codes else None
    four = q.dtype == torch.uint8
    low = get(name + ".low") if name + ".low" in codes else None
    problem = None
    if q.dtype not in (torch.int8, torch.uint8) or tuple(q.shape) != (N, K // 2 if four else K):
        problem = f"'{name}.q' is {q.dtype} {tuple(q.shape)}, expected int8 {(N, K)} or packed uint8 {(N, K // 2)}"
    elif scale is None or scale.dtype not in (torch.float16, torch.float32) or scale.dim() != 2 \
            or scale.shape[0] != N or not 0 < scale.shape[1] <= K or K % scale.shape[1]:
        problem = f"'{name}.scale' must be float16 or float32 [{N}, K/G] for a group size G dividing {K}"
    elif (K // scale.shape[1]) % quant.CHUNK and (four or scale.shape[1] != 1):
        problem = f"'{name}' has groups of {K // scale.shape[1]} columns, not a multiple of {quant.CHUNK}"
    elif four != (low is not None) or (low is not None and (low.shape, low.dtype) != (scale.shape, scale.dtype)):
        problem = f"'{name}.low' must be there, as '{name}.scale', exactly when '{name}.q' holds 4-bit codes"
    elif not finite(scale) or (low is not None and not finite(low)):
        problem = f"'{name}' has NaN or infinite scales or minimums"
    if problem:
        raise LcdError(f"{path}: {problem}")
    return quant.QuantWeight(q.to(device), scale.to(device), None if low is None else low.to(device))


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> Transformer:
    """Build a Transformer on the meta device and fill it from the checkpoint, strictly: every tensor the config
    implies present with its shape (checked in the header, before anything is built) and finite values.

    `quantize`: '' float weights (a quantized checkpoint's codes dequantized); 'int8', 'int4:64', ...
    (quant.parse_mode) every linear's weight, the head included, quantized as it is read, so no float copy of the
    model is ever whole in memory; the checkpoint's own mode, or 'gguf' for GGUF blocks kept by convert, its codes
    (CODES) as they are; None: the codes if the checkpoint has no float weights, else float."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    seen, dtype = dtype, DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LcdError(f"--dtype: {shown(seen)} unsupported (expected one of {', '.join(DTYPES)})")
    stored = read_codes(model_dir)
    stored_mode = stored[0] if stored else None
    has_float = (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()
    quantize, a8 = quant.split_a8(quantize)
    if quantize is None:
        quantize = stored_mode if stored and not has_float else ""
    if a8 and not quantize:
        raise LcdError(f"quantize: {quant.A8!r} quantizes the activations of quantized weights; give the weights' mode "
                       f"too (e.g. 'int8{quant.A8}', 'gguf{quant.A8}')")
    if quantize == "gguf" and stored_mode != "gguf":
        raise LcdError(f"quantize: 'gguf' needs a checkpoint converted from GGUF by this version of lcdfast (its "
                       f"blocks in {CODES}); {model_dir} has {f'{stored_mode} codes' if stored else 'none'}")
    same = quantize == stored_mode or (stored_mode not in (None, "gguf") and quantize not in ("", "gguf")
                                       and quant.parse_mode(quantize) == quant.parse_mode(stored_mode))
    take_codes = stored is not None and (same or (quantize == "" and not has_float))
    if stored and not has_float and not take_codes:
        raise LcdError(f"quantize: {model_dir} holds {stored_mode} codes, not float weights to quantize as "
                       f"{shown(quantize)}; load it as stored (no --quantize)")
    bits, group = quant.parse_mode(quantize) if quantize and not take_codes else (0, 0)
    codes = stored[1] if take_codes else {}
    tensors = open_safetensors(model_dir) if has_float or not codes else {}
    prefixes = BODY_PREFIXES.get(cfg.family, ("model.", ""))
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in tensors)), "")
    # our parameter name -> (checkpoint keys, layout); the untied head has no prefix
    table = {ours: ([prefix + n for n in names], layout)
             for ours, (names, layout) in NAME_TABLES[cfg.family](cfg).items()}
    head_name = HEAD_NAMES.get(cfg.family, "lm_head.weight")
    if not cfg.tie_embeddings:
        table["output.weight"] = ([head_name], "")
    if cfg.tie_embeddings:  # one storage: the head [V, E] is the embedding table (read first, as before)
        table = {"output.weight" if k == "tok_embeddings.weight" else k: v for k, v in table.items()}
    in_codes = {ours for ours in table if ours in codes or ours.removesuffix("weight") + "q" in codes}
    used = [key for ours, (keys, _) in table.items() if ours not in in_codes for key in keys]
    described = f"config.json describes a {cfg.family} model of {cfg.n_layers} layers"
    missing = [key for key in used if key not in tensors]
    if missing:
        why = "config says tie_word_embeddings=false" if missing[0] == head_name else described
        raise LcdError(f"{model_dir}: missing tensor '{missing[0]}' ({len(missing)} missing: {why})")
    unused = sorted(set(tensors) - {key for keys, _ in table.values() for key in keys} - {head_name})
    unused = [key for key in unused if not key.endswith(IGNORED)]
    consumed = {f"{ours.removesuffix('weight')}{part}" for ours in in_codes for part in ("q", "scale", "low")}
    unused += sorted(set(codes) - in_codes - consumed)
    if unused:
        where = CODES if unused[0] in codes else model_dir
        raise LcdError(f"{model_dir}: unexpected tensor '{unused[0]}' in {where} ({len(unused)} unused: {described})")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    expected.setdefault("tok_embeddings.weight", torch.empty(cfg.vocab_size, cfg.embed_dim, device="meta"))
    linears = model.quantizable()
    state, quantized = {}, {}
    for ours, (keys, layout) in table.items():
        shape = tuple(expected[ours].shape)
        if ours in in_codes and ours in codes:  # a float tensor of a quantized checkpoint, in our names
            weight, tensor = None, read_tensor(codes, ours, shape, dtype, device)
        elif ours in in_codes:
            weight, tensor = read_codes_weight(codes, ours.removesuffix(".weight"), shape, device), None
            if not quantize:
                weight, tensor = None, quant.dequantize(weight, dtype)
        else:
            parts = [read_tensor(tensors, key, part, dtype, device)
                     for key, part in zip(keys, part_shapes(cfg, expected[ours].shape, len(keys), layout))]
            weight, tensor = None, torch.cat(parts) if len(parts) > 1 else parts[0]
            tensor = stored_as_ours(cfg, tensor, layout)
        if weight is None and bits and ours in linears:
            weight = quant.quantize(tensor, bits, group, ours)
        if weight is not None:
            quantized[ours.removesuffix(".weight")] = weight
            state.update({ours.removesuffix("weight") + k: t for k, t in weight._asdict().items()
                          if isinstance(t, Tensor)})
        else:
            state[ours] = tensor
    if torch.device(device).type == "cpu":
        state = in_huge_pages(state)
    for name, weight in quantized.items():  # the module takes the codes (assigned from `state` below)
        parent, _, leaf = name.rpartition(".")
        bias = getattr(model.get_submodule(name), "bias", None)
        setattr(model.get_submodule(parent), leaf, QuantLinear(weight._replace(a8=a8), bias))
    model.load_state_dict(state, strict=True, assign=True)
    model.quantization = stored_mode if take_codes and quantize else quantize if bits else ""
    model.quantization += quant.A8 if a8 and model.quantization else ""
    return model.eval().requires_grad_(False)


def save_codes(out_dir: Path, tensors: dict[str, Tensor], mode: str, source: str) -> None:
    """Write CODES (tensors in our names) and CODES_NOTE into `out_dir`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / CODES), metadata={"format": "pt"})
    note = {"format": CODES_FORMAT, "mode": mode, "source": source}
    (out_dir / CODES_NOTE).write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, mode: str) -> Path:
    """`lcdfast quantize`: a float checkpoint written once as a quantized one: `out_dir` gets its config, tokenizer
    and other small files, and every tensor in CODES (codes for the linears and the head, float for the rest);
    loading it (no `quantize`) reads the codes as they are."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    quant.parse_mode(mode, "--mode")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LcdError(f"{out_dir}: output directory exists and is not empty")
    model = load_model(model_dir, "float32", "cpu", mode)
    weights = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".gguf")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(weights) and f.name not in (CODES_NOTE, "lcdfast-converted.json"):
            shutil.copyfile(f, out_dir / f.name)
    save_codes(out_dir, {k: v.clone() for k, v in model.state_dict().items()}, mode, str(model_dir.resolve()))
    return out_dir


HUGE_PAGE = 2 << 20


def in_huge_pages(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same tensors copied into one anonymous mapping advised for transparent huge pages (Linux).

    Decoding streams every weight once per token; on 4 KB pages those reads miss the TLB 512x as often and
    ran 20-30% slower here until the kernel happened to collapse the pages itself. Without madvise (not
    Linux), the tensors are returned as they are."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return tensors
    sizes = {k: -(-t.numel() * t.element_size() // 64) * 64 for k, t in tensors.items()}  # 64-byte aligned
    arena = mmap.mmap(-1, sum(sizes.values()) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # keeps `arena` alive
    offset = -memory.data_ptr() % HUGE_PAGE
    out = {}
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        out[key] = memory[offset:offset + n].view(t.dtype).view(t.shape).copy_(t)
        offset += sizes[key]
    return out
