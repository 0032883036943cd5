"""ACD, DoLa and CD: against float64 re-derivations, transformers' DoLa, and direct two-model computation."""

import math

import pytest
import torch
from conftest import VOCAB
from test_models import first_diff

from lcdfast.api import dola_candidates
from lcdfast.checkpoint import load_model
from lcdfast.contrast import acd_log_probs, acd_log_probs_masked, cd_scores, js_divergence, plausible_mask
from lcdfast.errors import LcdError
from lcdfast.generate import DecodeConfig, ScoreConfig, generate_ids, score_ids


def acd_reference(expert: torch.Tensor, amateur: torch.Tensor, alpha: float, keep: int) -> torch.Tensor:
    """autocontrastive-gen's formula re-derived in float64, one row at a time, with plain Python loops."""
    out = torch.empty_like(expert, dtype=torch.float64)
    for r in range(expert.shape[0]):
        pe = expert[r].double().softmax(-1)
        pa = amateur[r].double().softmax(-1)
        order = sorted(range(len(pe)), key=lambda i: -pe[i].item())
        threshold = min(alpha * pe.max().item(), pe[order[keep - 1]].item())
        head = [i for i in range(len(pe)) if pe[i].item() >= threshold]
        s = {i: math.log(pe[i].item()) - math.log(pa[i].item()) for i in head}
        z = max(s.values())
        denom = sum(math.exp(v - z) for v in s.values())
        mass = sum(pe[i].item() for i in head)
        for i in range(len(pe)):
            q = math.exp(s[i] - z) / denom * mass if i in s else pe[i].item()
            out[r, i] = math.log(q)
    return out


@pytest.mark.parametrize("case", ["peaked", "flat", "ties", "alpha1", "keep5"])
def test_acd_matches_float64_reference(case):
    torch.manual_seed(0)
    V, alpha, keep = 600, 0.1, 1
    expert, amateur = torch.randn(3, V) * 4, torch.randn(3, V) * 4
    if case == "flat":  # hundreds of plausible tokens
        expert = torch.randn(3, V) * 0.3
    elif case == "ties":
        expert = torch.randint(0, 4, (3, V)).float()
        amateur[:, :10] = amateur[:, 10:20]
    elif case == "alpha1":
        alpha = 1.0
    elif case == "keep5":
        alpha, keep = 1.0, 5
    ours = acd_log_probs(expert, amateur, alpha, keep)
    ref = acd_reference(expert, amateur, alpha, keep)
    head = plausible_mask(expert.log_softmax(-1), alpha, keep)
    if case == "flat":
        assert head.sum(-1).min() > 200
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours.double() - ref).abs().max()
    assert torch.allclose(ours.exp().sum(-1), torch.ones(3), atol=1e-5)  # a normalized distribution


def test_plausible_mask_keeps_min_tokens():
    logp = torch.tensor([[0.0, -1.0, -5.0, -9.0]]).log_softmax(-1)
    assert plausible_mask(logp, 0.1).tolist() == [[True, True, False, False]]
    assert plausible_mask(logp, 1.0, 3).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("kind,layers", [("llama-untied", "low"), ("llama-untied", "high"),
                                         ("llama-untied", [1, 2, 4]), ("gpt2", "low"), ("gpt2", "high"),
                                         ("gpt2", [0, 2, 3, 4]), ("llama-tied-gqa", [1, 3]), ("qwen2-untied", "high"),
                                         ("qwen3-untied", "low"), ("qwen3-tied-bias", [0, 2]),
                                         ("neox-parallel", "high"), ("neox-sequential-tied", [1, 2]),
                                         ("gpt-neo", "low"), ("gemma", "high"), ("gemma2-softcap", [0, 2]),
                                         ("gemma3-untied", "low"), ("phi3-window", [1, 2]), ("phi3-partial-tied", [1])])
