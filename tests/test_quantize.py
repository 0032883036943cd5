"""Weight-only quantization: the layout against an independent float64 reading of it, every product path (eager,
compiled, csrc) against float64 dequantize-then-matmul, every family quantized at load against the float model with
the same codes, the contrast methods on quantized weights, and bad modes as one-line errors."""

import pytest
import torch
from conftest import TINY, VOCAB
from test_cli import run
from test_models import first_diff

from lcdfast import quant
from lcdfast.checkpoint import load_model
from lcdfast.errors import LcdError
from lcdfast.generate import DecodeConfig, decode_step, generate_ids
from lcdfast.model import Linear, QuantLinear, linear

MODES = ["int8", "int8:32", "int4", "int4:64"]


def reference_weight(w: quant.QuantWeight) -> torch.Tensor:
    """The float64 weight the codes stand for, read straight from the documented layout (not quant.dequantize)."""
    q = w.q.long()
    if w.q.dtype == torch.uint8:  # per 32 columns: byte j = column j (low nibble), column j + 16 (high nibble)
        N, half = q.shape
        chunks = q.view(N, half // 16, 16)
        q = torch.stack([chunks % 16, chunks // 16], dim=2).view(N, 2 * half)
    N, K = q.shape
    G = K // w.scale.shape[1]
    scale = w.scale.double().repeat_interleave(G, dim=1)
    low = 0 if w.low is None else w.low.double().repeat_interleave(G, dim=1)
    return q.double() * scale + low


@pytest.mark.parametrize("mode", MODES)
def test_codes_round_trip_within_half_a_step(mode):
    bits, group = quant.parse_mode(mode)
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(0))
    qw = quant.quantize(w, bits, group)
    ref = reference_weight(qw)
    assert ((quant.dequantize(qw, torch.float64) - ref).abs() <= 1e-6 * ref.abs().max()).all()
    step = qw.scale.double().repeat_interleave(qw.group, dim=1)
    assert ((ref - w.double()).abs() <= 0.5 * step + 2e-3 * w.abs().max()).all(), mode
    assert qw.shape == w.shape and qw.nbytes < w.numel() * (1.2 if bits == 8 else 0.7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,compiled", [(1, False), (2, False), (5, False), (12, False), (13, False),
                                           (1, True), (3, True), (9, True), (13, True)])
def test_products_match_float64(mode, rows, compiled):
    """Eager (csrc's op when built), compiled (inductor's fused reduction, csrc's op when built)."""
    bits, group = quant.parse_mode(mode)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(rows)
    w, x, bias = (torch.randn(*shape, generator=gen) for shape in ((67, 192), (rows, 192), (67,)))
    qw = quant.quantize(w, bits, group)
    want = x.double() @ reference_weight(qw).t() + bias.double()
    fn = torch.compile(linear, fullgraph=True, dynamic=False) if compiled else linear
    got = fn(x, qw, bias)
    assert got.shape == (rows, 67)
    err = ((got.double() - want).abs() / want.abs().max()).max().item()
    assert err < 1e-5, f"{mode}, {rows} rows, compiled={compiled}: relative error {err}"


def test_activation_codes_are_int8_per_block_of_32():
    """quantize_activations: per block of 32 columns (the last one shorter) codes in -127..127 times one scale,
    the block's largest magnitude on +-127 exactly, each value within half a step, zeros kept."""
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(1)) * torch.linspace(1e-3, 50, 70)
    x[1, 32:64] = 0
    got = quant.quantize_activations(x).double()
    for b in range(0, 70, 32):
        block, gb = x[:, b:b + 32].double(), got[:, b:b + 32]
        d = block.abs().amax(-1, keepdim=True).float().double() / 127
        d = torch.where(d > 0, d, 1.0)
        codes = gb / d
        assert (codes - codes.round()).abs().max() < 1e-4 and codes.abs().max() <= 127 + 1e-4
        assert ((gb - block).abs() <= 0.5 * d * (1 + 1e-5)).all()
        top = block.abs().argmax(-1, keepdim=True)
        assert torch.allclose(gb.gather(1, top).abs(), block.gather(1, top).abs(), rtol=1e-6)
    assert (got[1, 32:64] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,compiled", [(1, False), (5, False), (13, False), (1, True), (9, True)])
def test_a8_products_match_float64(mode, rows, compiled):
    """A weight marked a8 multiplies quantize_activations(x): eager (csrc's quant_linear_a8 when built, else the
    torch reference) and compiled alike."""
    bits, group = quant.parse_mode(mode)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(rows)
    w, x, bias = (torch.randn(*shape, generator=gen) for shape in ((67, 192), (rows, 192), (67,)))
    qw = quant.quantize(w, bits, group)._replace(a8=True)
    want = quant.quantize_activations(x).double() @ reference_weight(qw).t() + bias.double()
    fn = torch.compile(linear, fullgraph=True, dynamic=False) if compiled else linear
    got = fn(x, qw, bias)
    err = ((got.double() - want).abs() / want.abs().max()).max().item()
    assert got.shape == (rows, 67) and err < 1e-5, f"{mode}+a8, {rows} rows, compiled={compiled}: relative error {err}"
    plain = (x.double() @ reference_weight(qw).t() + bias.double() - want).abs().max().item()
    assert plain > 1e-4 * want.abs().max().item(), "the int8 activations change the product"


@pytest.mark.parametrize("mode", ["int4+a8", "int8+a8"])
def test_a8_model_decodes_compiled_as_eager(mode, tiny_dir):
    """'+a8' at load: every quantized linear takes int8 activations (the model says so), its logits stay near the
    weight-only model's, and a compiled ACD step decodes what the eager one does, with one graph."""
    path = tiny_dir("llama-untied")[0]
    model, weight_only = load_model(path, quantize=mode), load_model(path, quantize=mode.removesuffix("+a8"))
    assert model.quantization == mode
    assert all(m.weight.a8 for m in model.modules() if isinstance(m, QuantLinear))
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    (got, _), (want, _) = forward(model, ids), forward(weight_only, ids)
    gap = (got - want).abs().max().item() / want.abs().max().item()
    assert 0 < gap < 0.05, gap
    dc = DecodeConfig(method="acd", exit_layers=(3,))
    torch.compiler.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    eager, *_ = generate_ids(model, [[5, 9, 17], [4]], dc, 32, [])
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, *_ = generate_ids(model, [[5, 9, 17], [4]], dc, 32, [], step_fn=step)
    assert compiled == eager


def test_a8_alone_is_a_one_line_error(tiny_dir):
    with pytest.raises(LcdError, match=r"^quantize: '\+a8' quantizes the activations of quantized weights; give"):
        load_model(tiny_dir("llama-untied")[0], quantize="+a8")
    with pytest.raises(LcdError, match=r"^quantize: 'int5' is not a quantization mode"):
        load_model(tiny_dir("llama-untied")[0], quantize="int5+a8")


def test_shapes_that_do_not_fit_a_group_are_errors():
    with pytest.raises(LcdError, match="tensor 'w13.weight' has 80 input columns, not a multiple of 64"):
        quant.quantize(torch.randn(4, 80), 4, 64, "w13.weight")
    with pytest.raises(LcdError, match="not a multiple of 32"):
        quant.quantize(torch.randn(4, 40), 8, 32)
    quant.quantize(torch.randn(4, 40), 8, 0)  # one scale per row fits any width


@pytest.mark.parametrize("bad", ["int3", "int4:48", "int8:0", "int4:", "fp8", "INT8", "int4:32:1", 8, 4.0])
def test_bad_modes_are_one_line_errors(bad, tiny_dir):
    with pytest.raises(LcdError, match=r"^quantize: .* is not a quantization mode \(expected int8") as e:
        load_model(tiny_dir("llama-tied-gqa")[0], quantize=bad)
    assert "\n" not in str(e.value)


def float_twin(path, qmodel):
    """The float model with every linear's weight replaced by its quantized codes' float64 value (as float32)."""
    model = load_model(path)
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear):
            target = model.get_submodule(name)
            assert isinstance(target, Linear | torch.nn.Embedding)
            target.weight.copy_(reference_weight(module.weight).float())
    return model


