"""torch.distributed on 2 CPU ranks (gloo, loopback): data-parallel batch jobs and evaluations merge into what one
process writes, a killed rank's work resumes, and a tensor-parallel model decodes as one rank does."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_eval_e2e import TFQA

import lcdfast
from lcdfast.cli import main
from lcdfast.errors import LcdError
from lcdfast.evaluate import _merged, read_prompts, shard_file
from lcdfast.parallel import check_shardable

HERE = Path(__file__).parent
LAUNCH_TIMEOUT = 600
WORDS = "the quick brown fox jumps over lazy dog layers improve gradually contrast expert amateur".split()


def env(tmp_path: Path, **extra) -> dict:
    """One thread per rank as torchrun gives them, and the reference alike: sums in the same order."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "LCDFAST_HOME": str(tmp_path / "home"), **extra}


def torchrun(args: list, tmp_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    done = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_process(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, args)], env=env(tmp_path), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(path: Path) -> list[dict]:
    """A JSONL file's records without their timings (the one thing two runs may not share)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("seconds", None)
        out.append(rec)
    return out


def write_prompts(path: Path, n: int) -> Path:
    lines = [json.dumps({"prompt": " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 5)),
                         **({"id": f"p{i}"} if i % 3 else {})}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- data parallel ---------------------------------------------------------------------------------------------

def test_sharded_batch_job_equals_one_process(tiny_dir, tmp_path):
    model, _ = tiny_dir("llama-untied")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 11)
    job = ["generate", "--model", model, "--prompts-file", prompts, "--batch-size", 2, "--max-new-tokens", 6]
    for method in (["--method", "greedy"], ["--method", "acd", "--amateur-layer", 3],
                   ["--method", "sample", "--top-p", "0.9"]):
        one, two = tmp_path / f"one-{method[1]}.jsonl", tmp_path / f"two-{method[1]}.jsonl"
        one_process(["-m", "lcdfast", *job, *method, "--out", one], tmp_path)
        done = torchrun(["-m", "lcdfast", *job, *method, "--out", two], tmp_path)
        assert records(two) == records(one), method
        assert len(records(one)) == 11 and not list(tmp_path.glob("two-*.rank*"))
        assert done.stdout == "" and f"wrote {two}: 11 records" in done.stderr  # rank 0 reports, once


def test_sharded_eval_equals_one_process(tiny_dir, tmp_path):
    model, _ = tiny_dir("llama-untied")
    prompts = tmp_path / "wikinews.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i:i + 3]), "reference": " the quick brown fox"})
                               + "\n" for i in range(7)))
    (tmp_path / "TruthfulQA.csv").write_text(TFQA, encoding="utf-8")
    runs = [["open-ended", "--prompts", prompts, "--methods", "greedy,acd:2,dola:low", "--max-new-tokens", 6,
             "--no-mauve", "--batch-size", 2, "--no-compile"],
            ["truthfulqa", "--data", tmp_path / "TruthfulQA.csv", "--methods", "greedy,acd:3,dola:high"]]
    for argv in runs:
        for out, launch in (("one", one_process), ("two", torchrun)):
            launch(["-m", "lcdfast", "eval", *argv, "--model", model, "--out", tmp_path / out], tmp_path)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.jsonl"))
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.jsonl")) and len(files) == 4
    for name in files:
        one, two = records(tmp_path / "one" / name), records(tmp_path / "two" / name)
        assert [r["id"] for r in two] == [r["id"] for r in one], name
        if "TruthfulQA" in name:  # scores: the same sums, though each rank's cached few-shot prefix differs
            for a, b in zip(one, two):
                for m in a["methods"]:
                    assert b["methods"][m]["scores"] == pytest.approx(a["methods"][m]["scores"], rel=1e-5, abs=1e-5)
        else:
            assert two == one, name
    one, two = (json.loads((tmp_path / out / "summary.json").read_text()) for out in ("one", "two"))
    assert one["wikinews"]["methods"]["acd:2"]["rep-2"] == two["wikinews"]["methods"]["acd:2"]["rep-2"]
    assert one["TruthfulQA"]["methods"]["greedy"]["MC1"] == two["TruthfulQA"]["methods"]["greedy"]["MC1"]


def test_sharded_lm_eval_equals_one_process(tiny_dir, tmp_path):
    from test_harness import write_tasks

    model, _ = tiny_dir("llama-untied")
    tasks, shared = write_tasks(tmp_path)
    argv = ["-m", "lcdfast", "eval", "lm-eval", "--tasks", "lambada_openai,wikinews_rolling,tiny_gen",
            "--include-path", tasks, "--data-dir", shared, "--methods", "greedy,acd:2,dola:low", "--model", model,
            "--no-compile"]
    one_process([*argv, "--out", tmp_path / "one"], tmp_path)
    done = torchrun([*argv, "--out", tmp_path / "two"], tmp_path)
    one, two = (json.loads((tmp_path / out / "summary.json").read_text())["lm-eval"] for out in ("one", "two"))
    assert two["items_per_task"] == one["items_per_task"] == {"lambada_openai": 3, "wikinews_rolling": 3,
                                                               "tiny_gen": 3}
    for name, row in one["methods"].items():
        for task in ("lambada_openai", "wikinews_rolling", "tiny_gen"):
            assert two["methods"][name][task] == pytest.approx(row[task], rel=1e-6), (name, task)
    assert done.stdout.count("lm-eval: lm-eval (9 items)") == 1  # rank 0's table alone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_rank_resumes_without_loss_or_duplicates(tiny_dir, tmp_path):
    model, _ = tiny_dir("llama-untied")
    n = 40
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    job = ["-m", "lcdfast", "generate", "--model", model, "--prompts-file", prompts, "--batch-size", 1,
           "--max-new-tokens", 24, "--method", "dola", "--dola-layers", "low", "--no-compile"]
    one_process([*job, "--out", one], tmp_path)
    # two ranks started by hand (as torchrun starts them), so that one can be killed mid-run
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, *map(str, job), "--out", two], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env=env(tmp_path, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    shard = shard_file(two, 1)
    while not (shard.exists() and shard.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in ranks), "a rank ended before it was killed"
        time.sleep(0.05)
    for p in ranks[::-1]:  # rank 1 dies; torchrun would then stop rank 0 too
        p.send_signal(signal.SIGKILL)
        p.wait()
    left = [line for f in tmp_path.glob("two.jsonl*") for line in f.read_text().splitlines()]
    assert 2 <= len(left) < n, "the kill came before any record or after the last"
    torchrun([*job, "--out", two], tmp_path)
    ids = [r["id"] for r in records(two)]
    assert len(ids) == len(set(ids)) == n
    assert records(two) == records(one)
    assert not list(tmp_path.glob("two.jsonl.*"))


def test_merge_keeps_each_record_once_in_item_order(tmp_path):
    path = tmp_path / "out.jsonl"
    items = [{"id": str(i)} for i in range(4)]
    path.write_text(json.dumps({"id": "2", "v": "old"}) + "\n" + json.dumps({"id": "9", "v": "earlier run"}) + "\n")
    shard_file(path, 0).write_text(json.dumps({"id": "0", "v": 0}) + "\n" + json.dumps({"id": "2", "v": "new"}) + "\n")
    shard_file(path, 1).write_text(json.dumps({"id": "1", "v": 1}) + "\n" + '{"id": "3", "v"')  # torn by a kill
    assert _merged(path, items, None) is None
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": "0", "v": 0}, {"id": "1", "v": 1}, {"id": "2", "v": "new"}, {"id": "9", "v": "earlier run"}]
    assert not list(tmp_path.glob("out.jsonl.*"))
    shard_file(path, 0).write_text("[1, 2]\n{}\n")
    assert "is not a record" in _merged(path, items, None)


def test_batch_job_inputs_are_checked(tiny_dir, tmp_path, capsys):
    model, _ = tiny_dir("llama-tied-gqa")
    good = write_prompts(tmp_path / "p.jsonl", 3)
    (tmp_path / "text.txt").write_text("a plain prompt\n\n\"a JSON string\"\n")
    assert [it["prompt"] for it in read_prompts(tmp_path / "text.txt")] == ["a plain prompt", "a JSON string"]
    cases = {
        "bad.jsonl": ('{"prompt": "ok"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
        "noprompt.jsonl": ('{"text": "x"}\n', "noprompt.jsonl:1: expected a non-empty string 'prompt'"),
        "dup.jsonl": ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n', "id '1' already on line 1"),
        "empty.jsonl": ("\n", "empty.jsonl: no prompts"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LcdError, match=message):
            read_prompts(tmp_path / name)
    for argv, message in [
        (["generate", "hi", "--prompts-file", good, "--out", tmp_path / "o.jsonl"], "not both"),
        (["generate", "--prompts-file", good], "--prompts-file and --out go together"),
        (["generate", "--prompts-file", tmp_path / "missing.jsonl", "--out", tmp_path / "o.jsonl"], "is not a file"),
        (["generate"], "give a prompt"),
        (["generate", "hi", "--tp", 2], "--tp 2: this process is one of 1 (launch with torchrun"),
    ]:
        assert main([*map(str, argv), "--model", str(model)]) == 2
        assert message in capsys.readouterr().err


# ---- tensor parallel -------------------------------------------------------------------------------------------

def padded_vocab_model(src: Path, out: Path) -> Path:
    """`src` (a tied LLaMA) with one more vocabulary row than the tokenizer: 321 rows do not split evenly over 2."""
    out.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = torch.cat([emb, torch.randn(1, emb.shape[1]) * 0.3])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    return out


@pytest.mark.parametrize("kind, compiled", [
    ("llama-tied-gqa", "greedy,acd,dola-high"),
    ("gpt2", "dola-low"),
    ("opt", "acd"),
    ("llama-padded", ""),
    ("llama-odd-heads", ""),
])
def test_tensor_parallel_decodes_as_one_rank(tiny_dir, tmp_path, kind, compiled):
    import tp_worker

    if kind == "llama-padded":
        model = padded_vocab_model(tiny_dir("llama-tied-gqa")[0], tmp_path / "padded")
    else:
        model = tiny_dir(kind)[0]
    os.environ.setdefault("LCDFAST_HOME", str(tmp_path / "home"))
    names = list(tp_worker.METHODS)
    reference = tp_worker.run(lcdfast.load(model, compile=False), names)
    runs = [("eager", names)] + ([("compiled", compiled.split(","))] if compiled else [])
    for mode, methods in runs:
        out = tmp_path / f"tp-{mode}.json"
        torchrun([HERE / "tp_worker.py", model, out, 2, int(mode == "compiled"), ",".join(methods)], tmp_path)
        split = json.loads(out.read_text())
        assert torch.allclose(torch.tensor(split["logits"]), torch.tensor(reference["logits"]), atol=1e-4, rtol=0)
        for name in methods:
            assert split[name] == reference[name], f"{kind} {mode} {name}"
            assert split["compiled"][name] == (mode == "compiled"), f"{kind} {mode} {name}: fell back"


def test_tensor_parallel_refuses_what_does_not_split(tiny_dir):
    engine = lcdfast.load(tiny_dir("llama-tied-gqa")[0])
    with pytest.raises(LcdError, match="--tp 3: the model's 2 key/value heads can't give each of 3 ranks one"):
        check_shardable(engine.model, 3)
    engine.model.quantization = "int8"
    with pytest.raises(LcdError, match=r"--tp 2: quantized weights \(int8\)"):
        check_shardable(engine.model, 2)