def test_dola_greedy_matches_transformers(kind, layers, tiny_dir):
    path, hf = tiny_dir(kind)
    model = load_model(path)
    candidates = dola_candidates(layers, model.config.n_layers, model.config.tie_embeddings)
    dc = DecodeConfig(method="dola", exit_layers=candidates, exit_norm=False, repetition_penalty=1.2,
                      dola_batch_mode=True)
    for seed in range(3):
        torch.manual_seed(seed)
        prompt = torch.randint(3, VOCAB, (1, 6))
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                          dola_layers=layers, repetition_penalty=1.2, eos_token_id=None,
                          pad_token_id=0)[0, 6:].tolist()
        out, _, chosen, _ = generate_ids(model, [prompt[0].tolist()], dc, 32, [])
        assert out[0] == ref, f"{kind} {layers} seed {seed}: " + first_diff(out[0], ref)
        assert set(chosen[0]) <= set(candidates)


def test_dola_candidate_buckets():
    assert dola_candidates("low", 30, True) == (2, 4, 6, 8, 10, 12, 14)
    assert dola_candidates("high", 30, True) == (15, 17, 19, 21, 23, 25, 27, 29)
    assert dola_candidates("low", 48, False) == tuple(range(0, 20, 2))
    assert dola_candidates("high", 48, False) == tuple(range(28, 48, 2))
    assert dola_candidates("low", 4, True) == (2,)
    assert dola_candidates("low", 2, True) == (1,)
    assert dola_candidates("5,3,5", 30, True) == (3, 5)  # in the order the model yields its exits, once each
    for bad in ("3,5,99", "30", "-1,2"):
        with pytest.raises(LcdError, match="dola_layers: layer"):
            dola_candidates(bad, 30, True)


@pytest.mark.parametrize("compiled", [False, True])
def test_js_divergence_is_dolas_formula(compiled):
    """0.5 * (KL(m || p) + KL(m || q)), each averaged over V, as transformers' DoLa: float64 reference."""
    torch.manual_seed(4)
    spread = torch.tensor([0.1, 1, 3, 8, 20, 40])[:, None, None]  # near-uniform to near-one-hot layers
    final, layers = torch.randn(3, 5000) * 4, torch.randn(6, 3, 5000) * spread
    layers[2, 1] = final[1]  # identical distributions: 0
    p, q = final.double().softmax(-1)[None], layers.double().softmax(-1)
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (a.log() - b.log())).nan_to_num(0.0).mean(-1)  # noqa: E731
    want = 0.5 * (kl(m, p) + kl(m, q))
    fn = torch.compile(js_divergence, fullgraph=True, dynamic=False) if compiled else js_divergence
    got = fn(final, layers)
    assert got.shape == (6, 3)
    assert (got.double() - want).abs().max().item() < 1e-6 * want.abs().max().item() + 1e-9
    assert got[2, 1].abs().item() < 1e-8


@pytest.mark.parametrize("expert_kind, amateur_kind", [("llama-tied-gqa", "llama-amateur"),
                                                       ("gemma2-softcap", "gemma"), ("qwen3-untied", "qwen2-tied")])
def test_cd_matches_direct_computation(expert_kind, amateur_kind, tiny_dir):
    expert_path, expert_hf = tiny_dir(expert_kind)
    amateur_path, amateur_hf = tiny_dir(amateur_kind)
    expert, amateur = load_model(expert_path), load_model(amateur_path)
    torch.manual_seed(5)
    prompt = torch.randint(3, VOCAB, (8,)).tolist()
    for beta, tau in [(None, 1.0), (None, 0.5), (0.5, 1.0)]:
        dc = DecodeConfig(method="cd", alpha=0.1, beta=beta, amateur_temperature=tau)
        out, _, _, _ = generate_ids(expert, [prompt], dc, 12, [], amateur=amateur)
        seq = list(prompt)
        for _ in range(12):  # direct: full forward of both transformers models on the whole sequence
            ids = torch.tensor([seq])
            with torch.no_grad():
                ze, za = expert_hf(ids).logits[0, -1], amateur_hf(ids).logits[0, -1]
            mask = ze.log_softmax(-1) >= ze.log_softmax(-1).max() + math.log(0.1)
            s = ze.log_softmax(-1) - (za / tau).log_softmax(-1) if beta is None else (1 + beta) * ze - beta * za
            seq.append(int(torch.where(mask, s, -math.inf).argmax()))
        assert out[0] == seq[len(prompt):], f"beta={beta} tau={tau}: " + first_diff(out[0], seq[len(prompt):])
        ours = cd_scores(ze[None], za[None], 0.1, beta, tau)[0]
        assert torch.equal(torch.isinf(ours), ~mask)


