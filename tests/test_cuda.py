"""The CUDA path, where a GPU is present (skipped otherwise): generation on CUDA against CPU, the compiled step
captured as CUDA graphs (mode="reduce-overhead") token-identical to eager without recompiling, and the masked
contrast op's CUDA kernel against its torch reference."""

import contextlib
import io

import pytest
import torch
from conftest import VOCAB
from test_compile import CONFIGS

from lcdfast import kernels
from lcdfast.checkpoint import load_model
from lcdfast.generate import decode_step, generate_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def prompts() -> list[list[int]]:
    return [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]


@pytest.mark.parametrize("name", ["greedy", "dola"])
def test_cuda_generates_what_cpu_does(name, tiny_dir):
    path = tiny_dir("llama-untied")[0]
    on_cpu, _, _, _ = generate_ids(load_model(path), prompts(), CONFIGS[name], 24, [])
    on_gpu, _, _, _ = generate_ids(load_model(path, device="cuda"), prompts(), CONFIGS[name], 24, [])
    assert on_gpu == on_cpu


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_graphs_equal_eager_without_recompiling(name, tiny_dir):
    model = load_model(tiny_dir("llama-untied")[0], device="cuda")
    torch.compiler.reset()
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    eager, _, _, _ = generate_ids(model, prompts(), CONFIGS[name], 48, [], seed=11)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, _, _, _ = generate_ids(model, prompts(), CONFIGS[name], 48, [], seed=11, step_fn=step)
    assert compiled == eager


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
