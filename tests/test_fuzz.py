"""The fuzzer (bench/fuzz.py) in the suite: 300 seeded mutations of GGUF files written with the `gguf` package,
safetensors headers and tensors, config.json values, tokenizer and exit-heads files, each converted, loaded and used
in a worker process. Every one ends in finite output or one LcdError line, within a timeout, under the worker's
memory limit, with nothing written on error. A few go through the `lcdfast` command too. The long run, on demand:
`python bench/fuzz.py --cases 10000`."""

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import lcdfast
from lcdfast.convert import convert_gguf
from lcdfast.errors import LcdError

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("lcdfast_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(fuzz, tmp_path_factory):
    return fuzz.build_seeds(tmp_path_factory.mktemp("seeds"))


def test_fuzz_300_cases(fuzz):
    result = fuzz.fuzz(cases=300, seed=0, timeout=20, log=lambda line: None)
    assert not result["bad"], fuzz.table(result) + "".join(
        f"\ncase {b['case']} ({b['corpus']}: {b['mutation']}): {b['outcome']}\n{b['detail'][-1500:]}"
        for b in result["bad"][:3])
    total = sum(map(Counter, result["counts"].values()), Counter())
    assert set(result["counts"]) == set(fuzz.CORPORA) and total["ok"] >= 30 and total["error"] >= 150, total


def failing_case(fuzz, seeds, corpus: str, root: Path) -> tuple[Path, str]:
    """The first seeded case of `corpus` that conversion or loading refuses, and the LcdError's message."""
    for i in range(200):
        case = root / f"{corpus}-{i}"
        case.mkdir()
        fuzz.make_case(random.Random(f"cli:{i}"), seeds, case, corpus)
        try:
            if corpus.startswith("gguf"):
                convert_gguf(case / "model.gguf", case / "out", progress=False)
            else:
                lcdfast.load(case / "model", compile=False)
        except LcdError as e:
            return case, str(e)
        shutil.rmtree(case)
    raise AssertionError(f"no {corpus} case failed")


def lcdfast_cli(home: Path, *argv) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "lcdfast.cli", *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LCDFAST_HOME": str(home)}, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_on_fuzzed_files(fuzz, seeds, tmp_path):
    """The command says what the library says: exit 0, or exit 2 with the same LcdError as its one stderr line."""
    code, out, err = lcdfast_cli(tmp_path, "convert", seeds["gguf"], tmp_path / "tiny")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'tiny'}"), err
    code, out, err = lcdfast_cli(tmp_path, "generate", "--model", tmp_path / "tiny", fuzz.PROMPTS[0], "--method", "acd",
                                 "--amateur-layer", 0, "--max-new-tokens", 3, "--json")
    assert code == 0 and json.loads(out)["finish_reason"] in ("length", "eos"), err
    for corpus in ("gguf-meta", "safetensors", "config"):
        case, message = failing_case(fuzz, seeds, corpus, tmp_path)
        shutil.rmtree(case / "out", ignore_errors=True)
        argv = ["convert", case / "model.gguf", case / "out"] if corpus == "gguf-meta" else \
            ["generate", "--model", case / "model", "Hi", "--max-new-tokens", 2]
        code, out, err = lcdfast_cli(tmp_path, *argv)
        assert (code, out, err) == (2, "", f"lcdfast: error: {message}\n"), (corpus, message, err)
        assert not (case / "out").exists()


def test_worker_hang_and_crash_are_contained(fuzz, seeds, tmp_path):
    """A case past its timeout is a hang and one whose worker dies a crash; the next case gets a fresh worker."""
    worker, case, slow = fuzz.Worker(tmp_path / "home"), tmp_path / "case", tmp_path / "slow"
    case.mkdir()
    shutil.copytree(seeds["dirs"]["gpt2"], slow / "model")
    config = slow / "model" / "tokenizer_config.json"  # a chat template that loops until its 2 s are up
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": loop}))
    try:
        assert worker.run(case, 20)["outcome"] == "error"  # no model directory
        assert worker.run(slow, 1)["outcome"] == "hang" and worker.proc is None
        assert worker.run(slow, 20)["detail"].endswith("still running after 2s)")
        assert worker.run(case, 20)["outcome"] == "error"
        worker.proc.send_signal(signal.SIGABRT)
        worker.proc.wait()
        assert worker.run(case, 20) == {"outcome": "crash", "detail": f"the worker exited with code {-signal.SIGABRT}"}
    finally:
        worker.close()
