"""bench/bench.py on a tiny model: the matmul floor's chains compute what they claim, and a small run writes its
JSON and table. Correctness only; speed is never asserted."""

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lcdfast import cli
from lcdfast.checkpoint import load_model
from lcdfast.model import Linear

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("lcdfast_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.inference_mode()
def test_dependent_chain_feeds_each_product_the_last_output(tiny_dir):
    bench = load_bench()
    model = load_model(tiny_dir("opt-350m-style")[0])  # widths 32 -> 64 -> ...: cuts and zero-pads
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    torch.manual_seed(0)
    chains = bench.matmul_chains(model, batch=2)
    torch.manual_seed(0)
    y = torch.randn(2, weights[0].shape[1])
    for w in weights:
        n = w.shape[1]
        y = F.linear(y[:, :n] if y.shape[1] >= n else F.pad(y, (0, n - y.shape[1])), w)
    torch.testing.assert_close(chains["blas"](), y)
    torch.testing.assert_close(chains["compiled"](), y, rtol=1e-4, atol=1e-4)
    assert len(chains["independent"]()) == len(weights)


def test_small_run_writes_json_and_table(tiny_dir, tmp_path):
    """Through `lcdfast bench`, its options passed on as given."""
    model_dir = tiny_dir("llama-tied-gqa")[0]
    assert cli.main(["bench", "--model", str(model_dir), "--out", str(tmp_path), "--dtypes", "float32",
                     "--batches", "1", "--new-tokens", "6", "--methods", "greedy", "--repeats", "1", "--no-eager",
                     "--no-csrc"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    block = results["runs"]["float32 batch 1"]
    floors = block["floors"]
    assert floors["matmul_floor_ms"] == min(floors["blas_chain_ms"], floors["compiled_chain_ms"]) > 0
    assert floors["copy_floor_ms"] > 0 and floors["independent_chain_ms"] > 0
    engines = {row["engine"]: row for row in block["rows"]}
    assert set(engines) == {"lcdfast compiled", "transformers"}
    assert engines["lcdfast compiled"]["vs_greedy"] == 1.0
    assert engines["lcdfast compiled"]["decode_tok_s"] > 0 and engines["transformers"]["decode_tok_s"] > 0
    for row in block["rows"]:  # the floor timed next to each run, and the fraction from those pairs
        (paired,) = row["rounds"]
        assert paired["floor_ms"] > 0 and paired["decode_ms"] == row["decode_ms_per_step"]
        assert row["floor_fraction"] == paired["floor_ms"] / paired["decode_ms"]
    assert "| greedy | lcdfast compiled |" in (tmp_path / "results.md").read_text()