def forward(model, ids, layers=()):
    model.setup_caches(ids.shape[0], 32)
    final, exits = model(ids, torch.arange(ids.shape[1]), torch.zeros(ids.shape[0], dtype=torch.long), layers)
    return model.logits(final), exits


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_family_quantized_equals_its_float_twin(kind, mode, tiny_dir):
    path, _ = tiny_dir(kind)
    if mode == "int4" and kind == "llama-odd-heads":  # its MLP is 97 wide: no whole groups of 32 inputs in w2
        with pytest.raises(LcdError, match="'layers.0.feed_forward.w2.weight' has 97 input column"):
            load_model(path, quantize=mode)
        return
    qmodel = load_model(path, quantize=mode)
    linears = [m for m in qmodel.modules() if isinstance(m, Linear | QuantLinear | torch.nn.Embedding)]
    assert all(isinstance(m, QuantLinear) for m in linears if m is not qmodel.pos_embeddings), \
        "every linear, the head and the token embeddings included"
    assert qmodel.quantization == mode and quant.describe(qmodel.output.weight) == quant.describe(
        quant.quantize(torch.zeros(8, 64), *quant.parse_mode(mode)))
    twin = float_twin(path, qmodel)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    layers = (1, qmodel.config.n_layers)
    (got, got_exits), (want, want_exits) = forward(qmodel, ids, layers), forward(twin, ids, layers)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-4 * scale, f"{kind} {mode}: logits"
    assert (got_exits - want_exits).abs().max().item() < 1e-4 * want_exits.abs().max().item()
    float_logits, _ = forward(load_model(path), ids)
    assert (float_logits - want).abs().max().item() > 0, "the quantized twin differs from the float model"


