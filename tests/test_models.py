"""Every family against transformers on the same random weights: hidden states, logits, greedy tokens."""

import json
import mmap
import re
import shutil

import pytest
import torch
from conftest import TINY, VOCAB, build_tiny

from lcdfast.checkpoint import HUGE_PAGE, in_huge_pages, load_model
from lcdfast.contrast import sampling_log_probs
from lcdfast.errors import LcdError
from lcdfast.generate import DecodeConfig, decode_step, generate_ids


def first_diff(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at position {i}: {a[i:i + 4]} vs {b[i:i + 4]}"


@pytest.mark.parametrize("kind", list(TINY))
def test_hidden_states_and_logits_match_transformers(kind, tiny_dir):
    path, hf = tiny_dir(kind)
    model = load_model(path)
    n = model.config.n_layers
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 13))
    model.setup_caches(2, 32)
    final, hidden = model(ids, torch.arange(13), torch.zeros(2, dtype=torch.long), tuple(range(n + 1)))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    for i in range(n):  # transformers' hidden_states[N] is after the final norm: compared as `final`
        err = (hidden[i] - ref.hidden_states[i]).abs().max().item()
        assert err < 1e-4, f"{kind}: hidden state {i} differs by {err}"
    assert (final - ref.hidden_states[n]).abs().max().item() < 1e-4, f"{kind}: final hidden state"
    err = (model.logits(final) - ref.logits).abs().max().item()
    assert err < 1e-4, f"{kind}: logits differ by {err}"


@pytest.mark.parametrize("kind", ["llama-tied-gqa", "gpt2"])
def test_attention_over_the_live_span_equals_the_whole_cache(kind, tiny_dir):
    """Decoding attends only the slots written so far (`span`); that must change nothing, padding included."""
    model = load_model(tiny_dir(kind)[0])
    ids, pad = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3)), torch.tensor([0, 4])
    outs = []
    for span in (None, torch.arange(11)):
        model.setup_caches(2, 64)
        for layer in model.layers:  # stale values past the span must not leak in
            layer.attention.kv_cache.k.fill_(7.0)
            layer.attention.kv_cache.v.fill_(-7.0)
        model(ids, torch.arange(9), pad, (), None if span is None else span[:9])
        final, exits = model(ids[:, :1], torch.tensor([9]), pad, (1,), None if span is None else span[:10])
        final2, _ = model(ids[:, 1:2], torch.tensor([10]), pad, (), span)
        outs.append(torch.cat([final, exits[0], final2], dim=-1))
        model.max_batch = -1  # fresh caches next round
    assert outs[1].shape == outs[0].shape
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_match_transformers(kind, penalty, tiny_dir):
    path, hf = tiny_dir(kind)
    model = load_model(path)
    torch.manual_seed(2)
    prompt = torch.randint(3, VOCAB, (1, 7))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                      repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    out, _, _, _ = generate_ids(model, [prompt[0].tolist()], DecodeConfig(repetition_penalty=penalty), 32, [])
    assert out[0] == ref, first_diff(out[0], ref)


@pytest.mark.parametrize("kind", ["llama-tied-gqa", "gpt2", "opt-350m-style", "qwen3-untied", "neox-parallel",
                                  "gpt-neo", "gemma2-softcap", "gemma3-untied", "phi3-window", "qwen2-untied",
                                  "gemma", "neox-sequential-tied"])
@pytest.mark.parametrize("dc", [DecodeConfig(), DecodeConfig(repetition_penalty=1.2),
                                DecodeConfig(method="sample", do_sample=True, temperature=0.9, top_k=40, top_p=0.9)])
