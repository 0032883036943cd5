"""lcdfast fuzz: seeded mutations of the files a model is loaded from, each case run through the public API in a
worker process. Every case must end in finite output or one clean LcdError line.

Corpora: `gguf-meta` (a tiny LLaMA GGUF with F32/F16/Q8_0 tensors and a BPE vocabulary, written with the `gguf`
package with one metadata value or tensor changed), `gguf-bytes` (that file with a header field, bytes or its length
damaged), `safetensors` (a tiny transformers LLaMA, GPT-2 or OPT checkpoint, its header or one tensor changed),
`config` (config.json values), `tokenizer` (tokenizer_config, generation_config, tokenizer.json, chat_template.jinja),
`heads` (an exit-heads file) and `codes` (a quantized checkpoint from `lcdfast quantize`: LLaMA int4, GPT-2 int8:32,
OPT int8; its quantized.safetensors or quantized.json changed). The worker converts the GGUF, loads the model
(lcdfast.load), reads every layer's logits, generates three tokens greedy and with ACD for two prompts (padding too),
scores a continuation with ACD and, if there is a chat template, generates from it.

Outcomes: ok, error (one LcdError line) and the bad ones: traceback (any other exception, or an empty or
multi-line message), garbage (non-finite logits or scores, a token outside the vocabulary), hang (past --timeout;
the worker is killed and a fresh one started), memory (MemoryError within the worker's address-space limit, or
killed), crash (the worker died otherwise), wrote (an error that left files behind, or a load that changed files).

    python bench/fuzz.py [--cases 10000] [--seed 0] [--timeout 20] [--report fuzz.json] [--case I]

Exit status 1 if any case is bad; --case I replays case I of the seed and prints what happened.
"""

import argparse
import json
import math
import os
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

BAD = ("traceback", "garbage", "hang", "memory", "crash", "wrote")
CORPORA = {"gguf-meta": 20, "gguf-bytes": 20, "safetensors": 20, "config": 25, "tokenizer": 8, "heads": 7,
           "codes": 10, "sharded": 7, "sentencepiece": 5}
MEMORY = 4 << 30  # the worker's address space
PROMPTS = ["The quick brown fox", "Layers improve gradually, layer by layer."]
TEXT = ("The quick brown fox jumps over the lazy dog. Layers improve gradually, layer by layer. Contrastive "
        "decoding scores tokens by how much the expert improves on the amateur. 0123456789 ")
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")
NAN, INF, HUGE = math.nan, math.inf, "\x00huge"  # HUGE: written as a 5001-digit integer
JSON_VALUES = [None, True, False, 0, 1, -1, 2, 0.5, 1.5, -1e-6, 1e-300, 1e300, NAN, INF, -INF, 2**31 - 1, 2**31,
               2**32, 2**63, 2**64, -2**63, HUGE, "", "32", "llama", "\ud800", [], [1], [None], {}, {"a": 1}]
TEMPLATES = ["{% if %}", "{{ 1 / 0 }}", "{% for i in range(10**9) %}x{% endfor %}", "{{ 'x' * 10**9 }}",
             "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "", 5, {"a": 1},
             "{% if false %}x{% endif %}", "{{ raise_exception('no') }}", "{{ messages[5].content }}", "x" * 2**21,
             "{{ 7 ** 10**9 }}", "{{ bos_token }}{{ messages[0]['content'] }}", "\ud800{{ messages[0].content }}",
             [{"name": "default"}], [{"name": "x", "template": "T"}], [{"name": "default", "template": "D"}]]
INTS = [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 33, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
        2**63 - 1, 2**63, 2**64 - 1, 0x7FC00000, 0x7F800000, 0xFF800000]  # header field values; NaN, inf as f32


# ---- seeds ------------------------------------------------------------------------------------------------------