def test_quantized_model_holds_only_codes(tiny_dir):
    path, _ = tiny_dir("llama-untied")
    fp, q8, q4 = (load_model(path, quantize=m) for m in ("", "int8", "int4"))
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in q4.state_dict().values())
    assert q8.weight_bytes < 0.35 * fp.weight_bytes and q4.weight_bytes < 0.25 * fp.weight_bytes


def methods(amateur_dir):
    return [
        (DecodeConfig(method="greedy"), None),
        (DecodeConfig(method="acd", exit_layers=(2,)), None),
        (DecodeConfig(method="acd", exit_layers=(2,), head_candidates=0), None),
        (DecodeConfig(method="dola", exit_layers=(0, 2), repetition_penalty=1.2), None),
        (DecodeConfig(method="cd", alpha=0.1), amateur_dir),
    ]


@pytest.mark.parametrize("index", range(5))
def test_methods_on_quantized_weights_match_the_float_twin(index, tiny_dir):
    """ACD (masked op reading candidate rows of the quantized head, and full), DoLa and CD on int4 weights decode
    the same tokens as the float model holding the same codes, eagerly and compiled."""
    path, _ = tiny_dir("llama-tied-gqa")
    amateur_dir = tiny_dir("llama-amateur")[0]
    dc, amateur_path = methods(amateur_dir)[index]
    qmodel = load_model(path, quantize="int4")
    twin = float_twin(path, qmodel)
    qamateur = load_model(amateur_path, quantize="int4") if amateur_path else None
    amateur_twin = float_twin(amateur_path, qamateur) if amateur_path else None
    prompts = [[5, 9, 17, 33, 4], [7, 8]]
    want, *_ = generate_ids(twin, prompts, dc, 12, [], amateur=amateur_twin)
    got, *_ = generate_ids(qmodel, prompts, dc, 12, [], amateur=qamateur)
    for g, w in zip(got, want):
        assert g == w, f"{dc.method}: {first_diff(g, w)}"
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    compiled, *_ = generate_ids(qmodel, prompts, dc, 12, [], amateur=qamateur, step_fn=step)
    for c, g in zip(compiled, got):
        assert c == g, f"{dc.method} compiled: {first_diff(c, g)}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_step_equals_eager_without_recompiling(mode, tiny_dir):
    qmodel = load_model(tiny_dir("llama-untied")[0], quantize=mode)
    dc = DecodeConfig(method="acd", exit_layers=(3,))
    torch.compiler.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    eager, *_ = generate_ids(qmodel, [[5, 9, 17], [4]], dc, 64, [])
    with torch._dynamo.config.patch(error_on_recompile=True):  # 64 positions, one graph
        compiled, *_ = generate_ids(qmodel, [[5, 9, 17], [4]], dc, 64, [], step_fn=step)
    assert compiled == eager and len(eager[0]) == 64