def test_batched_equals_one_by_one(kind, dc, tiny_dir):
    path, _ = tiny_dir(kind)
    model = load_model(path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
    batched, _, _, _ = generate_ids(model, prompts, dc, 24, [], seed=7)
    for i, p in enumerate(prompts):
        alone, _, _, _ = generate_ids(model, [p], dc, 24, [], seed=7)
        assert batched[i] == alone[0], f"row {i}: " + first_diff(batched[i], alone[0])


def test_a_longer_generation_after_a_short_one_grows_the_cache(tiny_dir):
    model = load_model(tiny_dir("llama-untied")[0])
    short, _, _, _ = generate_ids(model, [[5, 6, 7]], DecodeConfig(), 20, [])
    assert model.max_seq_len == 256
    long, _, _, _ = generate_ids(model, [[5, 6, 7]], DecodeConfig(), 300, [])
    assert model.max_seq_len == 512 and len(long[0]) == 300 and long[0][:20] == short[0]


def test_eos_stops_a_row_but_not_the_batch(tiny_dir):
    path, _ = tiny_dir("llama-tied-gqa")
    model = load_model(path)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free, _, _, _ = generate_ids(model, prompts, DecodeConfig(), 16, [])
    eos = free[0][3]
    out, reasons, _, _ = generate_ids(model, prompts, DecodeConfig(), 16, [eos])
    assert out[0] == free[0][:free[0].index(eos) + 1] and reasons[0] == "eos"
    if eos not in free[1]:
        assert out[1] == free[1] and reasons[1] == "length"


def test_sharded_checkpoint_loads(tmp_path):
    hf = build_tiny("llama-untied", tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    whole, sharded = load_model(tmp_path / "whole"), load_model(tmp_path / "sharded")
    for (name, a), b in zip(whole.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), name
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    for shard, needle in [("../whole/model.safetensors", "shard '../whole/model.safetensors' is not a .safetensors"),
                          ("/etc/passwd", "shard '/etc/passwd' is not"), ("a" * 300 + ".safetensors", "shard 'aaa"),
                          ("C:x.safetensors", "shard 'C:x.safetensors' is not")]:
        index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "lm_head.weight": shard}}))
        with pytest.raises(LcdError, match=re.escape(needle)):
            load_model(tmp_path / "sharded")
    index_path.write_text(json.dumps(index))
    shutil.copy(tmp_path / "sharded" / shards[0], tmp_path / "sharded" / "copy.safetensors")  # its tensors twice
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], "lm_head.weight": "copy.safetensors"}}))
    with pytest.raises(LcdError, match=f"{shards[0]}: tensor '.*' is also in copy.safetensors"):
        load_model(tmp_path / "sharded")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_float32(dtype, tiny_dir):
    path, _ = tiny_dir("llama-tied-gqa")
    ref, low = load_model(path), load_model(path, dtype)
    ids = torch.randint(3, VOCAB, (1, 9))
    outs = []
    for m in (ref, low):
        m.setup_caches(1, 16)
        outs.append(m.logits(m(ids, torch.arange(9), torch.zeros(1, dtype=torch.long))[0]).float())
    assert low.output.weight.dtype == getattr(torch, dtype)
    assert (outs[0] - outs[1]).abs().max() < 0.1 * outs[0].abs().max()


@pytest.mark.parametrize("vocab,spread", [(100, 3.0), (5000, 3.0), (5000, 0.1)])
def test_sampling_warpers_match_transformers(vocab, spread):
    """Also where the top-p nucleus outgrows the 512 candidates (5000 tokens, flat) and the full sort runs."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(4)
    scores = torch.randn(3, vocab) * spread
    for temperature, k, p in [(0.7, 10, 1.0), (1.0, 0, 0.8), (1.3, 20, 0.5), (1.0, 0, 1.0), (0.8, 0, 0.95)]:
        ref = TemperatureLogitsWarper(temperature)(None, scores.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = sampling_log_probs(scores, temperature, k, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        assert torch.allclose(ours.exp(), ref.softmax(-1), atol=1e-6)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="madvise(MADV_HUGEPAGE) is Linux-only")
def test_weights_moved_into_one_huge_page_arena():
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.bfloat16), "c": torch.randn(1000, 64)}
    moved = in_huge_pages(tensors)
    for key, t in tensors.items():
        assert moved[key].dtype == t.dtype and torch.equal(moved[key], t)
        assert moved[key].data_ptr() % 64 == 0 and moved[key].data_ptr() != t.data_ptr()
    assert moved["a"].data_ptr() % HUGE_PAGE == 0  # the arena starts on a huge-page boundary
    assert moved["c"].data_ptr() - moved["a"].data_ptr() < 2 * HUGE_PAGE  # one contiguous mapping
    moved["a"] += 1  # writable, and no longer the original
    assert not torch.equal(moved["a"], tensors["a"])


def test_mistral_sliding_window_matches_transformers(tmp_path):
    """Mistral's sliding_window: a query sees only the last W positions. Logits over a prompt longer than the window,
    greedy tokens (eager and compiled) past it, and left-padded rows against the same rows alone."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.normal_(1.0, 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path)
    assert model.config.attention_window == 6
    ids = torch.randint(3, VOCAB, (2, 15))
    model.setup_caches(2, 32)
    final, _ = model(ids, torch.arange(15), torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
    assert (model.logits(final) - ref).abs().max().item() < 1e-4
    prompt = ids[:1, :9]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    for step_fn in (None, step):
        out, _, _, _ = generate_ids(model, [prompt[0].tolist()], DecodeConfig(), 24, [], step_fn=step_fn)
        assert out[0] == ref, first_diff(out[0], ref)
    prompts = [ids[0, :9].tolist(), ids[1, :3].tolist()]
    batched, _, _, _ = generate_ids(model, prompts, DecodeConfig(), 16, [])
    assert batched == [generate_ids(model, [p], DecodeConfig(), 16, [])[0][0] for p in prompts]