def tiny_tokenizer():
    """A byte-level BPE of 300 tokens (<pad>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


def gguf_spec(tok) -> tuple[dict, dict]:
    """A valid 2-layer LLaMA (E=32, 2 heads of 16, 1 KV head, F=64): metadata key -> (value, type[, item type]),
    tensor name -> (float32 array, GGML type)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as T

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    u32 = lambda v: (v, T.UINT32)
    kv = {"general.architecture": ("llama", T.STRING), "llama.block_count": u32(2), "llama.context_length": u32(64),
          "llama.embedding_length": u32(32), "llama.feed_forward_length": u32(64),
          "llama.attention.head_count": u32(2), "llama.attention.head_count_kv": u32(1),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32), "llama.rope.freq_base": (1e4, T.FLOAT32),
          "tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.pre": ("smollm", T.STRING),
          "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING), "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
          "tokenizer.ggml.token_type": ([3 if i < 3 else 1 for i in range(len(tokens))], T.ARRAY, T.INT32),
          "tokenizer.ggml.bos_token_id": u32(1), "tokenizer.ggml.eos_token_id": u32(2),
          "tokenizer.ggml.padding_token_id": u32(0), "tokenizer.ggml.add_bos_token": (True, T.BOOL),
          "tokenizer.chat_template": (TEMPLATE, T.STRING)}
    rng = np.random.default_rng(0)
    layer = {"attn_norm": ((32,), Q.F32), "ffn_norm": ((32,), Q.F32), "attn_q": ((32, 32), Q.F16),
             "attn_k": ((16, 32), Q.Q8_0), "attn_v": ((16, 32), Q.F32), "attn_output": ((32, 32), Q.F16),
             "ffn_gate": ((64, 32), Q.Q8_0), "ffn_up": ((64, 32), Q.F16), "ffn_down": ((32, 64), Q.Q8_0)}
    shapes = {"token_embd.weight": ((len(tokens), 32), Q.Q8_0), "output_norm.weight": ((32,), Q.F32),
              **{f"blk.{i}.{k}.weight": s for i in range(2) for k, s in layer.items()}}
    tensors = {name: ((rng.standard_normal(shape) * (0.3 if len(shape) == 2 else 0.05) + (len(shape) == 1))
                      .astype(np.float32), q) for name, (shape, q) in shapes.items()}
    return kv, tensors


def write_gguf(path: Path, kv: dict, tensors: dict) -> Path:
    """A GGUF file of `kv` and `tensors` (gguf_spec's form; a None value leaves the entry out)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    numpy_types = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                   Q.I32: np.int32, Q.I64: np.int64}
    w = GGUFWriter(str(path), arch="llama")
    w.kv_data[0].clear()  # general.architecture comes from `kv` (or not at all)
    for key, spec in kv.items():
        if spec is not None:
            w.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    for name, spec in tensors.items():
        if spec is not None:
            t, q = spec
            with np.errstate(all="ignore"):  # NaN and 3e38 cast
                w.add_tensor(name, t.astype(numpy_types[q]) if q in numpy_types else quantize(t, q),
                             raw_dtype=None if q in numpy_types else q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_seeds(root: Path) -> dict:
    """The valid inputs every case starts from: a GGUF spec and file, transformers checkpoints (an untied LLaMA with
    grouped KV heads and llama3 rope scaling, GPT-2, OPT with a projection) and lens and head files for the LLaMA."""
    import logging

    import torch
    import transformers

    from lcdfast.checkpoint import load_model, quantize_checkpoint
    from lcdfast.heads import save_exit_heads

    logging.getLogger("gguf").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    kv, tensors = gguf_spec(tok)
    V, ids = tok.get_vocab_size(), dict(bos_token_id=1, eos_token_id=2)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    configs = {
        "llama": transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                          tie_word_embeddings=False, rope_scaling=llama3, pad_token_id=0, **ids),
        "gpt2": transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids),
        "opt": transformers.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                      pad_token_id=0, **ids),
        "gemma2": transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            max_position_embeddings=64, sliding_window=4, pad_token_id=0, **ids),
        "gpt_neox": transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, max_position_embeddings=64, rotary_pct=0.5,
                                               **ids)}
    torch.manual_seed(0)
    dirs = {name: root / name for name in configs}
    for name, cfg in configs.items():
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(dirs[name], safe_serialization=True)
        tok.save(str(dirs[name] / "tokenizer.json"))
        (dirs[name] / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
            "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    sharded = root / "llama-sharded"  # the LLaMA in three shards and an index
    transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"]).save_pretrained(
        sharded, safe_serialization=True, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dirs["llama"] / name, sharded / name)
    sp = root / "llama-sentencepiece"  # the LLaMA with a sentencepiece tokenizer.model of the same 300 tokens
    shutil.copytree(dirs["llama"], sp)
    (sp / "tokenizer.json").unlink()
    (sp / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": TEMPLATE}))
    train_sentencepiece(sp, V)
    model = load_model(dirs["llama"])
    E = model.config.dim
    heads = {"lens": {"lens.1.weight": torch.eye(E), "lens.1.bias": torch.zeros(E)},
             "heads": {"lm_head_1.weight": torch.randn(V, E) * 0.02}}
    codes = {name: quantize_checkpoint(dirs[name], root / f"{name}-{mode}", mode)
             for name, mode in (("llama", "int4"), ("gpt2", "int8:32"), ("opt", "int8"))}
    return {"kv": kv, "tensors": tensors, "gguf": write_gguf(root / "model.gguf", kv, tensors), "dirs": dirs,
            "codes": codes, "sharded": sharded, "sentencepiece": sp,
            "heads": [save_exit_heads(root / f"{kind}.safetensors", model, kind, t, {}) for kind, t in heads.items()]}


def train_sentencepiece(model_dir: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    corpus = model_dir / "corpus.txt"
    corpus.write_text((TEXT + "\n") * 40)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(model_dir / "tokenizer"), minloglevel=2,
                                   vocab_size=vocab_size, model_type="bpe", hard_vocab_limit=False)
    for name in ("corpus.txt", "tokenizer.vocab"):
        (model_dir / name).unlink()


# ---- mutations: each writes one case and says what it changed ---------------------------------------------------

def dump(value) -> bytes:
    return json.dumps(value).replace(json.dumps(HUGE), "9" * 5001).encode()


def near(value) -> list:
    """Values next to a valid number: off by one, doubled, halved, zero."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [value]
    return [value + 1, value - 1, value * 2, value // 2 if isinstance(value, int) else value / 2, 0]


def mutate_gguf_meta(rng: random.Random, seeds: dict, case_dir: Path) -> str:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as T

    kv, tensors = dict(seeds["kv"]), dict(seeds["tensors"])
    values = [(0, T.UINT32), (1, T.UINT32), (2**32 - 1, T.UINT32), (-1, T.INT32), (2**63, T.UINT64),
              (2**64 - 1, T.UINT64), (-2**63, T.INT64), (300, T.UINT16), (1, T.UINT8), (-1, T.INT8), (0.0, T.FLOAT32),
              (1.5, T.FLOAT32), (NAN, T.FLOAT32), (INF, T.FLOAT32), (-INF, T.FLOAT32), (1e-300, T.FLOAT64),
              (1e300, T.FLOAT64), (-1e-6, T.FLOAT32), (True, T.BOOL), (False, T.BOOL), ("", T.STRING),
              ("llama", T.STRING), ("linear", T.STRING), (b"\xff\xfe", T.STRING), ("x" * 5000, T.STRING),
              ([2], T.ARRAY, T.UINT32), ([0, 0], T.ARRAY, T.INT8), (["a"], T.ARRAY, T.STRING),
              ([b"\xc3"], T.ARRAY, T.STRING), ([1.5, NAN], T.ARRAY, T.FLOAT32)]  # (no empty array: gguf can't)
    keys = sorted(kv) + ["llama.attention.key_length", "llama.rope.dimension_count", "llama.rope.scaling.type",
                         "llama.rope.scaling.factor", "tokenizer.ggml.unknown_token_id", "general.alignment",
                         "tokenizer.ggml.add_eos_token", "llama.expert_count"]
    op = rng.choice(["value", "value", "near", "drop", "item", "tensor type", "tensor value", "tensor shape",
                     "tensor drop", "tensor extra"])
    key, name = rng.choice(keys), rng.choice(sorted(tensors))
    t, q = tensors[name]
    if op == "near" and key in kv and kv[key][1] in (T.UINT32, T.FLOAT32):
        value = rng.choice(near(kv[key][0]))
        kv[key], what = (value, kv[key][1] if value >= 0 else T.INT32 if kv[key][1] == T.UINT32 else T.FLOAT32), value
    elif op in ("value", "near"):
        kv[key] = rng.choice(values)
        what = f"{kv[key][0]!r:.40} ({kv[key][1].name})"
    elif op == "drop":
        kv[key], what = None, "left out"
    elif op == "item":
        key = rng.choice(["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"])
        items, i, what = list(kv[key][0]), rng.randrange(len(kv[key][0])), rng.choice(["del", "dup", "set", "cut"])
        if what == "del":
            del items[i]
        elif what == "dup":
            items.insert(i, items[i])
        elif what == "set":
            items[i] = rng.choice(["", "a", "a b", "zz zz", b"\xff", "<s>"] if kv[key][2] == T.STRING else
                                  [-1, 3, 4, 5, 6, 99, 2**31 - 1])
        kv[key], what = (items[:rng.choice([1, i + 1])] if what == "cut" else items, *kv[key][1:]), f"{what} item {i}"
    elif op == "tensor type":
        key, q = name, rng.choice([Q.F32, Q.F16, Q.BF16, Q.F64, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4,
                                   Q.I8, Q.I16, Q.I32, Q.I64])
        tensors[name], what = (t, q), f"as {q.name}"
    elif op == "tensor value":
        t, value = t.copy(), rng.choice([NAN, INF, -INF, 3e38, 1e30, -1e30, 6e4, 0.0])
        t.reshape(-1)[rng.randrange(t.size)] = value
        key, tensors[name] = name, (t, Q.F32 if rng.random() < 0.5 else q)
        what = f"one value {value} ({tensors[name][1].name})"
    elif op == "tensor shape":
        t = rng.choice([t.reshape(-1), t.T, t[:-1], np.concatenate([t, t]), t[None]])
        key, tensors[name], what = name, (np.ascontiguousarray(t), Q.F32), f"shape {t.shape}"
    elif op == "tensor drop":
        key, tensors[name], what = name, None, "left out"
    else:
        key = rng.choice(["blk.0.attn_q.bias", "rope_freqs.weight", "blk.2.attn_norm.weight", "output.weight",
                          "blk.9999999999.ffn_up.weight", "blk.0.attn_norm.bias", "token_embd.bias"])
        shape = rng.choice([(32,), (8,), (len(seeds["kv"]["tokenizer.ggml.tokens"][0]), 32), (32, 32)])
        tensors[key], what = (np.full(shape, 0.01, np.float32), Q.F32), f"added {shape}"
    write_gguf(case_dir / "model.gguf", kv, tensors)
    return f"{key}: {what}"


def gguf_fields(buf: bytes) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """A valid little-endian GGUF's header fields, label -> [(offset, width)], and where its tensor data starts."""
    sizes, fields, pos = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}, {}, 4

    def take(width: int, label: str) -> int:
        nonlocal pos
        fields.setdefault(label, []).append((pos, width))
        pos += width
        return int.from_bytes(buf[pos - width:pos], "little")

    def string(label: str) -> str:
        nonlocal pos
        n = take(8, label + " length")
        pos += n
        return buf[pos - n:pos].decode()

    take(4, "version")
    n_tensors, n_kv = take(8, "tensor count"), take(8, "key count")
    for _ in range(n_kv):
        key = string("key")
        vtype, count = take(4, f"{key} type"), 1
        if vtype == 9:
            vtype, count = take(4, f"{key} item type"), take(8, f"{key} count")
        for _ in range(count):
            string(key) if vtype == 8 else take(sizes[vtype], key)
    for _ in range(n_tensors):
        name = string("tensor name")
        for _ in range(take(4, f"{name} n_dims")):
            take(8, f"{name} dim")
        take(4, f"{name} type")
        take(8, f"{name} offset")
    return fields, -(-pos // 32) * 32


def mutate_gguf_bytes(rng: random.Random, seeds: dict, case_dir: Path) -> str:
    buf = bytearray(seeds["gguf"].read_bytes())
    fields, data = gguf_fields(bytes(buf))
    op, pos, n = rng.choice(["field"] * 4 + ["flip", "overwrite", "cut", "insert", "delete", "data"]), 0, 0
    if op == "field":
        label = rng.choice(sorted(fields))
        pos, n = rng.choice(fields[label])
        old = int.from_bytes(buf[pos:pos + n], "little")
        value = rng.choice(INTS + [old + 1, old - 1, old * 2, old // 2, rng.getrandbits(64)]) % (1 << 8 * n)
        buf[pos:pos + n] = value.to_bytes(n, "little")
        op = f"{label} = {value}"
    elif op == "flip":
        for pos in [rng.randrange(data) for _ in range(rng.randint(1, 8))]:
            buf[pos] ^= 1 << rng.randrange(8)
    elif op == "cut":
        del buf[rng.choice([rng.randrange(data), rng.randrange(len(buf)), len(buf) - 1]):]
    else:
        pos, n = rng.randrange(8, data) if op != "data" else rng.randrange(data, len(buf)), rng.randint(1, 64)
        fill = rng.choice([b"\x00", b"\xff", b"\x7f", bytes([rng.getrandbits(8)])]) * n
        buf[pos:pos + (0 if op == "insert" else n)] = b"" if op == "delete" else fill
    (case_dir / "model.gguf").write_bytes(bytes(buf))
    return f"{op} at byte {pos} ({n} bytes), {len(buf)} bytes in all"


def mutate_safetensors(rng: random.Random, path: Path) -> str:
    """One change to a safetensors file: its header (which then may not fit the bytes) or one tensor re-encoded."""
    import torch
    from safetensors.torch import load_file, save_file

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    key = rng.choice(names)
    info, shape, (begin, end) = header[key], header[key]["shape"], header[key]["data_offsets"]
    op = rng.choice(["dtype", "shape", "offsets", "offsets", "drop", "rename", "metadata", "length", "raw", "bytes",
                     "encode", "encode", "encode"])
    if op == "dtype":
        info["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2",
                                    "U64", "C64", "XX", 5, None, ""])
    elif op == "shape":
        info["shape"] = rng.choice([[math.prod(shape)], shape[::-1], [*shape, 1], shape[:-1], [], [0, *shape[1:]],
                                    [-1, *shape[1:]], [2**40, *shape[1:]], [2**64 - 1], [1.5], ["3"], [shape],
                                    [math.prod(shape) // 2, 2]])
    elif op == "offsets":
        info["data_offsets"] = rng.choice([[end, begin], [0, 0], [begin, end + 1], [begin, end - 1], [begin, 2**64 - 1],
                                           header[rng.choice(names)]["data_offsets"], [begin, len(body) + 8], [-1, end],
                                           [2**64 - 8, 2**64 - 1], [2**63, 2**63 + end - begin], [begin + 0.5, end],
                                           [begin], [begin, end, end], None])
    elif op == "drop":
        del header[key]
    elif op == "rename":
        header[rng.choice(["lm_head.weight", key + "x", key.replace("0", "7"), "", "\ud800", names[0]])] = \
            header.pop(key)
    elif op == "metadata":
        header["__metadata__"] = rng.choice([[], 5, {"format": 5}, {"a": None}, "pt", {"format": "np"}, None])
    elif op in ("length", "raw"):
        raw = data[8:8 + n] if op == "length" else rng.choice(
            [data[8:8 + n // 2], b"[1]", b"\xff" + data[9:8 + n], b"[" * 100_000, b"{}", data[8:8 + n] + b" " * 7,
             data[8:8 + n].replace(b'"', b"'", 3), b'{"__metadata__": {"format": "pt"}}'])
        length = len(raw) if op == "raw" else rng.choice([n + 1, n - 1, 0, 7, 2**32, 2**64 - 1, len(data), 10**8])
        path.write_bytes(length.to_bytes(8, "little") + raw + body)
        return f"{path.name}: header {op} {length} ({raw[:20]!r})"
    elif op == "bytes":
        pos, size, fill = rng.randrange(len(body)), rng.choice([2, 4, 16, 1024]), rng.choice([b"\xff", b"\x7f", b"\0"])
        path.write_bytes(data[:8 + n + pos] + fill * size + data[8 + n + pos + size:])
        return f"{path.name}: {size} bytes of {fill!r} at data byte {pos}"
    if op != "encode":
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + body)
        return f"{path.name} header: {op} of '{key}' -> {header.get(key, 'gone')!r:.80}"
    tensors, meta = load_file(str(path)), header.get("__metadata__", {"format": "pt"})
    t, what = tensors.pop(key), rng.choice(["dtype", "value", "reshape", "drop", "extra", "rename"])
    if what == "dtype":
        t = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int8,
                             torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]))
    elif what == "value" and not t.is_floating_point():  # codes: any byte is a code, the extremes included
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([0, 1, 127, -128 if t.dtype == torch.int8 else 255])
    elif what == "value":
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([NAN, INF, -INF, 3e38, 1e30, -1e30, 7e4, 0.0])
    elif what == "reshape":
        t = rng.choice([t.reshape(-1), t.t() if t.dim() == 2 else t[None], t[None], t[:-1]]).contiguous()
    elif what == "extra":
        tensors[rng.choice(["lm_head.weight", "extra.weight", key + ".x"])] = t.clone()
    if what != "drop":
        tensors[key if what != "rename" else rng.choice(["lm_head.weight", key + "x", key.replace("0", "7")])] = t
    if "config_sha256" in meta and rng.random() < 0.3:  # an exit-heads file's fingerprint and statistics
        meta[rng.choice(["config_sha256", "head_norms", "layer_stats"])] = rng.choice(["x", "[1]", "9" * 5001, "{"])
    save_file(tensors, str(path), metadata=meta)
    return f"{path.name}: tensor '{key}' {what} ({t.dtype}, {tuple(t.shape)})"


def mutate_json(rng: random.Random, path: Path, keys: list[str], values) -> str:
    """The JSON object in `path` with one, two or three of `keys` set to one of `values(key)` (or deleted), or the
    file itself damaged."""
    obj = json.loads(path.read_text())
    op = rng.choice(["value", "value", "value", "near", "drop", "several", "file"])
    if op == "file":
        raw = rng.choice([b"", b"{", b"[1]", b"null", b"\xff\xfe{}", b"[" * 100_000, dump(obj)[:-3], b'"x"',
                          dump(obj).replace(b"{", b'{"a": 1, "a": ', 1)])
        path.write_bytes(raw)
        return f"{path.name} = {raw[:30]!r}"
    changes = {}
    for _ in range(rng.randint(2, 3) if op == "several" else 1):
        key = rng.choice(keys)
        changes[key] = rng.choice(near(obj.get(key)) if op == "near" else values(key))
    path.write_bytes(dump({k: v for k, v in {**obj, **changes}.items() if not (op == "drop" and k in changes)}))
    return f"{path.name}: " + ", ".join(f"{k} {'dropped' if op == 'drop' else f'= {v!r:.40}'}"
                                        for k, v in changes.items())


def mutate_config(rng: random.Random, model_dir: Path) -> str:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if rng.random() < 0.15:
        cfg["rope_scaling"] = rng.choice(
            [None, 5, "linear", [], {}, {"type": "linear"}, {"rope_type": "yarn", "factor": 2.0},
             *({"type": "linear", "factor": v} for v in JSON_VALUES),
             *({**(cfg.get("rope_scaling") or {}), "rope_type": "llama3", k: v} for v in (0, 1.0, 4.0, NAN, 2**63, "8")
               for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))])
        path.write_bytes(dump(cfg))
        return f"config.json: rope_scaling = {cfg['rope_scaling']!r:.60}"
    keys = sorted({*cfg, "head_dim", "sliding_window", "n_inner", "rope_theta", "rms_norm_eps", "layer_norm_epsilon",
                   "tie_word_embeddings", "pad_token_id"})
    return mutate_json(rng, path, keys, lambda key: JSON_VALUES + ["mistral", "gpt2", "opt", "relu", "gelu_new"])


def mutate_tokenizer(rng: random.Random, model_dir: Path) -> str:
    which = rng.choice(["tokenizer_config.json"] * 2 + ["generation_config.json", "tokenizer.json", "chat_template"])
    if which == "chat_template":
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
        raw = rng.choice([b"\xff{{ x }}", b"{{ messages[0]['content'] }}", b"", b"{% if %}"])
        (model_dir / "chat_template.jinja").write_bytes(raw)
        return f"chat_template.jinja = {raw!r}"
    path = model_dir / which
    if which == "tokenizer.json" and rng.random() < 0.6:
        obj = json.loads(path.read_text())
        vocab, what = obj["model"]["vocab"], rng.choice(["id", "delete", "merges", "added", "type", "empty"])
        token = rng.choice(sorted(vocab))
        if what == "id":
            vocab[token] = rng.choice([-1, 10**6, 2**32, 0, len(vocab)])
        elif what == "delete":
            del vocab[token]
        elif what == "merges":
            obj["model"]["merges"] = rng.choice([[], [["zz", "qq"]], ["a"], [5], obj["model"]["merges"][:1]])
        elif what == "added":
            obj["added_tokens"].append({"id": rng.choice([3, 299, 300, 10**6]), "content": "<x>", "special": True,
                                        "single_word": False, "lstrip": False, "rstrip": False, "normalized": False})
        elif what == "type":
            obj["model"]["type"] = rng.choice(["WordPiece", "Unigram", "WordLevel", "X", 5])
        else:
            obj["model"]["vocab"], obj["model"]["merges"], obj["added_tokens"] = {}, [], []
        path.write_text(json.dumps(obj))
        return f"tokenizer.json: {what} ({token!r})"
    keys = {"tokenizer_config.json": ["bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token",
                                      "add_eos_token", "chat_template", "clean_up_tokenization_spaces",
                                      "added_tokens_decoder"],
            "generation_config.json": ["bos_token_id", "eos_token_id", "pad_token_id"],
            "tokenizer.json": ["model", "added_tokens", "pre_tokenizer", "decoder", "post_processor", "normalizer"]}
    values = JSON_VALUES + ["<s>", "</s>", "<unk>", "nonexistent", {"content": "<s>"}, {"content": 5},
                            {"3": {"content": "<s>"}}, {"x": {"content": "a"}}, 299, 300, [2, 299]]
    return mutate_json(rng, path, keys[which], lambda key: TEMPLATES if key == "chat_template" else values)


def mutate_sharded(rng: random.Random, model_dir: Path) -> str:
    """The index of a sharded checkpoint changed (its weight map's file names, its shape), or one shard."""
    path = model_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    op = rng.choice(["name", "name", "map", "shard", "drop", "json"])
    if op == "shard":
        return mutate_safetensors(rng, model_dir / rng.choice(shards))
    if op == "drop":
        (model_dir / rng.choice(shards)).unlink()
        return "a shard deleted"
    if op == "json":
        return mutate_json(rng, path, ["weight_map", "metadata"], lambda key: JSON_VALUES + [{}, {"x": "y"}])
    if op == "map":
        index["weight_map"] = rng.choice([{}, [], None, 5, "model.safetensors", {k: v for k, v in
                                          list(index["weight_map"].items())[::2]}])
    else:
        key = rng.choice(sorted(index["weight_map"]))
        index["weight_map"][key] = rng.choice(["missing.safetensors", "../llama/model.safetensors", "/etc/passwd",
                                               "", ".", "config.json", "tokenizer.json", 5, None, [shards[0]],
                                               shards[-1], f"./{shards[0]}", "\x00", "a" * 5000])
    path.write_bytes(dump(index))
    return f"index: {op} = {json.dumps(index['weight_map'])[:60] if op == 'map' else key}"


def mutate_sentencepiece(rng: random.Random, model_dir: Path) -> str:
    """tokenizer.model's bytes changed: cut, flipped, spliced with garbage, emptied, or another file in its place."""
    path = model_dir / "tokenizer.model"
    data = bytearray(path.read_bytes())
    op = rng.choice(["cut", "flip", "flip", "splice", "empty", "other"])
    if op == "cut":
        data = data[:rng.randrange(len(data))]
    elif op == "flip":
        for _ in range(rng.choice([1, 2, 8, 64])):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "splice":
        at = rng.randrange(len(data))
        data[at:at] = rng.choice([b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x00" * 64, rng.randbytes(32)])
    elif op == "empty":
        data = bytearray()
    else:
        data = bytearray((model_dir / rng.choice(["config.json", "model.safetensors"])).read_bytes())
    path.write_bytes(bytes(data))
    return f"tokenizer.model: {op} ({len(data)} bytes)"


def make_case(rng: random.Random, seeds: dict, case_dir: Path, corpus: str | None = None) -> tuple[str, str]:
    """Write a case of `corpus` (default: drawn by CORPORA's weights) into case_dir; its corpus and mutation."""
    corpus = corpus or rng.choices(list(CORPORA), weights=list(CORPORA.values()))[0]
    if corpus == "gguf-meta":
        return corpus, mutate_gguf_meta(rng, seeds, case_dir)
    if corpus == "gguf-bytes":
        return corpus, mutate_gguf_bytes(rng, seeds, case_dir)
    model = case_dir / "model"
    if corpus in ("sharded", "sentencepiece"):
        shutil.copytree(seeds[corpus], model)
        return corpus, (mutate_sharded if corpus == "sharded" else mutate_sentencepiece)(rng, model)
    family = "llama" if corpus == "heads" else rng.choice(sorted(seeds["codes" if corpus == "codes" else "dirs"]))
    shutil.copytree(seeds["codes" if corpus == "codes" else "dirs"][family], model)
    if corpus == "codes":
        if rng.random() < 0.8:
            return corpus, f"{family}: {mutate_safetensors(rng, model / 'quantized.safetensors')}"
        values = lambda key: JSON_VALUES + ["lcdfast-quantized/1", "int4", "int8", "int4:64", "gguf", "int3", ""]
        return corpus, f"{family}: {mutate_json(rng, model / 'quantized.json', ['format', 'mode', 'source'], values)}"
    if corpus == "heads":
        shutil.copy(rng.choice(seeds["heads"]), case_dir / "heads.safetensors")
        return corpus, mutate_safetensors(rng, case_dir / "heads.safetensors")
    mutate = {"safetensors": lambda: mutate_safetensors(rng, model / "model.safetensors"),
              "config": lambda: mutate_config(rng, model), "tokenizer": lambda: mutate_tokenizer(rng, model)}
    return corpus, f"{family}: {mutate[corpus]()}"


# ---- the worker: one process, case after case -------------------------------------------------------------------

def use(case_dir: Path, done: list) -> tuple[str, str]:
    """Convert and load the case, then use it: ("ok" or "garbage", what came out). `done` gets "converted" once
    the conversion is through."""
    import torch

    import lcdfast
    from lcdfast.convert import convert_gguf

    model = case_dir / "model"
    if (case_dir / "model.gguf").is_file():
        model = convert_gguf(case_dir / "model.gguf", case_dir / "out", progress=False)
        done.append("converted")
    engine = lcdfast.load(model, compile=False)
    layer = 0
    if (case_dir / "heads.safetensors").is_file():
        engine.set_exit_heads(case_dir / "heads.safetensors")
        layer = engine.exit_heads.layers[0]
    logits = engine.layer_logits(engine.encode_prompt(PROMPTS[0]))
    if not torch.isfinite(logits).all():
        return "garbage", f"{int((~torch.isfinite(logits)).sum())} non-finite logits"
    ids = []
    for options in (dict(method="greedy"), dict(method="acd", amateur_layer=layer)):
        ids += [g.token_ids for g in engine.generate(PROMPTS, max_new_tokens=3, **options)]
    scores = engine.score(PROMPTS[:1], [" jumps"], method="acd", amateur_layer=layer)
    if engine.tokenizer.chat_template[0] is not None:
        ids.append(engine.generate(PROMPTS[0], max_new_tokens=2, chat=True)[0].token_ids)
    V = engine.model.config.vocab_size
    if not all(0 <= t < V for row in ids for t in row) or not all(map(math.isfinite, scores)):
        return "garbage", f"tokens {ids}, scores {scores}"
    return "ok", f"tokens {ids}"


def worker() -> None:
    """Cases arrive as JSON lines on stdin; each answer is one JSON line on the original stdout (what the
    libraries print goes to stderr)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import torch

    from lcdfast.errors import LcdError

    torch.set_num_threads(1)
    print("ready", file=reply, flush=True)
    for line in sys.stdin:
        done = []
        try:
            outcome, detail = use(Path(json.loads(line)["dir"]), done)
        except LcdError as e:
            outcome, detail = "error" if str(e) and "\n" not in str(e) else "traceback", f"LcdError: {e}"
        except MemoryError:
            outcome, detail = "memory", traceback.format_exc(limit=-4)
        except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
            memory = "can't allocate memory" in str(e) or "not enough memory" in str(e)
            outcome, detail = "memory" if memory else "traceback", traceback.format_exc(limit=-6)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(json.dumps({"outcome": outcome, "detail": detail[-4000:], "rss_mb": rss, "done": done}), file=reply,
              flush=True)


class Worker:
    """A worker process, started on first use and again after it hangs or dies."""

    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "LCDFAST_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = None

    def run(self, case_dir: Path, timeout: float) -> dict:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
            if self.read(120) != "ready":
                return self.died()
        try:
            self.proc.stdin.write(json.dumps({"dir": str(case_dir)}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died between cases
            return self.died()
        line = self.read(timeout)
        if line is None:
            self.close()
            return {"outcome": "hang", "detail": f"no answer after {timeout:g}s"}
        return json.loads(line) if line else self.died()

    def read(self, timeout: float) -> str | None:
        """The worker's next line ("" if it died), None after `timeout` seconds."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def died(self) -> dict:
        code = self.proc.wait()
        self.proc = None
        return {"outcome": "memory" if code == -9 else "crash", "detail": f"the worker exited with code {code}"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ---- the run ----------------------------------------------------------------------------------------------------

def snapshot(root: Path, skip: str = "") -> dict:
    """Every file and directory under root (but `skip` and what is in it): its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if not (skip and (p == root / skip or (root / skip) in p.parents))}


def fuzz(cases: int = 300, seed: int = 0, timeout: float = 20.0, only: int | None = None, log=print) -> dict:
    """Run cases 0..cases-1 of `seed` (or case `only`): the counts per corpus and outcome, and the bad cases."""
    counts, bad, t0, peak = {}, [], time.perf_counter(), 0
    with tempfile.TemporaryDirectory(prefix="lcdfast-fuzz-") as tmp:
        root = Path(tmp)
        seeds, worker, case_dir = build_seeds(root / "seeds"), Worker(root / "home"), root / "case"
        try:
            for i in range(cases) if only is None else [only]:
                shutil.rmtree(case_dir, ignore_errors=True)
                case_dir.mkdir()
                corpus, mutation = make_case(random.Random(f"{seed}:{i}"), seeds, case_dir)
                before = snapshot(case_dir)
                result = worker.run(case_dir, timeout)
                outcome, peak = result["outcome"], max(peak, result.get("rss_mb", 0))
                after = snapshot(case_dir, "out" if "converted" in result.get("done", ()) else "")
                changed = sorted(k for k in {*after, *before} if after.get(k) != before.get(k))
                if outcome in ("ok", "error") and changed:
                    outcome, result["detail"] = "wrote", f"changed {changed[:4]}"
                counts.setdefault(corpus, Counter())[outcome] += 1
                if outcome in BAD:
                    bad.append({"case": i, "corpus": corpus, "mutation": mutation, "outcome": outcome,
                                "detail": result["detail"]})
                if outcome in BAD or only is not None:
                    log(f"case {i} ({corpus}: {mutation}): {outcome}\n  {result['detail'][-1500:]}")
        finally:
            worker.close()
    return {"seed": seed, "cases": len(range(cases)) if only is None else 1, "peak_rss_mb": peak,
            "seconds": round(time.perf_counter() - t0, 1), "counts": {c: dict(n) for c, n in sorted(counts.items())},
            "bad": bad}


def table(result: dict) -> str:
    columns, total = ["ok", "error", *BAD], sum(map(Counter, result["counts"].values()), Counter())
    lines = [f"{'corpus':12}" + "".join(f"{c:>10}" for c in columns)]
    for corpus, n in [*result["counts"].items(), ("total", total)]:
        lines.append(f"{corpus:12}" + "".join(f"{n.get(c, 0):>10}" for c in columns))
    lines.append(f"{result['cases']} cases (seed {result['seed']}) in {result['seconds']:.0f}s, worker peak RSS "
                 f"{result['peak_rss_mb']} MB, {len(result['bad'])} bad")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take (default 20)")
    p.add_argument("--report", default=None, help="write the counts and the bad cases' descriptions here (JSON)")
    p.add_argument("--case", type=int, default=None, help="replay this one case and show what happened")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker()
        return 0
    result = fuzz(args.cases, args.seed, args.timeout, args.case)
    print(table(result))
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