def test_the_amateur_runs_only_for_cd(tiny_dir):
    """An engine holding CD's amateur passes it to every call; the other methods must not run it."""
    expert, amateur = load_model(tiny_dir("llama-tied-gqa")[0]), load_model(tiny_dir("llama-amateur")[0])
    calls = []
    amateur.register_forward_hook(lambda *_: calls.append(1))
    prompt = [5, 6, 7, 8]
    for dc in [DecodeConfig(), DecodeConfig(method="acd", exit_layers=(1,)), DecodeConfig(method="dola",
                                                                                           exit_layers=(0, 2))]:
        alone, _, _, _ = generate_ids(expert, [prompt], dc, 6, [])
        assert generate_ids(expert, [prompt], dc, 6, [], amateur=amateur)[0] == alone
    score_ids(expert, [prompt], [[9, 10]], [ScoreConfig(), ScoreConfig("acd", (1,))], amateur=amateur)
    assert not calls
    generate_ids(expert, [prompt], DecodeConfig(method="cd"), 3, [], amateur=amateur)
    assert calls  # the prefill and every step
    n = len(calls)
    score_ids(expert, [prompt], [[9, 10]], [ScoreConfig(), ScoreConfig("cd")], amateur=amateur)
    assert len(calls) > n


@pytest.mark.parametrize("dc", [
    DecodeConfig(method="acd", exit_layers=(2,)),
    DecodeConfig(method="acd", exit_layers=(1,), do_sample=True, temperature=0.8, top_p=0.9),
    DecodeConfig(method="dola", exit_layers=(0, 2, 4), exit_norm=False, repetition_penalty=1.2),
    DecodeConfig(method="cd", beta=0.5),
])
def test_batched_contrast_equals_one_by_one(dc, tiny_dir):
    path, _ = tiny_dir("llama-untied")
    model = load_model(path)
    amateur = load_model(tiny_dir("llama-amateur")[0]) if dc.method == "cd" else None
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 6)]
    batched, _, layers_b, _ = generate_ids(model, prompts, dc, 20, [], seed=3, amateur=amateur)
    for i, p in enumerate(prompts):
        alone, _, layers_a, _ = generate_ids(model, [p], dc, 20, [], seed=3, amateur=amateur)
        assert batched[i] == alone[0], f"row {i}: " + first_diff(batched[i], alone[0])
        assert layers_b[i] == layers_a[0]


def test_scores_are_log_likelihoods(tiny_dir):
    path, hf = tiny_dir("llama-untied")
    model = load_model(path)
    demo = [20, 21, 22, 23, 24, 25]  # a shared prefix, computed once and copied into every row
    prompts, conts = [demo + [5, 6, 7, 8], demo + [9, 10], demo + [9]], [[11, 12, 13], [14], [30, 31]]
    configs = [ScoreConfig(), ScoreConfig("acd", (3,)), ScoreConfig("dola", (0, 2), False, relative_top=0.0,
                                                                     post_softmax=False)]
    greedy, acd, dola = score_ids(model, prompts, conts, configs)
    for p, c, total in zip(prompts, conts, greedy):
        with torch.no_grad():
            logp = hf(torch.tensor([p + c])).logits[0].log_softmax(-1)
        ref = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))
        assert abs(total - ref) < 1e-4
    for i, (p, c) in enumerate(zip(prompts, conts)):  # one row alone: no shared prefix, no padding
        alone = score_ids(model, [p], [c], configs)
        assert all(abs(a[0] - b[i]) < 1e-4 for a, b in zip(alone, (greedy, acd, dola)))
    assert all(math.isfinite(x) for x in acd + dola)


