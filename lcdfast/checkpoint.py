"""Hugging Face checkpoint directory -> ModelConfig + a loaded Transformer.

One small function per family turns `config.json` into a `ModelConfig`, and one table per family
maps our parameter names onto the checkpoint's tensor names. Tensors are read memory-mapped from
safetensors (never pickles), shape-checked, and assigned into a model built on the meta device.
"""

import json
import mmap
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import LcdError, token_ids, whole
from .model import ModelConfig, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LcdError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LcdError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LcdError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(hf: dict, key: str, path: Path):
    if hf.get(key) is None:
        raise LcdError(f"{path}: missing key '{key}'")
    return hf[key]


def gpt2_config(hf: dict, path: Path) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise LcdError(f"{path}: GPT-2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported")
    if not hf.get("scale_attn_weights", True):
        raise LcdError(f"{path}: GPT-2 option scale_attn_weights=false unsupported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LcdError(f"{path}: activation_function '{act}' unsupported (expected gelu_new)")
    dim = _require(hf, "n_embd", path)
    return ModelConfig(
        family="gpt2", vocab_size=_require(hf, "vocab_size", path), dim=dim, n_layers=_require(hf, "n_layer", path),
        n_heads=_require(hf, "n_head", path), hidden_dim=hf.get("n_inner") or 4 * dim, norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh", gated_mlp=False, attn_bias=True,
        mlp_bias=True, positions="learned", max_positions=hf.get("n_positions", 1024),
        tie_embeddings=hf.get("tie_word_embeddings", True), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(f"{path}: eos_token_id", hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
    )


def opt_config(hf: dict, path: Path) -> ModelConfig:
    act = hf.get("activation_function", "relu")
    if act != "relu":
        raise LcdError(f"{path}: activation_function '{act}' unsupported for OPT (expected relu)")
    dim = _require(hf, "hidden_size", path)
    pre_norm = hf.get("do_layer_norm_before", True)
    if not hf.get("layer_norm_elementwise_affine", True):
        raise LcdError(f"{path}: OPT option layer_norm_elementwise_affine=false unsupported")
    return ModelConfig(
        family="opt", vocab_size=_require(hf, "vocab_size", path), dim=dim,
        n_layers=_require(hf, "num_hidden_layers", path), n_heads=_require(hf, "num_attention_heads", path),
        hidden_dim=_require(hf, "ffn_dim", path), embed_dim=hf.get("word_embed_proj_dim") or dim, norm="layernorm",
        norm_eps=1e-5, pre_norm=pre_norm, final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        activation="relu", gated_mlp=False, attn_bias=hf.get("enable_bias", True),
        mlp_bias=hf.get("enable_bias", True), positions="learned",
        max_positions=hf.get("max_position_embeddings", 2048), position_offset=2,
        tie_embeddings=hf.get("tie_word_embeddings", True), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(f"{path}: eos_token_id", hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
    )


def llama_config(hf: dict, path: Path) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LcdError(f"{path}: hidden_act '{act}' unsupported (expected silu)")
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise LcdError(f"{path}: rope_scaling must be an object, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3", "default"):
            raise LcdError(f"{path}: rope_scaling type '{kind}' unsupported (expected linear or llama3)")
        needed = {"linear": ["factor"], "default": [],
                  "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
        for key in needed[kind]:
            if not isinstance(scaling.get(key), int | float) or scaling[key] <= 0:
                raise LcdError(f"{path}: rope_scaling '{key}' must be a positive number, got {scaling.get(key)!r}")
    # Mistral: a query sees only the last `sliding_window` positions (itself included)
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    return ModelConfig(
        family="llama", vocab_size=_require(hf, "vocab_size", path), dim=_require(hf, "hidden_size", path),
        n_layers=_require(hf, "num_hidden_layers", path), n_heads=_require(hf, "num_attention_heads", path),
        n_kv_heads=hf.get("num_key_value_heads") or 0, head_dim=hf.get("head_dim") or 0,
        hidden_dim=_require(hf, "intermediate_size", path), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="silu", gated_mlp=True, attn_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False), positions="rotary", rope_theta=hf.get("rope_theta", 10000.0),
        rope_scaling=scaling, max_positions=hf.get("max_position_embeddings", 2048), attention_window=window or 0,
        tie_embeddings=hf.get("tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(f"{path}: eos_token_id", hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
    )


FAMILIES = {"gpt2": gpt2_config, "opt": opt_config, "llama": llama_config, "mistral": llama_config}


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise LcdError(f"{model_dir}: model directory not found")
    hf = read_json(path)
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise LcdError(f"{path}: model_type '{family}' unsupported (expected one of {', '.join(FAMILIES)})")
    try:
        cfg = FAMILIES[family](hf, path)
    except (TypeError, ValueError, KeyError) as e:
        raise LcdError(f"{path}: bad value ({e})") from None
    sizes = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "embed_dim",
             "max_positions"]
    for name in sizes:  # the config's names for these are in the family functions above
        whole(f"{path}: model size '{name}'", getattr(cfg, name), 1)
    if cfg.n_heads % cfg.n_kv_heads:
        raise LcdError(f"{path}: {cfg.n_heads} attention heads do not split into {cfg.n_kv_heads} key/value heads")
    whole(f"{path}: sliding_window", cfg.attention_window, 0)
    return cfg


# Per family: our parameter name -> (checkpoint names concatenated along dim 0, stored [in, out]).
# Our Linear weights are [out, in] like nn.Linear's; GPT-2's Conv1D weights are [in, out] and get transposed.
def gpt2_names(cfg: ModelConfig) -> dict[str, tuple[list[str], bool]]:
    names = {"tok_embeddings.weight": (["wte.weight"], False), "pos_embeddings.weight": (["wpe.weight"], False)}
    # GPT-2's head is always tied to wte
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"h.{i}."
        for part in ("weight", "bias"):
            names[ours + f"attention_norm.{part}"] = ([hf + f"ln_1.{part}"], False)
            names[ours + f"ffn_norm.{part}"] = ([hf + f"ln_2.{part}"], False)
            conv1d = part == "weight"
            names[ours + f"attention.wqkv.{part}"] = ([hf + f"attn.c_attn.{part}"], conv1d)
            names[ours + f"attention.wo.{part}"] = ([hf + f"attn.c_proj.{part}"], conv1d)
            names[ours + f"feed_forward.w13.{part}"] = ([hf + f"mlp.c_fc.{part}"], conv1d)
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"mlp.c_proj.{part}"], conv1d)
    names["norm.weight"], names["norm.bias"] = (["ln_f.weight"], False), (["ln_f.bias"], False)
    return names


def opt_names(cfg: ModelConfig) -> dict[str, tuple[list[str], bool]]:
    names = {"tok_embeddings.weight": (["embed_tokens.weight"], False),
             "pos_embeddings.weight": (["embed_positions.weight"], False)}
    if cfg.embed_dim != cfg.dim:
        names["project_in.weight"] = (["project_in.weight"], False)
        names["project_out.weight"] = (["project_out.weight"], False)
    parts = ("weight", "bias")
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        for part in parts:
            names[ours + f"attention_norm.{part}"] = ([hf + f"self_attn_layer_norm.{part}"], False)
            names[ours + f"ffn_norm.{part}"] = ([hf + f"final_layer_norm.{part}"], False)
        for part in parts if cfg.attn_bias else parts[:1]:
            qkv = [hf + f"self_attn.{p}_proj.{part}" for p in "qkv"]
            names[ours + f"attention.wqkv.{part}"] = (qkv, False)
            names[ours + f"attention.wo.{part}"] = ([hf + f"self_attn.out_proj.{part}"], False)
        for part in parts if cfg.mlp_bias else parts[:1]:
            names[ours + f"feed_forward.w13.{part}"] = ([hf + f"fc1.{part}"], False)
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"fc2.{part}"], False)
    if cfg.final_norm:
        names["norm.weight"] = (["final_layer_norm.weight"], False)
        names["norm.bias"] = (["final_layer_norm.bias"], False)
    return names


