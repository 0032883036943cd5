"""The optional fused masked contrast op (csrc/): against the torch reference and a float64 re-derivation, eager and
under torch.compile; and nothing built unless asked for. Skipped when the kernel can't be built here."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcdfast import kernels
from lcdfast.contrast import acd_log_probs, acd_log_probs_masked, amateur_logits_at

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


def run_python(code: str, extensions_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LCDFAST_CSRC"}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_nothing_built_without_env_var(tmp_path):
    code = """
import torch
from lcdfast import kernels
from lcdfast.contrast import amateur_logits_at
head, hidden, ids = torch.randn(100, 8), torch.randn(2, 8), torch.randint(0, 100, (2, 5))
out = amateur_logits_at(hidden, head, ids)
assert out.dtype == torch.float32 and torch.equal(out, torch.einsum("be,bke->bk", hidden, head[ids]))
assert not kernels.load_masked_logits() and kernels._devices is None
assert not hasattr(torch.ops.lcdfast, "masked_logits")
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_failed_build_says_why_once(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "masked_contrast.cpp").write_text("this is not C++;\n")
    code = f"""
from pathlib import Path
from lcdfast import kernels
kernels.CSRC = Path({str(tmp_path / "csrc")!r})
assert kernels.enable() is False and kernels.enable() is False
"""
    result = run_python(code, tmp_path / "ext")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcdfast: csrc kernel not built") and "error:" in lines[0], lines
