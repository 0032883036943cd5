"""The optional csrc/ ops, the masked contrast op, skinny_linear and js_divergence: against the torch reference and a
float64 re-derivation, eager and under torch.compile, in the model's decode step; and nothing built unless asked for.
Skipped when the kernels can't be built here."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB

from lcdfast import kernels
from lcdfast.checkpoint import load_model
from lcdfast.contrast import acd_log_probs, acd_log_probs_masked, amateur_logits_at, js_divergence
from lcdfast.generate import DecodeConfig, decode_step, generate_ids
from lcdfast.model import linear

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def op():
    """The built op, on for this module's tests and put back as it was after them."""
    was_enabled = kernels._enabled
    with contextlib.redirect_stderr(io.StringIO()) as err:
        ok = kernels.enable()
    if not ok:
        kernels._enabled = was_enabled
        pytest.skip(err.getvalue().strip() or "csrc kernel not built")
    yield torch.ops.lcdfast.masked_logits
    kernels._enabled = was_enabled


def random_case(B, K, E, V, dtype, seed=0):
    """hidden [B, E], a head [V, E], and ids [B, K] that include id 0, V - 1 and duplicates."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, E, generator=g).to(dtype)
    head = (torch.randn(V, E, generator=g) * E**-0.5).to(dtype)
    ids = torch.randint(0, V, (B, K), generator=g)
    special = torch.tensor([0, V - 1, V // 2, V - 1, ids[0, 0].item()])[:K]  # V - 1 and ids[0, 0] repeat
    ids[:, : len(special)] = special
    return hidden, head, ids


def float64_logits(hidden, head, ids):
    return torch.stack([head.double()[ids[b]] @ hidden[b].double() for b in range(len(ids))])


def first_diff(a, b, atol, rtol=0.0):
    bad = ((a.double() - b.double()).abs() > atol + rtol * b.double().abs()).nonzero()
    return None if len(bad) == 0 else (tuple(bad[0].tolist()), a[tuple(bad[0])].item(), b[tuple(bad[0])].item())


SHAPES = [(1, 64, 576, 4000), (3, 16, 64, 500), (2, 5, 37, 100), (4, 1, 8, 10), (1, 7, 33, 256)]


@pytest.mark.parametrize("B,K,E,V", SHAPES)
def test_float32_matches_reference(op, B, K, E, V):
    hidden, head, ids = random_case(B, K, E, V, torch.float32)
    ours = op(hidden, head, ids)
    assert ours.dtype == torch.float32 and ours.shape == (B, K)
    reference = torch.einsum("be,bke->bk", hidden, head[ids])
    assert first_diff(ours, reference, 1e-5) is None, first_diff(ours, reference, 1e-5)
    assert first_diff(ours, float64_logits(hidden, head, ids), 1e-5) is None


def test_threads_split_rows(op):
    """Two threads' chunks of the B * K outputs cut through rows (120 outputs, rows of 40)."""
    hidden, head, ids = random_case(3, 40, 576, 3000, torch.float32, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = op(hidden, head, ids)
    finally:
        torch.set_num_threads(threads)
    assert first_diff(ours, float64_logits(hidden, head, ids), 1e-5) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,E,V", SHAPES[:3])
def test_half_precision_matches_reference(op, dtype, B, K, E, V):
    hidden, head, ids = random_case(B, K, E, V, dtype, seed=1)
    ours = op(hidden, head, ids)
    assert ours.dtype == torch.float32
    exact = float64_logits(hidden, head, ids)  # of the rounded inputs: the op only adds float32 sums' error
    assert first_diff(ours, exact, 1e-4) is None, first_diff(ours, exact, 1e-4)
    reference = torch.einsum("be,bke->bk", hidden, head[ids])  # rounded to dtype
    assert first_diff(ours, reference, 3e-2, 2e-2) is None, first_diff(ours, reference, 3e-2, 2e-2)


def test_bad_ids_raise(op):
    hidden, head, ids = random_case(1, 4, 8, 100, torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        op(hidden, head, ids + 128)


def test_contrast_uses_op_eager_and_compiled(op):
    hidden, head, ids = random_case(2, 8, 48, 300, torch.bfloat16, seed=2)
    assert amateur_logits_at(hidden, head, ids).dtype == torch.float32  # the op's output, not einsum's bf16

    def f(hidden, head, ids):
        return amateur_logits_at(hidden, head, ids) * 2

    torch.compiler.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    ours = compiled(hidden, head, ids)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, 2 * float64_logits(hidden, head, ids).float(), atol=2e-4)


def test_masked_acd_is_exact_with_op(op):
    """acd_log_probs_masked (torch.cond over the op) still equals the full-vocab ACD."""
    torch.manual_seed(7)
    E, V = 32, 500
    head, hidden, expert = torch.randn(V, E), torch.randn(3, E), torch.randn(3, V) * 5
    ours = acd_log_probs_masked(expert, hidden, head, 0.1, 1, candidates=16)
    reference = acd_log_probs(expert, hidden @ head.T, 0.1)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


# (M, N, E): one row and a few; N below, at and off the 3-row and 2-row tiles (3 x 4 blocks; 1 x M for 6-12 float32
# rows that fit in L1, else 2 x 5 for M = 9, 10, 14); E off the 8-lane vector; DoLa's 9 and 72 rows.
SKINNY_SHAPES = [(1, 1, 5), (2, 2, 8), (1, 3, 16), (3, 7, 37), (5, 10, 64), (9, 500, 576), (4, 301, 33), (72, 50, 24),
                 (10, 7, 37), (14, 1, 9), (9, 2, 16), (6, 13, 20), (7, 1, 3), (12, 40, 100), (13, 5, 16),
                 (8, 9, 1000), (9, 4, 1001)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,E", SKINNY_SHAPES)
def test_skinny_linear_matches_float64(op, dtype, M, N, E):
    g = torch.Generator().manual_seed(M * 1000 + N + E)
    x, weight = torch.randn(M, E, generator=g).to(dtype), (torch.randn(N, E, generator=g) * E**-0.5).to(dtype)
    ours = torch.ops.lcdfast.skinny_linear(x, weight)
    assert ours.dtype == dtype and ours.shape == (M, N)
    exact = x.double() @ weight.double().T  # of the rounded inputs: the op adds float32 sums' error, then rounds
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert first_diff(ours, exact, tolerance, tolerance) is None, first_diff(ours, exact, tolerance, tolerance)


def test_skinny_linear_threads_and_bad_input(op):
    x, weight = torch.randn(9, 576), torch.randn(3001, 576)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = torch.ops.lcdfast.skinny_linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert first_diff(ours, x.double() @ weight.double().T, 1e-4) is None
    with pytest.raises(RuntimeError, match="differ in E"):
        torch.ops.lcdfast.skinny_linear(x, weight[:, :100])
    with pytest.raises(RuntimeError, match="but weight is"):
        torch.ops.lcdfast.skinny_linear(x, weight.bfloat16())


def test_linear_calls_skinny_with_few_rows(op):
    x, weight, bias = torch.randn(2, 3, 40), torch.randn(30, 40), torch.randn(30)
    ours = linear(x, weight, bias)
    assert torch.equal(ours, torch.ops.lcdfast.skinny_linear(x.reshape(6, 40), weight).reshape(2, 3, 30) + bias)
    assert torch.allclose(ours, torch.nn.functional.linear(x, weight, bias), atol=1e-5)


def reference_js(final, layers, dtype=torch.float64):
    """contrast.js_divergence's torch path, in float64 or float32."""
    kernels._enabled = False
    try:
        return js_divergence(final.to(dtype), layers.to(dtype)).double()
    finally:
        kernels._enabled = True


# (L, B, V): V within one 2048-entry chunk, across chunks, off the 8-lane vector; SmolLM2's and GPT-2's vocabularies
@pytest.mark.parametrize("L,B,V", [(1, 1, 7), (2, 3, 100), (4, 5, 2049), (8, 1, 49152), (3, 2, 50257)])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_js_divergence_matches_float64(op, L, B, V, scale):
    """Layers near the final one (small divergences, where the terms nearly cancel) and far from it."""
    g = torch.Generator().manual_seed(L * 100 + V)
    final = torch.randn(B, V, generator=g) * scale
    layers = final + torch.randn(L, B, V, generator=g) * scale * torch.rand(L, 1, 1, generator=g)
    ours, exact = torch.ops.lcdfast.js_divergence(final, layers), reference_js(final, layers)
    assert ours.dtype == torch.float32 and ours.shape == (L, B)
    # within 1e-4 relative, or where the terms cancel that far, 3x the float32 reference's largest error
    allowed = 1e-4 * exact.abs() + 3 * (reference_js(final, layers, torch.float32) - exact).abs().max()
    bad = ((ours.double() - exact).abs() > allowed).nonzero()
    assert len(bad) == 0, (bad[0].tolist(), ours[tuple(bad[0])].item(), exact[tuple(bad[0])].item())
    top2 = exact.topk(min(2, L), dim=0).values
    clear = (top2[0] - top2[-1]) > 1e-3 * top2[0]  # rows whose best layer leads by more than the errors
    assert torch.equal(ours.argmax(0)[clear], exact.argmax(0)[clear])


def test_js_divergence_edges_threads_and_bad_input(op):
    final, layers = torch.randn(2, 5000), torch.randn(3, 2, 5000)
    layers[0, 0, :4096] = -float("inf")  # whole chunks of -inf: zero probability, still finite divergences
    final[1, 7] = -1e30
    ours, exact = torch.ops.lcdfast.js_divergence(final, layers), reference_js(final, layers)
    assert first_diff(ours, exact, 1e-10, 2e-4) is None, first_diff(ours, exact, 1e-10, 2e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(torch.ops.lcdfast.js_divergence(final, layers), ours)  # chunks summed in order
    finally:
        torch.set_num_threads(threads)
    layers[2, 1, 4999] = float("nan")
    nan = torch.ops.lcdfast.js_divergence(final, layers).isnan()
    assert nan[2, 1] and nan.sum() == 1
    with pytest.raises(RuntimeError, match="don't match final"):
        torch.ops.lcdfast.js_divergence(final, layers[:, :, :100])
    with pytest.raises(RuntimeError, match="float32 logits only"):
        torch.ops.lcdfast.js_divergence(final.double(), layers.double())


@pytest.mark.parametrize("name,quantize", [("greedy", None), ("dola", None), ("greedy", "int4"), ("dola", "int8")])
def test_decode_with_skinny_linear(op, name, quantize, tiny_dir):
    """With the ops on: compiled equals eager token for token, and both pick what the torch path picks (for
    quantized weights: csrc's quant_linear against the dequantized products)."""
    model = load_model(tiny_dir("llama-untied")[0], quantize=quantize)
    dc = DecodeConfig() if name == "greedy" else DecodeConfig(method="dola", exit_layers=(0, 2, 4), exit_norm=False)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]
    eager, _, _, _ = generate_ids(model, prompts, dc, 24, [], seed=3)
    torch.compiler.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, _, _, _ = generate_ids(model, prompts, dc, 24, [], seed=3, step_fn=step)
    assert compiled == eager
    kernels._enabled = False
    try:
        reference, _, _, _ = generate_ids(model, prompts, dc, 24, [], seed=3)
    finally:
        kernels._enabled = True
    assert eager == reference


def run_python(code: str, extensions_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LCDFAST_CSRC"}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ours(stderr: str) -> list[str]:
    """stderr's lines but torch's own log lines (a CUDA torch without a GPU warns "No CUDA runtime is found")."""
    lines = stderr.strip().splitlines()
    assert not any(line.startswith("Traceback") for line in lines), stderr
    return [line for line in lines if "torch/utils/cpp_extension.py" not in line]


def test_nothing_built_without_env_var(tmp_path):
    code = """
import torch
from lcdfast import kernels
from lcdfast.contrast import amateur_logits_at
head, hidden, ids = torch.randn(100, 8), torch.randn(2, 8), torch.randint(0, 100, (2, 5))
out = amateur_logits_at(hidden, head, ids)
assert out.dtype == torch.float32 and torch.equal(out, torch.einsum("be,bke->bk", hidden, head[ids]))
assert not kernels.load() and kernels._devices is None
assert not any(hasattr(torch.ops.lcdfast, op) for op in ("masked_logits", "skinny_linear", "js_divergence"))
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_failed_build_says_why_once(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "masked_contrast.cpp").write_text("this is not C++;\n")
    for name in ("skinny_linear.cpp", "js_divergence.cpp", "quant_linear.cpp", "simd.h"):
        (tmp_path / "csrc" / name).write_text((ROOT / "csrc" / name).read_text())
    code = f"""
from pathlib import Path
from lcdfast import kernels
kernels.CSRC = Path({str(tmp_path / "csrc")!r})
assert kernels.enable() is False and kernels.enable() is False
"""
    result = run_python(code, tmp_path / "ext")
    assert result.returncode == 0, result.stderr
    lines = ours(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("lcdfast: csrc kernel not built") and "error:" in lines[0], lines


def test_failed_cuda_build_keeps_the_cpu_ops(tmp_path):
    """With a GPU and an nvcc whose build fails (here: any build with the .cu), one line says so and the CPU ops
    are built alone; the real build is cached where the other tests put it."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    code = f"""
import torch
from torch.utils import cpp_extension
from lcdfast import kernels
real_load, built = cpp_extension.load, []
def load(sources, **kwargs):
    built.append([s.rsplit("/", 1)[1] for s in sources])
    if any(s.endswith(".cu") for s in sources):
        raise RuntimeError("Error building extension\\n/usr/bin/ld: error: cannot find -lcudart")
    return real_load(sources=sources, **kwargs)
cpp_extension.load, cpp_extension.CUDA_HOME, torch.cuda.is_available = load, {str(tmp_path)!r}, lambda: True
assert kernels.enable() and kernels._devices == {{"cpu"}}, kernels._devices
cpu = ["masked_contrast.cpp", "skinny_linear.cpp", "js_divergence.cpp", "quant_linear.cpp"]
assert built == [cpu + ["masked_contrast_cuda.cu"], cpu], built
assert kernels.csrc_on(torch.device("cpu")) and not kernels.csrc_on(torch.device("cuda"))
"""
    env = {k: v for k, v in os.environ.items() if k != "LCDFAST_CSRC"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    lines = ours(result.stderr)
    assert lines == ["lcdfast: csrc CUDA kernel not built (RuntimeError: /usr/bin/ld: error: cannot find -lcudart); "
                     "building the CPU ops alone"], lines


NARROW_BUILD = """
import sys, torch
from torch.utils import cpp_extension
cpp_extension.load(name="quant_linear_" + sys.argv[1], sources=[sys.argv[2]],
                   extra_cflags=["-O2", "-fopenmp", *sys.argv[3:]], extra_ldflags=["-fopenmp"], is_python_module=False)
from lcdfast import quant
g = torch.Generator().manual_seed(0)
for mode, K in [("int8", 200), ("int8:32", 320), ("int4", 320), ("int4:64", 576)]:
    qw = quant.quantize(torch.randn(67, K, generator=g), *quant.parse_mode(mode))
    for rows in (1, 3, 9):
        x = torch.randn(rows, K, generator=g) * torch.linspace(0.01, 10, K)
        a8 = quant.quantize_activations(x)
        for op, xin in ((torch.ops.lcdfast.quant_linear, x), (torch.ops.lcdfast.quant_linear_a8, a8)):
            want = xin.double() @ quant.dequantize(qw).double().t()
            err = ((op(x, qw.q, qw.scale, qw.low).double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-6, (mode, rows, op, err)
"""


@pytest.mark.parametrize("flags", [["-mavx2", "-mfma", "-mf16c", "-mno-avx512f", "-mno-avxvnni"],
                                   ["-mno-avx", "-mno-avx2", "-mno-fma"]], ids=["avx2-no-vnni", "portable"])
def test_quant_kernels_built_without_this_cpus_extensions(flags, op, tmp_path):
    """quant_linear and quant_linear_a8 as a machine with fewer extensions builds them: AVX2 without VNNI (the
    maddubs + madd path) and plain C++, against float64, in a process of their own (the ops' names are taken here)."""
    if "-mavx2" in flags and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("LCDFAST_CSRC", None)
    result = subprocess.run([sys.executable, "-c", NARROW_BUILD, flags[0].strip("-").replace("-", "_"),
                             str(ROOT / "csrc" / "quant_linear.cpp"), *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("mode", ["int8", "int8:32", "int4", "int4:64"])
@pytest.mark.parametrize("scales", [torch.float16, torch.float32])
@pytest.mark.parametrize("a8", [False, True])
def test_quant_linear_matches_float64(op, mode, scales, a8):
    """csrc's quant_linear (a8: quant_linear_a8, against x on quant.quantize_activations' int8 grid) for 1-13 rows,
    an odd number of outputs (tiles end in single rows), int8 with one scale per row over a width that is no
    multiple of 32 (the scalar tail, and a shorter last block of activation codes), groups over 10 chunks (a span of
    8 read as vectors and 2 after it), both scale dtypes; eager and compiled."""
    from test_quantize import reference_weight

    from lcdfast import quant

    bits, group = quant.parse_mode(mode)
    K = 200 if mode == "int8" else 320
    g = torch.Generator().manual_seed(7)
    qw = quant.quantize(torch.randn(67, K, generator=g), bits, group)
    qw = quant.QuantWeight(qw.q, qw.scale.to(scales), None if qw.low is None else qw.low.to(scales))
    ref_w = reference_weight(qw)
    product = torch.ops.lcdfast.quant_linear_a8 if a8 else torch.ops.lcdfast.quant_linear
    torch.compiler.reset()
    compiled = torch.compile(lambda x, *w: product(x, *w), fullgraph=True, dynamic=False)
    for rows in range(1, 14):
        x = torch.randn(rows, K, generator=g) * torch.linspace(0.01, 10, K)  # blocks of very different scales
        want = (quant.quantize_activations(x) if a8 else x).double() @ ref_w.t()
        for fn in (product, compiled) if rows in (1, 9) else (product,):
            got = fn(x, qw.q, qw.scale, qw.low)
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert got.shape == (rows, 67) and err < 1e-6, f"{mode}, {rows} rows: relative error {err}"
    with pytest.raises(RuntimeError, match="need `low`"):
        product(torch.randn(1, K), qw.q, qw.scale, None if qw.low is not None else qw.scale)