@pytest.mark.parametrize("case", ["peaked", "flat", "mixed"])
def test_masked_contrast_op_is_exact(case):
    torch.manual_seed(7)
    E, V = 32, 500
    head, hidden = torch.randn(V, E), torch.randn(3, E)
    expert = torch.randn(3, V) * (0.2 if case == "flat" else 5)
    if case == "mixed":  # one row's V_head overflows the candidates: the full path runs for the batch
        expert[1] *= 0.04
    ref = acd_log_probs(expert, hidden @ head.T, 0.1)
    ours = acd_log_probs_masked(expert, hidden, head, 0.1, 1, candidates=16)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    heads = plausible_mask(expert.log_softmax(-1), 0.1).sum(-1)
    assert (heads.max() > 16) == (case != "peaked")


@pytest.mark.parametrize("relative_top,post_softmax", [(0.0, False), (0.1, True)])
def test_dola_scores_match_dola_script(relative_top, post_softmax, tiny_dir):
    """DoLa's released lm_score, re-derived from transformers' hidden states, position by position."""
    path, hf = tiny_dir("llama-untied")
    model = load_model(path)
    candidates = (0, 2, 4)
    prompt, cont = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    sc = ScoreConfig("dola", candidates, False, relative_top=relative_top, post_softmax=post_softmax)
    ours = score_ids(model, [prompt], [cont], [sc])[0][0]
    with torch.no_grad():
        out = hf(torch.tensor([prompt + cont]), output_hidden_states=True)
    total = 0.0
    for k, token in enumerate(cont):
        pos = len(prompt) - 1 + k
        final = out.logits[0, pos]
        layers = torch.stack([hf.lm_head(out.hidden_states[j][0, pos]) for j in candidates])
        m = 0.5 * (final.softmax(-1)[None] + layers.softmax(-1))
        js = 0.5 * (torch.nn.functional.kl_div(final.log_softmax(-1)[None], m, reduction="none").mean(-1)
                    + torch.nn.functional.kl_div(layers.log_softmax(-1), m, reduction="none").mean(-1))
        base = layers[int(js.argmax())]
        diff = final.log_softmax(-1) - base.log_softmax(-1)
        if post_softmax:
            diff = diff.log_softmax(-1)
        if relative_top > 0:
            logp = final.log_softmax(-1)
            diff = torch.where(logp < logp.max() + math.log(relative_top), -1000.0, diff)
        total += diff[token].item()
    assert abs(ours - total) < 1e-3, (ours, total)


def test_prefix_cache_extends_a_cached_demo(tiny_dir):
    model = load_model(tiny_dir("llama-untied")[0])
    demo, cache = [20, 21, 22, 23, 24, 25], {}
    configs = [ScoreConfig(), ScoreConfig("dola", (0, 2), False)]
    for question in ([40, 41], [42, 43, 44], [40, 41]):  # demo cached once, each question computed on top of it
        prompts, conts = [demo + question] * 2, [[11, 12], [13]]
        cached = score_ids(model, prompts, conts, configs, prefix_cache=cache)
        fresh = score_ids(model, prompts, conts, configs)
        assert all(abs(a - b) < 1e-4 for x, y in zip(cached, fresh) for a, b in zip(x, y))
        assert len(cache) <= 2 and any(list(k[1]) == demo + question[:-1] for k in cache)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    score_ids(model, [demo + [46, 47]] * 2, [[11], [12]], configs, prefix_cache=cache)
    assert calls[0] == 1  # only the new question token; the demo came from the cache
