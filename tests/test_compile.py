"""The compiled decode step: token-identical to eager, and no recompilation as the position grows."""

import contextlib
import os

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


OTHER_FAMILIES = [("acd", "qwen3-untied"), ("greedy", "qwen2-tied"), ("sample", "neox-parallel"),
                  ("dola", "neox-parallel"), ("acd", "gpt-neo"), ("acd", "gemma2-softcap"), ("dola", "gemma2-softcap"),
                  ("sample", "gemma3-untied"), ("sample", "phi3-partial-tied"), ("greedy", "gemma"),
                  ("greedy", "neox-sequential-tied")]


@pytest.mark.parametrize("name, kind", [(name, "llama-untied") for name in CONFIGS] + OTHER_FAMILIES)
def test_compiled_equals_eager_without_recompiling(name, kind, tiny_dir, monkeypatch):
    model = load_model(tiny_dir(kind)[0])
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


def generate_in_a_new_process(model, home, *options) -> tuple[dict, str]:
    """`lcdfast generate --json` in a fresh interpreter with LCDFAST_HOME=home: (its record, its stderr)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"LCDFAST_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "lcdfast.cli", "generate", "--model", str(model), "The quick brown",
                           "--max-new-tokens", "24", "--json", *options], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@pytest.mark.parametrize("options", [[], ["--method", "acd", "--amateur-layer", "1"]], ids=["greedy", "acd"])
def test_second_process_loads_the_saved_step(tiny_dir, tmp_path, options):
    """The compiled step is saved under $LCDFAST_HOME (compiling.SavedStep): a second process loads it instead of
    tracing it again, in less time, and decodes the same tokens as the first and as --no-compile. ACD's step holds
    torch.cond, which inductor's own caches skip: saved whole, it loads all the same."""
    model = tiny_dir("llama-tied-gqa")[0]
    first, err = generate_in_a_new_process(model, tmp_path, "--compile", *options)
    assert first["compiled"] and first["compile_loaded"] is False and first["compile_seconds"] > 0
    assert "compiled the decode step (" in err and "saved for later runs" in err
    assert any((tmp_path / "compile" / "inductor").iterdir())
    assert len(list((tmp_path / "compile" / "steps").iterdir())) == 1
    second, err = generate_in_a_new_process(model, tmp_path, "--compile", *options)
    assert second["compiled"] and second["compile_loaded"] is True and "loaded the decode step" in err
    assert second["compile_seconds"] < first["compile_seconds"]
    eager, _ = generate_in_a_new_process(model, tmp_path, "--no-compile", *options)
    assert not eager["compiled"] and eager["compile_seconds"] == 0
    assert first["token_ids"] == second["token_ids"] == eager["token_ids"]
    assert set(first) >= {"prefill_seconds", "compile_seconds", "decode_seconds"}


def test_saved_step_compiles_again_when_its_guards_fail(tiny_dir, tmp_path):
    """A saved step's file read for a model it was not compiled for (other shapes): its guards, checked on a
    generation's first step, fail, so the step is compiled again for this model, and decodes as eager does."""
    from lcdfast.compiling import SavedStep

    path, notices = tmp_path / "step.bin", []
    prompts = [[5, 9, 11, 4]]
    for kind in ("llama-untied", "llama-tied-gqa"):
        model = load_model(tiny_dir(kind)[0])
        step = SavedStep(decode_step, path, fallback=decode_step, notice=notices.append)
        eager, _, _, _ = generate_ids(model, prompts, CONFIGS["greedy"], 12, [])
        ours, _, _, _ = generate_ids(model, prompts, CONFIGS["greedy"], 12, [], step_fn=step,
                                     warmup=contextlib.nullcontext())
        assert ours == eager and step.fn is not None and not step.failed and not step.loaded, kind
        assert path.exists()
    assert notices == []


def test_saved_step_survives_a_bad_file_and_a_step_it_cannot_compile(tmp_path):
    from lcdfast.compiling import SavedStep

    notices = []
    (tmp_path / "torn.bin").write_bytes(b"not a saved step")
    assert SavedStep(decode_step, tmp_path / "torn.bin", decode_step, notices.append)._load() is None
    assert "torn.bin: saved step unreadable" in notices[-1]

    def breaks(x):
        torch._dynamo.graph_break()
        return x + 1

    step = SavedStep(breaks, tmp_path / "breaks.bin", fallback=lambda x: x * 10, notice=notices.append)
    assert step(torch.ones(2)).tolist() == [10.0, 10.0] and step.failed
    assert "the compiled step can't be saved or loaded" in notices[-1] and len(notices) == 2
    assert step(torch.ones(2)).tolist() == [10.0, 10.0] and len(notices) == 2  # said once
    assert not (tmp_path / "breaks.bin").exists()


