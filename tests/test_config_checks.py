"""Malformed checkpoint directories and exit-heads files: every bad value ends in one LcdError naming the file, key,
value and what is allowed, before anything large is built; never a traceback, a hang or a quiet load of garbage.

`model_config` takes a config.json object in-process and `load_model` a directory; `rewrite_header` edits a
safetensors header in place, so a fuzz test can mutate each layer of a checkpoint one case at a time."""

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, run

import lcdfast
from lcdfast.checkpoint import load_model, model_config, read_config
from lcdfast.errors import LcdError
from lcdfast.heads import load_exit_heads

NAN, INF = math.nan, math.inf
BASE = {  # full config.json objects as transformers writes them (every default spelled out)
    "llama": transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
    "opt": transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                  num_attention_heads=4),
    **{family: config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
       for family, config_class in (("qwen2", transformers.Qwen2Config), ("qwen3", transformers.Qwen3Config))},
    **{family: getattr(transformers, name)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                                           eos_token_id=2)
       for family, name in (("gemma", "GemmaConfig"), ("gemma2", "Gemma2Config"), ("gemma3_text", "Gemma3TextConfig"))},
    "phi3": transformers.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, pad_token_id=0, eos_token_id=2),
    "gpt_neo": transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                         attention_types=[[["global", "local"], 1]], bos_token_id=1, eos_token_id=2),
    "gpt_neox": transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4),
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

BAD_VALUES = [  # (family, key, value, what the message must name)
    *[("llama", "pad_token_id", v, "pad_token_id") for v in (VOCAB, -1, "0", NAN, 1.5, [0])],
    *[("llama", "bos_token_id", v, "bos_token_id") for v in (1.5, True, VOCAB + 7)],
    *[("llama", "eos_token_id", v, "eos_token_id") for v in ([2, 1.5], [-2], "2")],
    *[("llama", "rope_theta", v, "rope_theta") for v in (None, "10000", [1e4], NAN, 0, -1.0, INF, 1e300)],
    *[("llama", "rms_norm_eps", v, "rms_norm_eps") for v in (None, "1e-6", [1e-6], 0, -1e-6, NAN, INF, 1e-300)],
    *[("gpt2", "layer_norm_epsilon", v, "layer_norm_epsilon") for v in (None, "1e-5", [1e-5], 0.0, NAN, INF)],
    *[("llama", key, 2**63, key) for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "max_position_embeddings")],
    ("llama", "num_hidden_layers", 2**31, "num_hidden_layers"), ("gpt2", "n_layer", 2**31, "n_layer"),
    ("opt", "ffn_dim", 2**63, "ffn_dim"), ("opt", "word_embed_proj_dim", 2**40, "word_embed_proj_dim"),
    ("gpt2", "n_positions", 2**63, "n_positions"), ("llama", "num_hidden_layers", 4.0, "num_hidden_layers"),
    ("llama", "model_type", ["llama"], "model_type"), ("llama", "model_type", None, "model_type"),
    *[("llama", "rope_scaling", {"type": "linear", "factor": v}, "rope_scaling.factor")
      for v in (NAN, 1e-300, INF, 0, "2", None, 1e300)],
    ("llama", "rope_scaling", {**LLAMA3, "high_freq_factor": NAN}, "rope_scaling.high_freq_factor"),
    ("llama", "rope_scaling", {**LLAMA3, "low_freq_factor": 4.0}, "low_freq_factor"),
    ("llama", "rope_scaling", {**LLAMA3, "original_max_position_embeddings": 64.5}, "original_max_position"),
    ("llama", "rope_scaling", {"rope_type": ["linear"]}, "rope_scaling type"),
    *[("llama", "tie_word_embeddings", v, "tie_word_embeddings") for v in ("32", 1, "false", None)],
    ("llama", "attention_bias", "false", "attention_bias"), ("llama", "mlp_bias", 0, "mlp_bias"),
    ("gpt2", "scale_attn_weights", "no", "scale_attn_weights"), ("opt", "do_layer_norm_before", "false", "do_layer"),
    ("opt", "enable_bias", 0, "enable_bias"), ("opt", "_remove_final_layer_norm", "yes", "_remove_final_layer_norm"),
    ("gpt2", "activation_function", ["gelu_new"], "activation_function"),
    *[(family, "use_sliding_window", v, "use_sliding_window") for family in ("qwen2", "qwen3") for v in (True, "no")],
    ("qwen3", "attention_bias", "yes", "attention_bias"), ("qwen3", "head_dim", 0, "head_dim"),
    ("qwen2", "hidden_act", "gelu", "hidden_act"), ("qwen3", "num_key_value_heads", 3, "key/value heads"),
    *[("gpt_neox", "rotary_pct", v, "rotary_pct") for v in (0, 0.01, NAN, "0.25", 1.5, None)],
    ("gpt_neox", "use_parallel_residual", "yes", "use_parallel_residual"),
    ("gpt_neox", "hidden_act", "relu", "hidden_act"), ("gpt_neox", "num_attention_heads", 5, "does not split into 5"),
    ("gpt_neox", "rotary_emb_base", 0, "rotary_emb_base"),
    *[("gpt_neo", "attention_types", v, "attention_types")
      for v in ([[["global", "local"], 2]], [[["global", "x"], 1]], 5, [[["local"], 1.5]], [["global"]], [[[], 2**63]])
      ],
    ("gpt_neo", "window_size", 0, "window_size"), ("gpt_neo", "num_heads", 3, "does not split into 3"),
    ("gpt_neo", "activation_function", "relu", "activation_function"),
    ("gemma", "hidden_act", "silu", "hidden_act"), ("gemma2", "hidden_activation", "relu", "hidden_activation"),
    ("gemma2", "hidden_activation", [1], "hidden_activation"),
    *[("gemma2", key, v, key) for key in ("attn_logit_softcapping", "final_logit_softcapping") for v in (0, NAN, "30")],
    ("gemma2", "query_pre_attn_scalar", 0, "query_pre_attn_scalar"), ("gemma2", "sliding_window", 0, "sliding_window"),
    ("gemma3_text", "sliding_window_pattern", 0, "sliding_window_pattern"),
    ("gemma3_text", "rope_local_base_freq", NAN, "rope_local_base_freq"),
    *[("phi3", "partial_rotary_factor", v, "partial_rotary_factor") for v in (0, 0.01, NAN, 2.0)],
    ("phi3", "sliding_window", -1, "sliding_window"),
    ("phi3", "rope_scaling", {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
     "rope_scaling type 'longrope' unsupported"),
]


