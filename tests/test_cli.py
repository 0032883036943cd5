"""The CLI and API on tiny checkpoints: outputs, options, and one-line errors (exit code 2) for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, build_tiny
from safetensors.torch import load_file, save_file

import lcdfast
from lcdfast.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcdfast: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_generate_json(tiny_dir, capsys):
    path, _ = tiny_dir("llama-untied")
    code, out, err = run(capsys, "generate", "--model", path, "The fox", "Layers improve", "--max-new-tokens", 8,
                         "--json", "--method", "dola", "--dola-layers", "low")
    assert code == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in records] == ["The fox", "Layers improve"]
    for r in records:
        assert set(r) >= {"prompt", "text", "token_ids", "new_tokens", "seconds", "dola_layers"}
        assert r["new_tokens"] == len(r["token_ids"]) and 1 <= r["new_tokens"] <= 8
        assert set(r["dola_layers"]) <= {0, 2} and len(r["dola_layers"]) == r["new_tokens"]


def test_generate_streams_the_same_text(tiny_dir, capsys):
    path, _ = tiny_dir("gpt2")
    code, out, err = run(capsys, "generate", "--model", path, "The quick", "--max-new-tokens", 12)
    assert code == 0, err
    engine = lcdfast.load(path)
    assert out == "The quick" + engine.generate("The quick", max_new_tokens=12)[0].text + "\n"


def test_api_generate_options(tiny_dir):
    path, _ = tiny_dir("llama-tied-gqa")
    engine = lcdfast.load(path)
    greedy = engine.generate(["The fox", "Contrastive"], max_new_tokens=10)
    assert all(len(r.token_ids) <= 10 and r.text == engine.tokenizer.decode(r.token_ids) for r in greedy)
    a = engine.generate("The fox", max_new_tokens=10, method="sample", seed=1, top_k=20, top_p=0.9)
    b = engine.generate("The fox", max_new_tokens=10, method="sample", seed=1, top_k=20, top_p=0.9)
    assert a[0].token_ids == b[0].token_ids
    acd = engine.generate("The fox", max_new_tokens=10, method="acd", amateur_layer=1, do_sample=True, seed=2)
    assert len(acd[0].token_ids) <= 10
    chat = engine.generate("hello", max_new_tokens=4, chat=True)[0]
    assert chat.prompt_tokens == len(engine.tokenizer.encode("<s>user: hello</s><s>assistant: ",
                                                             add_special_tokens=False))


@pytest.mark.parametrize("call, needle", [
    (lambda e: e.generate(None), "prompts"), (lambda e: e.generate([]), "prompts"),
    (lambda e: e.generate("x", max_new_tokens=2.5), "max_new_tokens: 2.5"),
    (lambda e: e.generate("x", method="acd", amateur_layer=1.5), "amateur_layer: 1.5"),
    (lambda e: e.generate("x", temperature="1"), "temperature: '1'"),
    (lambda e: e.generate("x", stop=[""]), "stop"),
    (lambda e: e.score(["a"], [""]), "adds no token"),
    (lambda e: e.score(["a"], ["b"], batch_size=0), "batch_size: 0"),
    (lambda e: e.score(["a"], ["b"], method="dola", relative_top_value=float("nan")), "relative_top_value"),
    (lambda e: e.lens("x", last=0), "last: 0"),
])
def test_api_bad_values_name_the_argument(call, needle, tiny_dir):
    engine = lcdfast.load(tiny_dir("llama-tied-gqa")[0])
    with pytest.raises(lcdfast.LcdError, match=needle):
        call(engine)


def test_api_stop_given_as_one_string(tiny_dir):
    engine = lcdfast.load(tiny_dir("llama-tied-gqa")[0])
    full = engine.generate("The fox", max_new_tokens=24)[0].text
    cut = full[3:9]
    assert cut and engine.generate("The fox", max_new_tokens=24, stop=cut)[0].text == full[:full.find(cut)]


def test_stop_string_cuts_the_text(tiny_dir):
    engine = lcdfast.load(tiny_dir("llama-untied")[0])
    full = engine.generate("The", max_new_tokens=20)[0]
    stop = full.text[3:6]
    assert stop and stop in full.text
    cut = engine.generate("The", max_new_tokens=20, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_exit_heads(tiny_dir, tmp_path, capsys):
    path, hf = tiny_dir("llama-untied")
    engine = lcdfast.load(path)
    shared = hf.lm_head.weight.detach()
    save_file({"lm_head_3.weight": shared.clone()}, str(tmp_path / "same.safetensors"))
    save_file({"lm_head_3.weight": torch.randn_like(shared)}, str(tmp_path / "other.safetensors"))
    save_file({"lm_head_3.weight": torch.randn(VOCAB, 8)}, str(tmp_path / "bad.safetensors"))
    base = engine.generate("The fox", max_new_tokens=12, method="acd", amateur_layer=3)[0].token_ids
    engine.set_exit_heads(tmp_path / "same.safetensors")
    assert engine.generate("The fox", max_new_tokens=12, method="acd", amateur_layer=3)[0].token_ids == base
    ids = engine.tokenizer.encode("The fox jumps")
    assert torch.allclose(engine.layer_logits(ids, [3])[0], lcdfast.load(path).layer_logits(ids, [3])[0], atol=1e-5)
    engine.set_exit_heads(tmp_path / "other.safetensors")
    assert not torch.allclose(engine.layer_logits(ids, [3])[0], lcdfast.load(path).layer_logits(ids, [3])[0])
    capsys.readouterr()  # the API's own notices
    code, _, err = run(capsys, "generate", "--model", path, "x", "--exit-heads", tmp_path / "bad.safetensors")
    assert_one_line_error(code, err, "bad.safetensors", "lm_head_3.weight", "(320, 8)")


def test_lens(tiny_dir, capsys):
    path, _ = tiny_dir("llama-untied")
    code, out, err = run(capsys, "lens", "--model", path, "The quick brown fox", "--json", "--last", 3)
    assert code == 0, err
    view = json.loads(out)
    assert view["layers"] == list(range(7)) and len(view["top_tokens"]) == 7
    assert all(len(row) == 3 and all(0 < p <= 1 for p in row) for row in view["top_probs"])
    code, out, err = run(capsys, "lens", "--model", path, "The quick brown fox")
    assert code == 0 and "layer" in out


@pytest.fixture
def broken(tmp_path):
    """A fresh copy of a tiny checkpoint to damage."""
    build_tiny("llama-tied-gqa", tmp_path / "m")
    return tmp_path / "m"


def test_bad_checkpoints(broken, capsys):
    cfg = broken / "config.json"
    good = cfg.read_text()
    cfg.write_text("{not json")
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "config.json", "not valid JSON")
    cfg.write_text(json.dumps({**json.loads(good), "model_type": "mamba"}))
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "model_type 'mamba'")
    cfg.unlink()
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "config.json", "not found")
    cfg.write_text(good)
    weights = broken / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights))
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "model.layers.1.mlp.up_proj.weight")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "model.safetensors")
    weights.unlink()
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "no model.safetensors")
    assert_one_line_error(*run(capsys, "generate", "--model", broken / "nope", "x")[::2], "nope")


def test_wrong_tensor_shape(broken, capsys):
    weights = broken / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, str(weights))
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "model.norm.weight", "(7,)")


@pytest.mark.parametrize("args,needles", [
    (["--top-p", "0"], ["top_p", "(0, 1]"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--temperature", "-1"], ["temperature", "-1"]),
    (["--method", "acd", "--amateur-layer", "6"], ["amateur_layer", "0..5"]),
    (["--method", "acd", "--amateur-layer", "-1"], ["amateur_layer"]),
    (["--amateur-layer", "99"], ["amateur_layer", "0..5"]),
    (["--method", "acd", "--dola-layers", "abc"], ["dola_layers", "abc"]),
    (["--method", "acd", "--alpha", "0"], ["alpha", "(0, 1]"]),
    (["--method", "acd", "--alpha", "1.5"], ["alpha"]),
    (["--method", "dola", "--dola-layers", "7,9"], ["dola_layers", "layer 7 outside 0..5"]),
    (["--method", "dola", "--dola-layers", "1,99"], ["dola_layers", "layer 99"]),
    (["--repetition-penalty", "nan"], ["repetition_penalty"]),
    (["--method", "cd", "--beta", "nan"], ["beta"]),
    (["--temperature", "inf"], ["temperature"]),
    (["--stop", ""], ["stop"]),
    (["--method", "sample", "--seed", str(2**70)], ["seed"]),
    (["--method", "dola", "--dola-layers", "a,b"], ["dola_layers"]),
    (["--method", "cd"], ["amateur"]),
    (["--method", "beam"], ["method", "beam"]),
    (["--max-new-tokens", "0"], ["max_new_tokens"]),
    (["--max-new-tokens", "5000"], ["cache", "4096"]),
    (["--dtype", "int3"], ["dtype", "int3"]),
])
def test_bad_arguments(args, needles, tiny_dir, capsys):
    path, _ = tiny_dir("llama-untied")
    code, _, err = run(capsys, "generate", "--model", path, "The fox", *args)
    assert_one_line_error(code, err, *needles)


def test_prompt_longer_than_cache(tiny_dir, capsys):
    path, _ = tiny_dir("gpt2")  # learned positions: the cache holds n_positions = 256 tokens
    code, out, err = run(capsys, "generate", "--model", path, "The fox " * 300)
    assert_one_line_error(code, err, "prompt", "256")
    assert out == ""  # a streamed prompt is printed only once its text starts


def test_amateur_with_another_vocabulary(tiny_dir, tmp_path, capsys):
    path, _ = tiny_dir("llama-untied")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir("llama-amateur")[0], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = VOCAB + 8
    (other / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = torch.randn(VOCAB + 8, 32)
    save_file(tensors, str(other / "model.safetensors"))
    code, _, err = run(capsys, "generate", "--model", path, "x", "--method", "cd", "--amateur-model", other)
    assert_one_line_error(code, err, "amateur", "vocab_size 328", "320")


def test_cd_from_the_cli(tiny_dir, capsys):
    path, _ = tiny_dir("llama-untied")
    amateur, _ = tiny_dir("llama-amateur")
    code, out, err = run(capsys, "generate", "--model", path, "The fox", "--method", "cd", "--amateur-model",
                         amateur, "--max-new-tokens", 6, "--json", "--beta", "0.5")
    assert code == 0, err
    assert json.loads(out)["new_tokens"] >= 1
    gpt2, _ = tiny_dir("gpt2")  # 256 learned positions
    code, _, err = run(capsys, "generate", "--model", path, "The fox", "--method", "cd", "--amateur-model", gpt2,
                       "--max-new-tokens", 300)
    assert_one_line_error(code, err, "max_new_tokens", "amateur model's 256 positions")
    engine = lcdfast.load(path)
    engine.set_amateur(gpt2)
    with pytest.raises(lcdfast.LcdError, match="exceed 256"):
        engine.score(["The fox " * 300], [" jumps"], method="cd")
    with pytest.raises(lcdfast.LcdError, match="amateur model: expected a directory path, got None"):
        engine.set_amateur(None)


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcdfast.cli", "generate", "--model", str(tmp_path), "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "config.json" in proc.stderr


def test_generate_with_csrc_ops(tiny_dir, capsys, monkeypatch):
    """--csrc builds and turns on the C++ ops (or says why not, once) and gives the same tokens."""
    from lcdfast import kernels

    path, _ = tiny_dir("llama-untied")
    argv = ["generate", "--model", path, "The fox", "Layers improve", "--max-new-tokens", 8, "--json", "--method",
            "dola", "--dola-layers", "low"]
    code, plain, err = run(capsys, *argv)
    assert code == 0, err
    monkeypatch.setattr(kernels, "_enabled", False)  # put back after the test
    code, out, err = run(capsys, *argv, "--csrc")
    assert code == 0 and kernels._enabled
    if not kernels.load():
        assert len(err.strip().splitlines()) == 1 and "csrc kernel not built" in err
    tokens = [json.loads(line)["token_ids"] for line in out.strip().splitlines()]
    assert tokens == [json.loads(line)["token_ids"] for line in plain.strip().splitlines()]


@pytest.mark.parametrize("command, needle", [("bench", "--quick"), ("eval", "truthfulqa")])
def test_bench_and_eval_take_their_own_options(command, needle, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and needle in capsys.readouterr().out


def test_bench_serve_runs_the_serve_bench(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "serve", "--help"])
    assert done.value.code == 0 and "--clients" in capsys.readouterr().out


def test_checkpoint_that_disagrees_with_its_config(broken, capsys):
    """Weights the config doesn't describe, or a config no model can have: one line, never a quiet partial load."""
    cfg, weights = broken / "config.json", broken / "model.safetensors"
    good_cfg, good = json.loads(cfg.read_text()), load_file(str(weights))

    def check(config: dict, tensors: dict, *needles: str) -> None:
        cfg.write_text(json.dumps(config))
        save_file(tensors, str(weights))
        assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], *needles)

    check({**good_cfg, "num_hidden_layers": 2}, good, "unexpected tensor 'model.layers.2.", "2 layers")
    check(good_cfg, {**good, "model.extra.weight": torch.ones(3)}, "unexpected tensor 'model.extra.weight'")
    check(good_cfg, {**good, "model.norm.weight": torch.ones(64, dtype=torch.int32)}, "model.norm.weight", "int32")
    for key, value, needle in [("num_hidden_layers", 0, "n_layers"), ("num_hidden_layers", "six", "n_layers"),
                               ("num_attention_heads", 0, "n_heads"), ("num_key_value_heads", 3, "key/value"),
                               ("rope_scaling", {"rope_type": "linear"}, "factor"),
                               ("rope_scaling", "linear", "rope_scaling"), ("hidden_size", None, "'hidden_size'"),
                               ("eos_token_id", "x", "eos_token_id 'x'")]:
        check({**good_cfg, key: value}, good, "config.json", needle)
    cfg.write_text(json.dumps(good_cfg))
    (broken / "generation_config.json").write_text(json.dumps({"eos_token_id": "abc"}))
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "generation_config.json: eos_token_id")
    build_tiny("gpt2", broken / "gpt2")
    gpt2_cfg = broken / "gpt2" / "config.json"
    gpt2_good = json.loads(gpt2_cfg.read_text())
    for key, value, needle in [("scale_attn_weights", False, "scale_attn_weights"), ("n_head", 0, "n_heads")]:
        gpt2_cfg.write_text(json.dumps({**gpt2_good, key: value}))
        assert_one_line_error(*run(capsys, "generate", "--model", broken / "gpt2", "x")[::2], needle)
    cfg.write_text(json.dumps(good_cfg))
    save_file(good, str(weights))
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": 5}}))
    assert_one_line_error(*run(capsys, "generate", "--model", broken, "x")[::2], "index.json", "weight_map")


def test_layer_logits_in_the_order_asked(tiny_dir):
    engine = lcdfast.load(tiny_dir("llama-untied")[0])
    ids = engine.tokenizer.encode("The quick brown fox")
    every = engine.layer_logits(ids)  # layers 0..6
    picked = engine.layer_logits(ids, [4, 1, 6, 4])
    assert torch.equal(picked, every[[4, 1, 6, 4]])
    for bad, needle in [([], "layers: empty"), ([7], "layers: 7")]:
        with pytest.raises(lcdfast.LcdError, match=needle):
            engine.layer_logits(ids, bad)
    with pytest.raises(lcdfast.LcdError, match=f"token id {VOCAB}"):
        engine.layer_logits([3, VOCAB])


@pytest.mark.parametrize("last", [1, 2, 50])
def test_lens_next_token_of_each_position(last, tiny_dir):
    engine = lcdfast.load(tiny_dir("llama-untied")[0])
    prompt = "The quick brown fox"
    pieces = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in engine.tokenizer.encode(prompt)]
    view = engine.lens(prompt, last=last)
    shown = min(last, len(pieces))
    assert view["positions"] == pieces[-shown:]
    assert view["next_of_position"] == pieces[len(pieces) - shown + 1:] + [None]
    assert len(view["top_tokens"][0]) == shown
