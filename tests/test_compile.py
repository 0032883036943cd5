"""The compiled decode step: token-identical to eager, and no recompilation as the position grows."""

import pytest
import torch
from conftest import VOCAB

from lcdfast.checkpoint import load_model
from lcdfast.generate import DecodeConfig, decode_step, generate_ids
from lcdfast.model import linear

CONFIGS = {
    "greedy": DecodeConfig(),
    "sample": DecodeConfig(method="sample", do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                           repetition_penalty=1.1),
    "acd": DecodeConfig(method="acd", exit_layers=(3,)),
    "dola": DecodeConfig(method="dola", exit_layers=(0, 2, 4), exit_norm=False, repetition_penalty=1.2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_equals_eager_without_recompiling(name, tiny_dir, monkeypatch):
    model = load_model(tiny_dir("llama-untied")[0])
    dc = CONFIGS[name]
    torch.compiler.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]
    eager, _, _, _ = generate_ids(model, prompts, dc, 64, [], seed=11)
    with torch._dynamo.config.patch(error_on_recompile=True):  # 64 positions, one graph
        compiled, _, _, _ = generate_ids(model, prompts, dc, 64, [], seed=11, step_fn=step)
    assert compiled == eager


def test_one_compiled_step_across_batches_cache_sizes_and_methods(tiny_dir):
    """From its third step a generation runs only the guards that tell cached graphs apart (generate_ids): one
    compiled step that has graphs for several batch sizes, cache sizes and methods must still pick the right one."""
    model = load_model(tiny_dir("llama-untied")[0])
    torch.compiler.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(3)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    runs = [([prompt(5)], "greedy", 20), ([prompt(4), prompt(7)], "acd", 20), ([prompt(3), prompt(8)], "greedy", 260),
            ([prompt(6)], "greedy", 20)]  # the last reuses the first graph, picked among three
    for prompts, name, n in runs:
        eager, _, _, _ = generate_ids(model, prompts, CONFIGS[name], n, [], seed=1)
        compiled, _, _, _ = generate_ids(model, prompts, CONFIGS[name], n, [], seed=1, step_fn=step)
        assert compiled == eager, f"{name}, batch {len(prompts)}, {n} tokens"


@pytest.mark.parametrize("rows", [1, 2, 9, 12, 13])
def test_compiled_linear_matches_f_linear(rows):
    """Compiled, a product of up to GEMV_ROWS rows is one reduction per row fused side by side (model.linear)."""
    g = torch.Generator().manual_seed(rows)
    x, weight, bias = torch.randn(rows, 40, generator=g), torch.randn(70, 40, generator=g), torch.randn(70, generator=g)
    torch.compiler.reset()
    ours = torch.compile(linear, fullgraph=True, dynamic=False)(x, weight, bias)
    assert ours.shape == (rows, 70)
    assert torch.allclose(ours, torch.nn.functional.linear(x, weight, bias), atol=1e-5)