@pytest.mark.parametrize("family,key,value,needle", BAD_VALUES)
def test_bad_config_values_name_the_key(family, key, value, needle):
    good = BASE[family].to_dict()
    model_config(good)  # the unmutated object passes
    with pytest.raises(LcdError) as e:
        model_config({**good, key: value}, "m/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("m/config.json: ") and needle in msg and len(msg) < 300, msg


def test_good_values_at_the_edges_still_load():
    cfg = model_config({**BASE["llama"].to_dict(), "rope_scaling": LLAMA3, "rms_norm_eps": 1e-12, "rope_theta": 5e8,
                        "tie_word_embeddings": True, "pad_token_id": None, "eos_token_id": [2, VOCAB - 1]})
    assert cfg.rope_theta == 5e8 and cfg.norm_eps == 1e-12 and cfg.eos_token_ids == [2, VOCAB - 1]
    assert model_config({**BASE["gpt2"].to_dict(), "n_inner": None}).hidden_dim == 4 * 64
    mistral = {**BASE["llama"].to_dict(), "model_type": "mistral", "sliding_window": None}
    assert model_config(mistral).attention_window == 0


def checkpoint(tiny_dir, tmp_path: Path, kind: str = "llama-tied-gqa") -> Path:
    """A fresh copy of a tiny checkpoint to damage."""
    out = tmp_path / kind
    shutil.copytree(tiny_dir(kind)[0], out)
    return out


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit(header)` to a safetensors file's JSON header in place; the tensor bytes stay as they are."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + n:])


def load_error(model_dir: Path, dtype: str = "float32") -> str:
    with pytest.raises(LcdError) as e:
        load_model(model_dir, dtype)
    assert "\n" not in str(e.value), e.value
    return str(e.value)


def test_json_python_cannot_parse(tiny_dir, tmp_path):
    model = checkpoint(tiny_dir, tmp_path)
    text = (model / "config.json").read_text()
    for bad in (text.replace('"vocab_size": 320', '"vocab_size": ' + "9" * 5001), "[" * 100_000, b"{\"a\": \"\xff\"}"):
        (model / "config.json").write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(LcdError, match="config.json: not valid JSON"):
            read_config(model)


def test_pad_outside_the_vocabulary_with_two_prompts(tiny_dir, tmp_path, capsys):
    model = checkpoint(tiny_dir, tmp_path)
    for pad in (VOCAB + 5, -1, "0", NAN):
        edit_config(model, pad_token_id=pad)
        code, _, err = run(capsys, "generate", "--model", model, "a", "bb cc dd", "--max-new-tokens", "2")
        assert_one_line_error(code, err, "config.json", "pad_token_id", f"0..{VOCAB - 1}")


def test_huge_sizes_refused_before_anything_is_built(tiny_dir, tmp_path):
    """Sizes past the limits never reach the model; sizes within them that the weights lack are found in the
    header (no tensor is read, no model of those sizes built)."""
    model = checkpoint(tiny_dir, tmp_path)
    start = time.perf_counter()
    edit_config(model, num_hidden_layers=2**31)
    assert "num_hidden_layers" in load_error(model) and "1..1024" in load_error(model)
    edit_config(model, num_hidden_layers=1000)
    assert "missing tensor 'model.layers.4." in load_error(model)
    edit_config(model, num_hidden_layers=4, vocab_size=1 << 22, hidden_size=1 << 18, intermediate_size=1 << 20)
    msg = load_error(model)
    assert "model.embed_tokens.weight" in msg and "(4194304, 262144)" in msg, msg
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("kind,key", [("llama-tied-gqa", "model.layers.0.self_attn.k_proj.weight"),
                                      ("llama-tied-gqa", "model.embed_tokens.weight"),
                                      ("gpt2", "transformer.h.1.attn.c_attn.weight")])
def test_flattened_shape_in_the_header(kind, key, tiny_dir, tmp_path):
    model = checkpoint(tiny_dir, tmp_path, kind)
    shape = {}

    def flatten(header):
        shape["was"] = tuple(header[key]["shape"])
        header[key]["shape"] = [math.prod(shape["was"])]

    rewrite_header(model / "model.safetensors", flatten)
    msg = load_error(model)
    assert f"'{key}'" in msg and f"({math.prod(shape['was'])},)" in msg and f"expected {shape['was']}" in msg, msg


def test_offsets_near_2_64_in_the_header(tiny_dir, tmp_path):
    model = checkpoint(tiny_dir, tmp_path)
    for begin, end in ((2**64 - 8, 2**64 - 1), (0, 2**64 - 1), (2**63, 2**63 + 256)):
        rewrite_header(model / "model.safetensors",
                       lambda h, b=begin, e=end: h["model.norm.weight"].update(data_offsets=[b, e]))
        assert "model.safetensors" in load_error(model)


@pytest.mark.parametrize("kind,key,value", [("llama-tied-gqa", "model.norm.weight", NAN),
                                            ("llama-tied-gqa", "model.layers.1.self_attn.v_proj.weight", INF),
                                            ("llama-untied", "lm_head.weight", -INF),
                                            ("gpt2", "transformer.h.0.mlp.c_fc.bias", NAN)])
def test_nan_or_infinite_weights(kind, key, value, tiny_dir, tmp_path):
    model = checkpoint(tiny_dir, tmp_path, kind)
    tensors = load_file(str(model / "model.safetensors"))
    tensors[key].view(-1)[3] = value
    save_file(tensors, str(model / "model.safetensors"))
    msg = load_error(model)
    assert f"'{key}'" in msg and "NaN or infinite" in msg, msg


def test_weight_that_overflows_half_precision(tiny_dir, tmp_path):
    model = checkpoint(tiny_dir, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e6
    save_file(tensors, str(model / "model.safetensors"))
    assert load_model(model).norm.weight[0].item() == 1e6
    assert "'model.norm.weight' overflows torch.float16" in load_error(model, "float16")


def test_finite_weights_whose_logits_overflow(tiny_dir, tmp_path, capsys):
    """Weights that load (finite) but overflow float32 in the forward pass: generation, the layers' logits and scores
    end in an LcdError instead of decoding from NaN (argmax picks NaN's index: silent garbage with exit code 0)."""
    model = checkpoint(tiny_dir, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"][:] = 3e38
    save_file(tensors, str(model / "model.safetensors"))
    engine = lcdfast.load(model, compile=False)
    for method in ("greedy", "acd", "dola"):
        with pytest.raises(LcdError, match=r"^generate: the model's scores for prompt \d are NaN or infinite at new "
                                           r"token 0 \(weights that overflow torch.float32\?\)$"):
            engine.generate(["a", "bb cc"], max_new_tokens=2, method=method)
    with pytest.raises(LcdError, match="^layer_logits: the model's logits are NaN or infinite"):
        engine.layer_logits([1, 5, 7])
    with pytest.raises(LcdError, match="^score: the model's acd log-likelihoods are NaN or infinite"):
        engine.score(["a b"], [" c"], method="acd")
    code, _, err = run(capsys, "generate", "--model", model, "a", "--max-new-tokens", "2", "--no-compile")
    assert_one_line_error(code, err, "are NaN or infinite")


def test_exit_heads_whose_logits_overflow(tiny_dir, tmp_path):
    """A trained head that loads (finite) but whose logits overflow: ACD's generation, and its score of a token the
    amateur takes part in (the expert's top one), end in an LcdError."""
    engine = lcdfast.load(tiny_dir("llama-tied-gqa")[0], compile=False)
    top = engine.tokenizer.decode(engine.generate("a b", max_new_tokens=1)[0].token_ids)
    head = torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(0)).sign() * 3e38
    engine.set_exit_heads(save(tmp_path / "h.safetensors", {"lm_head_1.weight": head}))
    assert math.isfinite(engine.score(["a b"], [top], method="greedy")[0])
    with pytest.raises(LcdError, match="^score: the model's acd log-likelihoods are NaN or infinite"):
        engine.score(["a b"], [top], method="acd", amateur_layer=1)
    with pytest.raises(LcdError, match="^generate: the model's scores for prompt 0 are NaN or infinite"):
        engine.generate("a b", max_new_tokens=2, method="acd", amateur_layer=1)


def test_exit_heads_nan_or_not_floating_point(tiny_dir, tmp_path):
    path, _ = tiny_dir("llama-tied-gqa")
    model = load_model(path)
    V, C = VOCAB, model.config.dim
    good = torch.randn(V, C)
    cases = {"model.lm_head_2.weight": [good.clone().index_fill_(0, torch.tensor([5]), NAN),
                                        good.clone().index_fill_(1, torch.tensor([0]), INF),
                                        good.to(torch.int32), good > 0, torch.full((V, C), 1e6)],
             "lens.1.bias": [torch.full((C,), INF), torch.zeros(C, dtype=torch.int64)]}
    load_exit_heads(save(tmp_path / "ok.safetensors", {"model.lm_head_2.weight": good}), model)  # the paper's layout
    for key, tensors in cases.items():
        for i, tensor in enumerate(tensors):
            extra = {"lens.1.weight": torch.eye(C)} if key.startswith("lens") else {}
            file = save(tmp_path / f"bad{i}.safetensors", {key: tensor, **extra})
            if tensor.dtype == torch.float32 and tensor.max() == 1e6:  # finite, in range: accepted
                load_exit_heads(file, model)
                continue
            with pytest.raises(LcdError) as e:
                load_exit_heads(file, model)
            msg = str(e.value)
            assert f"'{key}'" in msg and ("NaN or infinite" in msg or "expected floating point" in msg), msg
    half = load_model(path, "float16")
    with pytest.raises(LcdError, match="NaN or infinite values \\(as torch.float16\\)"):
        load_exit_heads(tmp_path / "bad4.safetensors", half)


def save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_exit_heads_metadata_of_the_wrong_shape(tiny_dir, tmp_path):
    """A damaged fingerprint refuses the file as another model's; damaged statistics give no automatic layer."""
    model = load_model(tiny_dir("llama-tied-gqa")[0])
    head = {"lm_head_2.weight": torch.randn(VOCAB, model.config.dim)}
    for norms in ("5", '{"a": 1}', '["x"]', "9" * 5001, "[" * 100_000):
        file = save(tmp_path / "h.safetensors", head, {"config_sha256": "0", "head_norms": norms})
        with pytest.raises(LcdError, match="fitted on another model"):
            load_exit_heads(file, model)
    for stats in ("[1]", '{"2": 5}', '{"x": {"top1": 1}}', '{"2": {"top1": "a"}, "4": {"top1": 1}}', "[" * 100_000):
        heads = load_exit_heads(save(tmp_path / "h.safetensors", head, {"layer_stats": stats}), model)
        assert heads.auto_layer(model.config.n_layers) is None


def test_defaults_as_transformers_reads_them():
    qwen3 = {k: v for k, v in BASE["qwen3"].to_dict().items() if k != "head_dim"}
    assert model_config(qwen3).head_dim == 128  # Qwen3Config's default, not hidden_size / heads
    gemma3 = {**BASE["gemma3_text"].to_dict(), "attn_logit_softcapping": 1.0, "final_logit_softcapping": 5.0}
    cfg = model_config(gemma3)
    assert (cfg.attn_softcap, cfg.final_softcap) == (0.0, 5.0)  # Gemma 3 never caps attention in transformers
    assert model_config({**BASE["gemma2"].to_dict(), "attn_logit_softcapping": 1.0}).attn_softcap == 1.0