def test_auto_compiles_only_where_it_pays_off(tiny_dir, tmp_path, monkeypatch, capsys):
    """Default: eager when the measured (or prior) saving can't repay the compile, said once; compiled once the
    timings say it pays; the same tokens either way."""
    import lcdfast
    from lcdfast import compiling

    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path))
    engine = lcdfast.load(tiny_dir("llama-tied-gqa")[0])
    engine.timings = compiling.StepTimings(tmp_path / "timings.json")
    runs = [engine.generate("The fox", max_new_tokens=20, method="acd") for _ in range(2)]
    assert not any(r[0].stats["compiled"] for r in runs)
    assert capsys.readouterr().err.count("decoding eagerly") == 1
    (key, record), = engine.timings.read().items()
    assert record["eager_ms"] > 0 and "B=1" in key and "method='acd'" in key
    engine.timings.update(key, eager_ms=1000.0, compiled_ms=1.0, warm_s=1.0)  # as if compiling saved a second a step
    compiled = engine.generate("The fox", max_new_tokens=20, method="acd")[0]
    assert compiled.stats["compiled"] and compiled.stats["compile_seconds"] > 0
    assert compiled.token_ids == runs[0][0].token_ids
    assert "compiled_ms" in engine.timings.get(key)


def test_saved_steps_keep_the_most_recently_used(tmp_path):
    from lcdfast.compiling import prune_saved

    for i, name in enumerate("abcd"):
        (tmp_path / f"{name}.bin").write_bytes(b"x")
        os.utime(tmp_path / f"{name}.bin", ns=(i * 10**9, (10 - i if name == "a" else i) * 10**9))  # "a" used last
    (tmp_path / "other.txt").write_text("not a step")
    prune_saved(tmp_path, keep=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.bin", "d.bin", "other.txt"]


def test_expected_costs_use_measurements_then_priors():
    from lcdfast.compiling import COLD_PRIOR_S, WARM_FRACTION, expected_costs

    assert expected_costs({}, "cpu", 10**9) == (COLD_PRIOR_S, pytest.approx(30.0))  # 100 ms eager at 10 GB/s, 30%
    assert expected_costs({"cold_s": 50.0, "eager_ms": 20.0}, "cpu", 1) == (50.0 * WARM_FRACTION, pytest.approx(6.0))
    measured = {"cold_s": 50.0, "warm_s": 4.0, "eager_ms": 20.0, "compiled_ms": 15.0}
    assert expected_costs(measured, "cpu", 1) == (4.0, 5.0)


def test_step_timings_keep_the_newest_and_survive_a_bad_file(tmp_path, monkeypatch):
    from lcdfast import compiling

    monkeypatch.setattr(compiling, "KEEP", 3)
    timings = compiling.StepTimings(tmp_path / "t.json")
    for k in "abcd":
        timings.update(k, eager_ms=1.0)
    timings.update("b", compiled_ms=2.0)
    assert list(timings.read()) == ["c", "d", "b"] and timings.get("b") == {"eager_ms": 1.0, "compiled_ms": 2.0}
    (tmp_path / "t.json").write_text("{torn")
    assert timings.get("b") == {}
    timings.update("e", eager_ms=3.0)
    assert timings.read() == {"e": {"eager_ms": 3.0}}


def test_compile_caches_fall_back_when_their_directory_cant_be_made(tmp_path, monkeypatch):
    from lcdfast import compiling

    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "-")  # recorded, so the variable is restored afterwards
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "compile").write_text("a file where the directory goes")
    notice = compiling.use_cache_dir()
    assert "compile/inductor: can't hold the compile caches" in notice and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    (tmp_path / "compile").unlink()
    assert compiling.use_cache_dir() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile/inductor")


def test_streamed_run_loads_its_saved_step_after_the_first_token(tiny_dir, tmp_path, monkeypatch):
    """A saved step that only loads does not hold back the first streamed token: it loads after the prefill's token
    is out (its time the run's compile_seconds), and decodes what the run that compiled it did."""
    import lcdfast

    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path))
    model = tiny_dir("llama-tied-gqa")[0]
    first = lcdfast.load(model, compile=True).generate("The fox", max_new_tokens=12)[0]
    engine = lcdfast.load(model, compile=True)
    loaded_at_first_token = []

    def stream(row: int, text: str) -> None:
        if not loaded_at_first_token:
            loaded_at_first_token.append(any(s.fn is not None for s in engine.saved_steps.values()))

    second = engine.generate("The fox", max_new_tokens=12, stream=stream)[0]
    assert loaded_at_first_token == [False], "the step loaded before the first token"
    assert second.stats["compile_loaded"] and second.stats["compile_seconds"] > 0
    assert second.token_ids == first.token_ids
