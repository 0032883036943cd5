"""The CUDA path. Where a GPU is present (skipped otherwise): generation on CUDA against CPU, the compiled step
captured as CUDA graphs (mode="reduce-overhead") token-identical to eager without recompiling, and the masked
contrast op's CUDA kernel against its torch reference. Where only nvcc is (this CI): the kernel compiles."""

import contextlib
import io
import os
import shutil
import subprocess

import pytest
import torch
from conftest import VOCAB
from test_compile import CONFIGS

from lcdfast import kernels
from lcdfast.checkpoint import load_model
from lcdfast.generate import decode_step, generate_ids

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def prompts() -> list[list[int]]:
    return [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]


@needs_gpu
@pytest.mark.parametrize("name", ["greedy", "dola"])
def test_cuda_generates_what_cpu_does(name, tiny_dir):
    path = tiny_dir("llama-untied")[0]
    on_cpu, _, _, _ = generate_ids(load_model(path), prompts(), CONFIGS[name], 24, [])
    on_gpu, _, _, _ = generate_ids(load_model(path, device="cuda"), prompts(), CONFIGS[name], 24, [])
    assert on_gpu == on_cpu


@needs_gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_graphs_equal_eager_without_recompiling(name, tiny_dir):
    model = load_model(tiny_dir("llama-untied")[0], device="cuda")
    torch.compiler.reset()
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    eager, _, _, _ = generate_ids(model, prompts(), CONFIGS[name], 48, [], seed=11)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, _, _, _ = generate_ids(model, prompts(), CONFIGS[name], 48, [], seed=11, step_fn=step)
    assert compiled == eager


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_logits_cuda_kernel(dtype):
    was_enabled = kernels._enabled
    with contextlib.redirect_stderr(io.StringIO()):
        built = kernels.enable() and kernels.csrc_on(torch.device("cuda"))
    try:
        if not built:
            pytest.skip("the CUDA kernel was not built (no nvcc?)")
        g = torch.Generator().manual_seed(0)
        hidden, head = torch.randn(3, 64, generator=g), torch.randn(500, 64, generator=g) / 8
        ids = torch.randint(0, 500, (3, 40), generator=g)
        ids[:, :3] = torch.tensor([0, 499, 499])
        hidden, head, ids = hidden.to("cuda", dtype), head.to("cuda", dtype), ids.to("cuda")
        ours = torch.ops.lcdfast.masked_logits(hidden, head, ids)
        exact = torch.einsum("be,bke->bk", hidden.double(), head.double()[ids])
        assert ours.dtype == torch.float32 and ours.shape == ids.shape
        assert torch.allclose(ours.double(), exact, atol=1e-4 if dtype == torch.float32 else 1e-2)
    finally:
        kernels._enabled = was_enabled


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_masked_logits_cuda_kernel_compiles(tmp_path):
    """nvcc compiles the kernel against this torch's headers, for the A100 and H100/H200 generations, with no
    register spills. A CPU torch lacks one generated header of a CUDA build (c10/cuda/impl/cuda_cmake_macros.h);
    the test writes its one line."""
    from torch.utils import cpp_extension

    macros = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    include = [f"-I{d}" for d in [tmp_path / "include", *cpp_extension.include_paths()]]
    arch = [f"-gencode=arch=compute_{sm},code=sm_{sm}" for sm in (80, 90)]
    command = ["nvcc", "-c", "-std=c++20", "-O3", "-Xptxas", "-v", *cpp_extension.COMMON_NVCC_FLAGS, *arch,
               *include, str(kernels.CSRC / "masked_contrast_cuda.cu"), "-o", str(tmp_path / "kernel.o")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert done.returncode == 0, done.stderr[-3000:]
    spills = [line for line in done.stderr.splitlines() if "spill" in line]
    assert len(spills) == 8 and all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills
