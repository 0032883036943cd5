"""Fitted lenses, trained exit heads, their files, special tokens out of the contrast, and the automatic layer."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import TEXT, build_tiny
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, run
from test_contrast import acd_reference

import lcdfast
from lcdfast import heads
from lcdfast.contrast import acd_log_probs, acd_log_probs_masked, cd_scores
from lcdfast.generate import DecodeConfig, contrast_scores


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Varied text for fitting: the tiny tokenizer's sentences shuffled word by word (about 3k tokens)."""
    rng = np.random.default_rng(0)
    words = TEXT.split()
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n")
    return path


@pytest.fixture(scope="module")
def lens_file(tiny_dir, data_file, tmp_path_factory):
    path, _ = tiny_dir("llama-untied")
    out = tmp_path_factory.mktemp("lens") / "lens.safetensors"
    engine = lcdfast.load(path, compile=False)
    fit = heads.fit_lens(engine, [data_file], tuple(range(engine.n_layers + 1)), max_tokens=4000, progress=False)
    heads.save_exit_heads(out, engine.model, "lens", fit["tensors"], fit["info"])
    return out, fit


def test_least_squares_equals_numpy(tiny_dir, data_file, lens_file):
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, compile=False)
    _, fit = lens_file
    texts = heads.read_texts([data_file])
    rows, _ = heads.split_dev(heads.token_rows(engine.tokenizer, texts, 4000 + heads.DEV_TOKENS))
    n = engine.n_layers
    with torch.inference_mode():
        h, _ = heads.hidden_states(engine.model, rows, tuple(range(n + 1)))
    h = h.reshape(n + 1, -1, h.shape[-1]).double().numpy()
    assert fit["info"]["tokens"] == rows.numel() > 4 * h.shape[-1]
    for layer in (0, 2, 5):
        x = np.concatenate([h[layer], np.ones((h.shape[1], 1))], axis=1)
        solution = np.linalg.lstsq(x, h[n], rcond=None)[0]  # [C+1, C]
        weight, bias = fit["tensors"][f"lens.{layer}.weight"].double(), fit["tensors"][f"lens.{layer}.bias"].double()
        assert np.allclose(weight.numpy(), solution[:-1].T, atol=1e-4), np.abs(weight.numpy() - solution[:-1].T).max()
        assert np.allclose(bias.numpy(), solution[-1], atol=1e-4)


def test_last_layer_lens_is_the_identity(lens_file):
    _, fit = lens_file
    n = max(fit["info"]["layers"])
    weight, bias = fit["tensors"][f"lens.{n}.weight"], fit["tensors"][f"lens.{n}.bias"]
    assert (weight - torch.eye(weight.shape[0])).abs().max() < 1e-4
    assert bias.abs().max() < 1e-4


def test_lens_file_round_trips_and_records_its_fit(tiny_dir, lens_file):
    out, fit = lens_file
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, compile=False)
    loaded = heads.load_exit_heads(out, engine.model)
    assert loaded.kind == "lens" and loaded.layers == list(range(engine.n_layers + 1))
    for layer, (weight, bias) in loaded.lens.items():
        assert torch.equal(weight, fit["tensors"][f"lens.{layer}.weight"])
        assert torch.equal(bias, fit["tensors"][f"lens.{layer}.bias"])
    meta = loaded.meta
    assert meta["objective"] == "lstsq" and int(meta["tokens"]) == fit["info"]["tokens"]
    assert loaded.auto_layer(engine.n_layers) == fit["info"]["auto_layer"]
    stats = json.loads(meta["layer_stats"])
    assert set(stats) == {str(j) for j in range(engine.n_layers + 1)} and stats[str(engine.n_layers)]["top1"] == 1.0


def damaged(tmp_path, source, change):
    tensors = load_file(str(source))
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
    change(tensors)
    out = tmp_path / "damaged.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("case,needles", [
    ("other-model", ["fitted on another model"]),
    ("shape", ["lens.2.weight", "(64, 8)", "(64, 64)"]),
    ("nan", ["lens.3.bias", "NaN"]),
    ("inf", ["lens.1.weight", "infinite"]),
    ("no-bias", ["layer 4", "bias"]),
    ("layer", ["lens.9.", "layer 9", "0..6"]),
    ("not-safetensors", ["cannot read exit heads"]),
    ("missing-layer", ["no lens for layer 3", "layers 0,1,2"]),
])
def test_bad_lens_files_are_one_line_errors(case, needles, tiny_dir, lens_file, tmp_path, capsys):
    out, _ = lens_file
    path, _ = tiny_dir("llama-untied")
    model_dir = path
    if case == "other-model":
        model_dir = tmp_path / "other"
        build_tiny("llama-untied", model_dir, seed=1)  # same config, other weights
        bad = out
    elif case == "not-safetensors":
        bad = tmp_path / "x.safetensors"
        bad.write_bytes(b"not a safetensors file")
    else:
        edits = {"shape": lambda t: t.update({"lens.2.weight": torch.zeros(64, 8)}),
                 "nan": lambda t: t["lens.3.bias"].__setitem__(0, math.nan),
                 "inf": lambda t: t["lens.1.weight"].__setitem__((0, 0), math.inf),
                 "no-bias": lambda t: t.pop("lens.4.bias"),
                 "layer": lambda t: t.update({"lens.9.weight": torch.zeros(64, 64), "lens.9.bias": torch.zeros(64)}),
                 "missing-layer": lambda t: [t.pop(k) for k in list(t) if not k.startswith(("lens.0.", "lens.1.",
                                                                                             "lens.2."))]}
        bad = damaged(tmp_path, out, edits[case])
    code, _, err = run(capsys, "generate", "--model", model_dir, "The", "--method", "acd", "--amateur-layer", "3",
                       "--exit-heads", bad, "--max-new-tokens", "2")
    assert_one_line_error(code, err, *needles)


def test_acd_through_a_lens_equals_the_reference_fed_the_lens_logits(tiny_dir, lens_file):
    out, _ = lens_file
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, compile=False)
    engine.set_exit_heads(out)
    model, layer = engine.model, 2
    ids = engine.tokenizer.encode("The quick brown fox jumps over")
    model.setup_caches(1, len(ids))
    with torch.inference_mode():
        final, exits = model(torch.tensor([ids]), torch.arange(len(ids)), torch.zeros(1, dtype=torch.long), (layer,))
        expert = model.logits(final[0]).float()  # [T, V]
        weight, bias = engine.exit_heads.lens[layer]
        # the lens logits by hand, in float64: A h + b, the final RMSNorm, the shared head
        h = exits[0, 0].double() @ weight.double().T + bias.double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.config.norm_eps) * model.norm.weight.double()
        amateur = h @ model.output.weight.double().T
        for candidates in (0, 8):
            dc = DecodeConfig("acd", exit_layers=(layer,), head_candidates=candidates, alpha=0.05)
            readout = engine._readout((layer,), str(out))
            ours = contrast_scores(model, final[0], exits[:, 0], None, readout, dc)[0]
            ref = acd_reference(expert, amateur, 0.05, 1)
            assert torch.allclose(ours.double(), ref, atol=1e-4), (ours.double() - ref).abs().max()
        shared = contrast_scores(model, final[0], exits[:, 0], None, None, dc)[0]
        assert not torch.allclose(shared, ours, atol=1e-3)  # the lens changed the amateur
    assert engine.layer_logits(ids, [layer])[0, 0].allclose(amateur.float(), atol=1e-4)


def test_lens_through_generate_score_and_the_lens_command(tiny_dir, lens_file, capsys):
    out, _ = lens_file
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, compile=False)
    shared = engine.generate("The fox", max_new_tokens=16, method="acd", amateur_layer=2)[0].token_ids
    lensed = engine.generate("The fox", max_new_tokens=16, method="acd", amateur_layer=2, exit_heads=out)[0].token_ids
    engine.set_exit_heads(out)
    assert engine.generate("The fox", max_new_tokens=16, method="acd", amateur_layer=2)[0].token_ids == lensed
    assert lensed != shared
    dola = engine.decode_config("dola", dola_layers=[1, 3])
    assert dola.exit_norm and dola.exit_heads == str(out.resolve())  # a lens is read through the final norm
    continuation = engine.tokenizer.decode(lensed[:8])  # tokens in V_head, where the amateur counts
    scores = engine.score_methods(["The fox"], [continuation], [{"method": "acd", "amateur_layer": 2},
                                                              {"method": "acd", "amateur_layer": 2, "exit_heads": ""}])
    assert scores[0] != scores[1]
    code, text, err = run(capsys, "lens", "--model", path, "The quick brown fox", "--exit-heads", out, "--json")
    assert code == 0, err
    view = json.loads(text)
    assert view["layers"] == list(range(7))


def test_fit_lens_command(tiny_dir, data_file, tmp_path, capsys):
    path, _ = tiny_dir("llama-tied-gqa")
    out = tmp_path / "lens.safetensors"
    code, text, err = run(capsys, "fit-lens", "--model", path, "--data", data_file, "--tokens", "1500",
                          "--layers", "1,2", "--refine-steps", "3", "--out", out)
    assert code == 0, err
    assert "2 lenses" in text and "automatic amateur layer" in text
    meta = heads.load_exit_heads(out, lcdfast.load(path).model).meta
    assert meta["objective"] == "lstsq+kl:3" and json.loads(meta["layers"]) == [1, 2]
    code, text, err = run(capsys, "generate", "--model", path, "The", "--method", "acd", "--amateur-layer", "auto",
                          "--exit-heads", out, "--max-new-tokens", "4", "--json")
    assert code == 0, err
    code, _, err = run(capsys, "fit-lens", "--model", path, "--data", tmp_path / "none.jsonl", "--out", out)
    assert_one_line_error(code, err, "none.jsonl", "not a file")
    code, _, err = run(capsys, "fit-lens", "--model", path, "--data", data_file, "--layers", "1,9", "--out", out)
    assert_one_line_error(code, err, "--layers", "9")


def test_refinement_lowers_the_kl(tiny_dir, data_file):
    path, _ = tiny_dir("llama-tied-gqa")
    engine = lcdfast.load(path, compile=False)
    rows = heads.token_rows(engine.tokenizer, heads.read_texts([data_file]), 2000)
    plain = heads.fit_lens(engine, [data_file], (1,), max_tokens=2000, progress=False)
    refined = heads.fit_lens(engine, [data_file], (1,), max_tokens=2000, refine_steps=30, progress=False)
    with torch.inference_mode():
        h, final = heads.hidden_states(engine.model, rows[:2], (1,), logits=True)

    def kl(fit):
        lens = (fit["tensors"]["lens.1.weight"], fit["tensors"]["lens.1.bias"])
        logp = heads.readout_logits(engine.model, h[0], lens).log_softmax(-1)
        target = final.log_softmax(-1)
        return (target.exp() * (target - logp)).sum(-1).mean().item()

    assert kl(refined) < kl(plain)


def test_train_heads_loss_falls_and_resumes_exactly(tiny_dir, data_file, tmp_path):
    path, _ = tiny_dir("llama-tied-gqa")
    engine = lcdfast.load(path, compile=False)
    common = dict(max_tokens=2000, tokens_per_step=256, lr=1e-2, progress=False)
    whole = heads.train_heads(engine, [data_file], (1, 3), tmp_path / "whole.safetensors", steps=8, **common)
    assert whole["losses"][-1] < whole["losses"][0]
    first = heads.train_heads(engine, [data_file], (1, 3), tmp_path / "resumed.safetensors", steps=3, **common)
    assert first["losses"] == whole["losses"][:3]  # (an interrupted run: its state file was written at step 3)
    resumed = heads.train_heads(engine, [data_file], (1, 3), tmp_path / "resumed.safetensors", steps=8, **common)
    assert resumed["losses"] == whole["losses"]
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert set(a) == {"lm_head_1.weight", "lm_head_3.weight"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_heads_command_and_trained_heads_in_generate(tiny_dir, data_file, tmp_path, capsys):
    path, _ = tiny_dir("llama-tied-gqa")
    out = tmp_path / "heads.safetensors"
    code, text, err = run(capsys, "train-heads", "--model", path, "--data", data_file, "--layers", "2",
                          "--tokens", "1024", "--tokens-per-step", "256", "--out", out)
    assert code == 0, err
    assert "per 100k tokens per layer" in text
    engine = lcdfast.load(path, compile=False)
    loaded = heads.load_exit_heads(out, engine.model)
    assert loaded.kind == "heads" and loaded.layers == [2] and loaded.auto_layer(engine.n_layers) is None
    code, text, err = run(capsys, "generate", "--model", path, "The", "--method", "acd", "--amateur-layer", "auto",
                          "--exit-heads", out, "--max-new-tokens", "4", "--json")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "--model", path, "The", "--method", "acd", "--amateur-layer", "1",
                       "--exit-heads", out, "--max-new-tokens", "4")
    assert_one_line_error(code, err, "no heads for layer 1", "layers 2")
    ids = engine.tokenizer.encode("The quick")
    engine.set_exit_heads(out)
    trained = engine.layer_logits(ids, [2])[0]
    engine.model.setup_caches(1, len(ids))
    with torch.inference_mode():
        _, exits = engine.model(torch.tensor([ids]), torch.arange(len(ids)), torch.zeros(1, dtype=torch.long), (2,))
        by_hand = engine.model.final_hidden(exits[0]) @ loaded.heads[2].T
    assert torch.allclose(trained, by_hand, atol=1e-5)


@pytest.mark.parametrize("candidates", [0, 16])
def test_special_tokens_keep_the_experts_probability(candidates):
    torch.manual_seed(0)
    V = 200
    expert, amateur_hidden = torch.randn(3, V) * 2, torch.rand(3, 16) + 0.5
    head = torch.randn(V, 16)
    head[2] = -4.0  # an end-of-turn token no lower layer predicts
    special = torch.zeros(V, dtype=torch.bool)
    special[[0, 1, 2]] = True
    expert[:, 2] = expert.max(-1).values + 1  # an end-of-turn token the expert likes: in V_head
    amateur = amateur_hidden @ head.T
    logp_e = expert.log_softmax(-1)

    def acd(special_mask):
        if candidates:
            return acd_log_probs_masked(expert, amateur_hidden, head, 0.1, 1, candidates, special_mask)
        return acd_log_probs(expert, amateur, 0.1, 1, special_mask)

    kept, reference = acd(special), acd(None)
    assert torch.allclose(kept[:, :3], logp_e[:, :3], atol=1e-6)  # special tokens keep p_e
    assert (reference[:, 2] > logp_e[:, 2] + 0.1).all()  # the reference formula promotes the token
    assert torch.allclose(kept.exp().sum(-1), torch.ones(3), atol=1e-5)
    head_set = logp_e >= logp_e.max(-1, keepdim=True).values + math.log(0.1)
    rest = head_set & ~special
    # the rest of V_head keeps its expert mass, redistributed by the contrast
    assert torch.allclose(kept.exp().where(rest, 0).sum(-1), logp_e.exp().where(rest, 0).sum(-1), atol=1e-5)
    cd = cd_scores(expert, amateur, 0.1, special=special)
    assert torch.allclose(cd.softmax(-1)[:, 2], logp_e.exp()[:, 2], atol=1e-6)  # CD: sampled with p_e too
    plain = cd_scores(expert, amateur, 0.1)
    assert torch.equal(cd.where(rest, 0), plain.where(rest, 0))  # the contrasted tokens keep their scores
    no_special = expert.clone()
    no_special[:, :3] = -50  # out of V_head: the reference scores exactly
    assert torch.equal(cd_scores(no_special, amateur, 0.1, special=special), cd_scores(no_special, amateur, 0.1))


def test_contrast_special_flag(tiny_dir, capsys):
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, compile=False)
    dc = engine.decode_config("acd", amateur_layer=2)
    assert set(dc.special_ids) == {0, 1, 2}  # <pad>, <s>, </s>
    assert engine.decode_config("acd", amateur_layer=2, contrast_special=True).special_ids == ()
    assert engine.decode_config("greedy").special_ids == ()
    for flag in ([], ["--contrast-special"]):
        code, out, err = run(capsys, "generate", "--model", path, "The", "--method", "acd", "--max-new-tokens", "3",
                             *flag)
        assert code == 0, err


def test_auto_layer_rule_is_deterministic(tiny_dir, lens_file, tmp_path, monkeypatch):
    stats = {0: {"top1": 0.2}, 1: {"top1": 0.7}, 2: {"top1": 0.6}, 3: {"top1": 0.9}, 4: {"top1": 1.0}}
    assert heads.auto_layer(stats, 4) == 1  # the lowest layer agreeing with the last on >= 2/3 of the tokens
    assert heads.auto_layer(dict(reversed(stats.items())), 4) == 1
    assert heads.auto_layer({0: {"top1": 0.1}, 2: {"top1": 0.5}, 4: {"top1": 1.0}}, 4) == 2  # none: the highest
    out, fit = lens_file
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, compile=False)
    stored = {int(k): v for k, v in fit["info"]["layer_stats"].items()}
    want = heads.auto_layer(stored, engine.n_layers)
    assert engine.decode_config("acd", amateur_layer="auto", exit_heads=out).exit_layers == (want,)
    # without a file: the shared head's statistics on the built-in dev text, kept under $LCDFAST_HOME
    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path))
    first = engine.decode_config("acd", amateur_layer="auto").exit_layers
    assert (tmp_path / "auto_layer.json").is_file()
    assert lcdfast.load(path, compile=False).decode_config("acd", amateur_layer="auto").exit_layers == first


def test_eval_method_specs_with_files(tiny_dir, lens_file):
    from lcdfast.evaluate import parse_methods

    out, _ = lens_file
    specs = parse_methods(f"acd:2@{out},acd:auto,acd:auto@{out},dola:high@{out},acd:3@shared,acd:2/cs=1,"
                          f"acd:4@{out}/rp=1.2/alpha=0.2", 6)
    assert specs[0].options == {"amateur_layer": 2, "exit_heads": str(out)}
    assert specs[1].options == {"amateur_layer": "auto"}
    assert specs[3].options == {"dola_layers": "high", "exit_heads": str(out)}
    assert specs[4].options == {"amateur_layer": 3, "exit_heads": ""}
    assert specs[5].options == {"amateur_layer": 2, "contrast_special": True}
    assert specs[6].options == {"amateur_layer": 4, "exit_heads": str(out), "repetition_penalty": 1.2, "alpha": 0.2}
    with pytest.raises(lcdfast.LcdError, match="greedy@"):
        parse_methods(f"greedy@{out}", 6)


def test_compiled_step_reads_the_lens_as_eager_does(tiny_dir, lens_file):
    out, _ = lens_file
    path, _ = tiny_dir("llama-untied")
    eager = lcdfast.load(path, compile=False)
    compiled = lcdfast.load(path, compile=True)
    for method, options in (("acd", {"amateur_layer": 2}), ("dola", {"dola_layers": [1, 3]})):
        want = eager.generate("The fox", max_new_tokens=10, method=method, exit_heads=out, **options)[0]
        got = compiled.generate("The fox", max_new_tokens=10, method=method, exit_heads=out, **options)[0]
        assert got.stats["compiled"] and got.token_ids == want.token_ids, method


def test_eval_with_lens_specs_end_to_end(tiny_dir, lens_file, tmp_path):
    from lcdfast.cli import main

    out, fit = lens_file
    model, _ = tiny_dir("llama-untied")
    prompts = tmp_path / "wikinews.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": " the quick brown fox"}) + "\n"
                               for p in ("The quick brown", "Layers improve")))
    auto = heads.auto_layer({int(k): v for k, v in fit["info"]["layer_stats"].items()}, 6)
    methods = f"greedy,acd:{auto}@{out},acd:auto@{out},dola:low@{out},acd:2@shared"
    assert main(["eval", "open-ended", "--prompts", str(prompts), "--methods", methods, "--max-new-tokens", "6",
                 "--no-mauve", "--model", str(model), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["wikinews"]["methods"]
    assert rows[f"acd:auto@{out}"]["options"]["amateur_layer"] == auto  # the layer it chose, run once
    assert rows[f"acd:auto@{out}"]["rep-2"] == rows[f"acd:{auto}@{out}"]["rep-2"]
    assert rows[f"dola:low@{out}"]["new_tokens"] > 0


@pytest.mark.parametrize("kind", ["qwen3-untied", "neox-parallel", "gpt-neo", "gemma2-softcap", "gemma3-untied",
                                  "phi3-window", "qwen2-untied", "gemma"])
def test_lenses_trained_heads_and_acd_on_every_family(kind, tiny_dir, data_file, tmp_path):
    """A lens and trained heads for each family: the last layer's lens is the identity, the heads' loss falls, and
    ACD through either (the masked candidates path too, soft-capped on Gemma 2) equals the float64 reference fed
    the exit logits that layer_logits reports."""
    path, _ = tiny_dir(kind)
    engine = lcdfast.load(path, compile=False)
    model, n, layer = engine.model, engine.n_layers, 1
    fit = heads.fit_lens(engine, [data_file], (layer, n), max_tokens=1500, progress=False)
    assert torch.allclose(fit["tensors"][f"lens.{n}.weight"], torch.eye(model.config.dim), atol=1e-4)
    files = [heads.save_exit_heads(tmp_path / "lens.safetensors", model, "lens", fit["tensors"], fit["info"])]
    trained = heads.train_heads(engine, [data_file], (layer,), tmp_path / "heads.safetensors", steps=4,
                                max_tokens=1200, tokens_per_step=256, lr=1e-2, progress=False)
    assert trained["losses"][-1] < trained["losses"][0]
    files.append(tmp_path / "heads.safetensors")
    ids = engine.tokenizer.encode("The quick brown fox jumps over")
    for file in files:
        engine.set_exit_heads(file)
        amateur = engine.layer_logits(ids, [layer])[0, 0]  # [T, V], through the file
        model.setup_caches(1, len(ids))
        with torch.inference_mode():
            final, exits = model(torch.tensor([ids]), torch.arange(len(ids)), torch.zeros(1, dtype=torch.long),
                                 (layer,))
            expert = model.logits(final[0]).float()
            for candidates in (0, 8):
                dc = DecodeConfig("acd", exit_layers=(layer,), head_candidates=candidates, alpha=0.05)
                ours = contrast_scores(model, final[0], exits[:, 0], None, engine._readout((layer,), str(file)), dc)[0]
                ref = acd_reference(expert.double(), amateur.double(), 0.05, 1)
                assert torch.allclose(ours.double(), ref, atol=1e-4), (kind, file.name, candidates)
        out = engine.generate("The quick", method="acd", amateur_layer=layer, max_new_tokens=6)[0]
        assert len(out.token_ids) == 6 or out.finish_reason == "eos"
    if model.config.final_softcap:  # exits read through the norm are capped like the final layer's
        assert amateur.abs().max() <= model.config.final_softcap