@pytest.mark.parametrize("kind,mode", [("llama-untied", "int4"), ("llama-tied-gqa", "int4:64"), ("gpt2", "int8"),
                                       ("opt-350m-style", "int8:32")])
def test_quantize_command_writes_a_checkpoint_that_loads_as_stored(kind, mode, tiny_dir, tmp_path, capsys):
    path, _ = tiny_dir(kind)
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", str(path), str(out), "--mode", mode)
    assert code == 0, err
    assert not (out / "model.safetensors").exists() and (out / "tokenizer.json").is_file()
    at_load = load_model(path, quantize=mode)
    stored = load_model(out)  # as stored: the codes
    assert stored.quantization == at_load.quantization == mode
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(run_model(stored, ids), run_model(at_load, ids))
    floats = load_model(out, quantize="")  # codes dequantized: the float twin
    assert not floats.quantization
    assert (run_model(floats, ids) - run_model(stored, ids)).abs().max() < 1e-4 * run_model(floats, ids).abs().max()
    other = "int8" if mode.startswith("int4") else "int4"
    code, _, err = run(capsys, "generate", "--model", str(out), "hello", "--max-new-tokens", "3", "--quantize", other)
    assert code == 2 and "holds" in err and "load it as stored" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "generate", "--model", str(path), "hi", "--max-new-tokens", "2", "--quantize", "gguf")
    assert code == 2 and "'gguf' needs a checkpoint converted from GGUF" in err
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "r"), "--mode", "int5")
    assert code == 2 and "--mode: 'int5' is not a quantization mode" in err
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "r"), "--mode", mode + "+a8")
    assert code == 2 and "is not a quantization mode" in err, "activations are quantized at load, not stored"
    a8 = load_model(out, quantize=mode + "+a8")  # the stored codes, int8 activations on top
    assert a8.quantization == mode + "+a8" and torch.equal(a8.output.q, stored.output.q)
    code, out_text, err = run(capsys, "generate", "--model", str(out), "hello", "--max-new-tokens", "3", "--quantize",
                              mode + "+a8", "--no-compile")
    assert code == 0 and out_text.strip(), err


def run_model(model, ids):
    return forward(model, ids)[0]


def test_gguf_blocks_read_back_natively_equal_ggufs_dequantization(tmp_path):
    """Q8_0 / Q4_0 / Q4_1 tensors written with the gguf package, converted, and loaded with quantize='gguf': every
    linear holds the blocks (no float copy), its weight equals gguf's own dequantization (Q and K rows in HF
    order), and the logits and greedy tokens equal the dequantized float32 checkpoint's."""
    import gguf
    import numpy as np
    from conftest import build_tiny
    from test_gguf import llama_cpp_permute, write_gguf

    from lcdfast import convert

    hf_dir = tmp_path / "hf"
    model = build_tiny("llama-tied-gqa", hf_dir)
    cfg, sd = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    kinds = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q8_0", "ffn_gate": "Q4_1",
             "ffn_up": "Q4_1", "ffn_down": "Q4_1"}
    names = {v: k for k, v in convert.LAYER_NAMES.items()}
    tensors, raw = {"output_norm.weight": sd["model.norm.weight"]}, {}
    raw["token_embd.weight"] = (sd["model.embed_tokens.weight"], "Q8_0")
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            if f"model.layers.{i}.{hf}.weight" not in sd:  # Qwen3's q/k norms
                continue
            w = sd[f"model.layers.{i}.{hf}.weight"]
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gg)
            w = llama_cpp_permute(w, heads) if heads else w
            if gg in kinds:
                raw[f"blk.{i}.{gg}.weight"] = (w, kinds[gg])
            else:
                tensors[f"blk.{i}.{gg}.weight"] = w
    for name, (w, kind) in raw.items():  # (bytes, their type): write_gguf adds them as raw blocks
        tensors[name] = (gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]), gguf.GGMLQuantizationType[kind])
    path = write_gguf(tmp_path / "tiny.gguf", tensors=tensors, hf_dir=hf_dir, cfg=cfg)
    out = convert.convert_gguf(path, tmp_path / "out", progress=False)
    native, floats = load_model(out, quantize="gguf"), load_model(out)
    assert native.quantization == "gguf" and not floats.quantization
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name not in raw:
            continue
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(raw[t.name][0].shape)
        if t.name == "token_embd.weight":
            got = native.output.weight
            rows = slice(None)
        else:
            i, gg = int(t.name.split(".")[1]), t.name.split(".")[2]
            block = native.layers[i]
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gg)
            want = convert.unpermute(want, heads) if heads else want
            q, kv = cfg.num_attention_heads * 16, cfg.num_key_value_heads * 16
            got, rows = {"attn_q": (block.attention.wqkv.weight, slice(0, q)),
                         "attn_k": (block.attention.wqkv.weight, slice(q, q + kv)),
                         "attn_v": (block.attention.wqkv.weight, slice(q + kv, None)),
                         "attn_output": (block.attention.wo.weight, slice(None)),
                         "ffn_gate": (block.feed_forward.w13.weight, slice(0, cfg.intermediate_size)),
                         "ffn_up": (block.feed_forward.w13.weight, slice(cfg.intermediate_size, None)),
                         "ffn_down": (block.feed_forward.w2.weight, slice(None))}[gg]
        assert isinstance(got, quant.QuantWeight), t.name
        assert np.array_equal(quant.dequantize(got).numpy()[rows], want), t.name
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    a, b = run_model(native, ids), run_model(floats, ids)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    dc = DecodeConfig(method="acd", exit_layers=(2,))
    want_ids, *_ = generate_ids(floats, [[5, 9, 17, 33]], dc, 16, [])
    got_ids, *_ = generate_ids(native, [[5, 9, 17, 33]], dc, 16, [])
    assert got_ids == want_ids, first_diff(got_ids[0], want_ids[0])


def test_auto_compiles_a_quantized_step_without_csrc(tiny_dir):
    """Eagerly, without csrc's products, a quantized step dequantizes every weight: `compile=None` compiles it even
    for a few tokens, where a float step stays eager."""
    import lcdfast
    from lcdfast import kernels

    if kernels.csrc_on(torch.device("cpu")):
        pytest.skip("csrc is on: eager quantized steps are fast")
    path = tiny_dir("llama-tied-gqa")[0]
    quantized, floats = lcdfast.load(path, quantize="int8"), lcdfast.load(path)
    assert quantized._plan_step(DecodeConfig(), 1, 256, 3)[0] in quantized.saved_steps.values()  # compiled (CPU)
    assert floats._plan_step(DecodeConfig(), 1, 256, 3)[0] is decode_step