def llama_names(cfg: ModelConfig) -> dict[str, tuple[list[str], bool]]:
    names = {"tok_embeddings.weight": (["embed_tokens.weight"], False), "norm.weight": (["norm.weight"], False)}
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"layers.{i}."
        names[ours + "attention_norm.weight"] = ([hf + "input_layernorm.weight"], False)
        names[ours + "ffn_norm.weight"] = ([hf + "post_attention_layernorm.weight"], False)
        for part in ("weight", "bias") if cfg.attn_bias else ("weight",):
            qkv = [hf + f"self_attn.{p}_proj.{part}" for p in "qkv"]
            names[ours + f"attention.wqkv.{part}"] = (qkv, False)
            names[ours + f"attention.wo.{part}"] = ([hf + f"self_attn.o_proj.{part}"], False)
        for part in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            gate_up = [hf + f"mlp.gate_proj.{part}", hf + f"mlp.up_proj.{part}"]
            names[ours + f"feed_forward.w13.{part}"] = (gate_up, False)
            names[ours + f"feed_forward.w2.{part}"] = ([hf + f"mlp.down_proj.{part}"], False)
    return names


# Buffers some checkpoints carry that a model recomputes: GPT-2's causal masks, LLaMA's rotary frequencies.
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
NAME_TABLES = {"gpt2": gpt2_names, "opt": opt_names, "llama": llama_names}
BODY_PREFIXES = {"gpt2": ("transformer.", ""), "opt": ("model.decoder.", "decoder.", ""), "llama": ("model.", "")}


def open_safetensors(model_dir: Path) -> dict[str, tuple[Path, object]]:
    """Tensor name -> (file, open safetensors handle), over one file or an index of shards."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LcdError(f"{index_path}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
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
                tensors[key] = (path, handle)
        except (SafetensorError, OSError) as e:
            raise LcdError(f"{path}: unreadable safetensors file ({e})") from None
    return tensors


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> Transformer:
    """Build a Transformer on the meta device and fill it from the checkpoint, strictly."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LcdError(f"--dtype: '{dtype}' unsupported (expected one of {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    tensors = open_safetensors(model_dir)
    prefix = next((p for p in BODY_PREFIXES[cfg.family] if any(k.startswith(p) for k in tensors)), "")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    expected.setdefault("tok_embeddings.weight", torch.empty(cfg.vocab_size, cfg.embed_dim, device="meta"))
    state, used = {}, {"lm_head.weight"}
    for ours, (hf_names, conv1d) in NAME_TABLES[cfg.family](cfg).items():
        parts = []
        for hf_name in hf_names:
            key = prefix + hf_name
            if key not in tensors:
                raise LcdError(f"{model_dir}: missing tensor '{key}'")
            path, handle = tensors[key]
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise LcdError(f"{path}: cannot read tensor '{key}' ({e})") from None
            if not tensor.is_floating_point():
                raise LcdError(f"{path}: tensor '{key}' has dtype {tensor.dtype}, expected floating point")
            parts.append(tensor)
            used.add(key)
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        tensor = tensor.t() if conv1d else tensor
        if tensor.shape != expected[ours].shape:
            seen, want = (tensor.t(), expected[ours].t()) if conv1d else (tensor, expected[ours])
            raise LcdError(f"{model_dir}: tensor '{prefix + hf_names[0]}' has shape {tuple(seen.shape)}, "
                           f"expected {tuple(want.shape)} from config.json")
        state[ours] = tensor.to(device=device, dtype=dtype).contiguous()
    head = "lm_head.weight"
    if cfg.tie_embeddings:  # one storage: the head [V, E] is the embedding table
        weight = state.pop("tok_embeddings.weight")
    elif head not in tensors:
        raise LcdError(f"{model_dir}: missing tensor '{head}' (config says tie_word_embeddings=false)")
    else:
        weight = tensors[head][1].get_tensor(head)
        if weight.shape != (cfg.vocab_size, cfg.embed_dim):
            raise LcdError(f"{model_dir}: tensor '{head}' has shape {tuple(weight.shape)}, "
                           f"expected {(cfg.vocab_size, cfg.embed_dim)}")
    unused = sorted(k for k in tensors if k not in used and not k.endswith(IGNORED))
    if unused:
        raise LcdError(f"{model_dir}: unexpected tensor '{unused[0]}' ({len(unused)} unused: config.json describes "
                       f"a {cfg.family} model of {cfg.n_layers} layers)")
    if not weight.is_floating_point():
        raise LcdError(f"{model_dir}: tensor '{head}' has dtype {weight.dtype}, expected floating point")
    state["output.weight"] = weight.to(device=device, dtype=dtype).contiguous()
    if torch.device(device).type == "cpu":
        state = in_huge_pages(state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


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
