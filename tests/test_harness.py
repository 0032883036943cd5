"""lcdfast as an lm-evaluation-harness model: its requests against the scoring API, transformers and a direct
sum over windows; stop sequences; the harness end to end on 3-item local tasks (shipped and included)."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import lcdfast  # noqa: E402
from lcdfast.cli import main  # noqa: E402
from lcdfast.harness import LcdfastLM, metrics_of, task_manager  # noqa: E402

METHODS = [{"method": "greedy"}, {"method": "acd", "amateur_layer": 2},
           {"method": "dola", "dola_layers": "low", "relative_top": 0.0}]
PAIRS = [("The quick brown", " fox jumps"), ("Layers improve", " gradually, layer by layer."),
         ("Contrastive decoding scores tokens by", " how much"), ("The quick brown fox jumps over the lazy", " dog.")]


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    path, hf = tiny_dir("llama-untied")
    return lcdfast.load(path, max_seq_len=24), hf


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from transformers, float64."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logits[:-1].argmax(-1)


def test_loglikelihood_equals_the_scoring_api_under_every_method(tiny):
    engine, _ = tiny
    lm = LcdfastLM(engine, methods=METHODS, batch_size=3)
    for i, opts in enumerate(METHODS):
        ours = lm.use(i).loglikelihood(requests("loglikelihood", PAIRS))
        api = engine.score([c for c, _ in PAIRS], [t for _, t in PAIRS], **opts)
        for (ll, greedy), ref in zip(ours, api):
            assert isinstance(greedy, bool) and abs(ll - ref) < 1e-4, (opts, ll, ref)
    assert len(lm.scored) == len(METHODS) * len(PAIRS)  # one pass scored every method


def test_cd_through_the_harness_equals_the_scoring_api(tiny_dir):
    path, _ = tiny_dir("llama-untied")
    engine = lcdfast.load(path, max_seq_len=24)
    engine.set_amateur(tiny_dir("llama-amateur")[0])
    methods = [{"method": "cd"}, {"method": "cd", "beta": 0.5, "relative_top": 0.0}]
    lm = LcdfastLM(engine, methods=methods)
    for i, opts in enumerate(methods):
        ours = lm.use(i).loglikelihood(requests("loglikelihood", PAIRS))
        api = engine.score([c for c, _ in PAIRS], [t for _, t in PAIRS], **{"relative_top": 0.1, **opts})
        assert max(abs(ll - ref) for (ll, _), ref in zip(ours, api)) < 1e-4


def test_greedy_loglikelihood_and_is_greedy_equal_transformers(tiny):
    engine, hf = tiny
    lm = LcdfastLM(engine)
    tok = engine.tokenizer
    ours = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (ll, greedy) in zip(PAIRS, ours):
        whole, ctx = tok.encode(context + continuation, False), tok.encode(context, False)
        logp, best = hf_logprobs(hf, whole)
        n = len(whole) - len(ctx)
        assert abs(ll - logp[-n:].sum().item()) < 1e-4
        assert greedy == bool((best[-n:] == torch.tensor(whole[-n:])).all())
    # a continuation that is greedy by construction: transformers' own argmax tokens
    ctx = tok.encode("The quick brown", False)
    ids = list(ctx)
    for _ in range(3):
        ids.append(int(hf_logprobs(hf, ids + [0])[1][-1]))
    text = tok.decode(ids)
    ll, greedy = lm._loglikelihood_tokens([(None, ctx, ids[len(ctx):])])[0]
    assert greedy, text


def test_is_greedy_is_the_methods_own_argmax(tiny):
    """A continuation the method itself generates greedily is its top choice everywhere; one token off is not."""
    engine, _ = tiny
    gen_methods = [{"method": "greedy"}, {"method": "acd", "amateur_layer": 2},
                   {"method": "dola", "dola_layers": "low", "relative_top": 0.1}]
    lm = LcdfastLM(engine, methods=gen_methods)
    tok = engine.tokenizer
    context = tok.encode("The quick brown", False)
    for i, opts in enumerate(gen_methods):
        ids = engine.generate([context], max_new_tokens=4, **{k: v for k, v in opts.items() if k != "relative_top"}
                              )[0].token_ids
        ids = [t for t in ids if t not in engine.eos_ids]
        other = [(ids[0] + 1) % tok.vocab_size, *ids[1:]]
        lm.use(i)
        (_, own), (_, off) = lm._loglikelihood_tokens([(None, context, ids), (None, context, other)])
        assert own and not off, opts


def test_scores_do_not_depend_on_how_positions_are_chunked(tiny, monkeypatch):
    engine, _ = tiny
    lm = LcdfastLM(engine, methods=METHODS)
    whole = [lm.use(i).loglikelihood(requests("loglikelihood", PAIRS)) for i in range(len(METHODS))]
    import lcdfast.generate

    monkeypatch.setattr(lcdfast.generate, "SCORE_POSITIONS", 3)
    lm = LcdfastLM(engine, methods=METHODS)
    chunked = [lm.use(i).loglikelihood(requests("loglikelihood", PAIRS)) for i in range(len(METHODS))]
    for a, b in zip(whole, chunked):
        assert [g for _, g in a] == [g for _, g in b] and max(abs(x - y) for (x, _), (y, _) in zip(a, b)) < 1e-5


def test_a_context_too_long_is_cut_from_the_left(tiny):
    engine, hf = tiny
    lm = LcdfastLM(engine)
    tok = engine.tokenizer
    context = tok.encode("The quick brown fox jumps over the lazy dog. Layers improve gradually, layer by", False)
    continuation = tok.encode(" layer.", False)
    assert len(context) + len(continuation) > engine.max_seq_len
    (ll, _), = lm._loglikelihood_tokens([(None, context, continuation)])
    kept = context[-(engine.max_seq_len - len(continuation)):]
    assert abs(ll - hf_logprobs(hf, kept + continuation)[0][-len(continuation):].sum().item()) < 1e-4


def test_bos_as_the_tokenizer_adds_it(tiny, monkeypatch):
    engine, _ = tiny
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "add_bos", True)
    lm = LcdfastLM(engine)
    bos = tok.bos_token_id
    assert lm.tok_encode("The quick")[0] == bos and lm.tok_encode("The quick")[1] != bos
    assert lm.tok_encode("<s>The quick") == lm.tok_encode("The quick")  # no second BOS
    assert lm.tok_encode("The quick", add_special_tokens=False)[0] != bos
    assert LcdfastLM(engine, add_bos_token=False).tok_encode("The quick")[0] != bos


def test_empty_context_conditions_on_the_prefix_token(tiny):
    engine, hf = tiny
    lm = LcdfastLM(engine)
    (ll, _), = lm.loglikelihood(requests("loglikelihood", [("", "The quick brown")]))
    ids = engine.tokenizer.encode("The quick brown", False)
    assert abs(ll - hf_logprobs(hf, [lm.prefix_token_id, *ids])[0].sum().item()) < 1e-4


def test_loglikelihood_rolling_is_the_sum_over_the_harness_windows(tiny):
    engine, hf = tiny
    lm = LcdfastLM(engine, methods=METHODS)
    text = "The quick brown fox jumps over the lazy dog. Layers improve gradually, layer by layer. " * 2
    ids = engine.tokenizer.encode(text, False)
    assert len(ids) > 2 * engine.max_seq_len  # several windows
    windows = [lm_utils.make_disjoint_window(w) for w in
               lm_utils.get_rolling_token_windows(ids, lm.prefix_token_id, lm.max_length, 1)]
    assert [t for _, c in windows for t in c] == ids  # every token predicted once
    direct = 0.0
    for context, continuation in windows:
        direct += hf_logprobs(hf, context + continuation)[0][-len(continuation):].sum().item()
    short = "Layers improve"
    rolling = lm.use(0).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), (short,)]))
    assert abs(rolling[0] - direct) < 1e-3, (rolling[0], direct)
    short_ids = engine.tokenizer.encode(short, False)
    assert abs(rolling[1] - hf_logprobs(hf, [lm.prefix_token_id, *short_ids])[0].sum().item()) < 1e-4
    for i, opts in enumerate(METHODS[1:], 1):  # the others: the scoring API's sum over the same windows
        total = sum(engine.score_tokens([c], [t], [opts])[0][0] for c, t in windows)
        assert abs(lm.use(i).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))[0] - total) < 1e-3


def test_generate_until_stops_on_the_tasks_stop_strings(tiny):
    engine, _ = tiny
    lm = LcdfastLM(engine, methods=METHODS)
    prompt = "The quick brown"
    free = engine.generate(prompt, max_new_tokens=12)[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop and free.find(stop) > 0
    outs = lm.generate_until(requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12}),
                                                         (prompt, {"until": ["\u2603"], "max_gen_toks": 12}),
                                                         (prompt, {"until": "\u2603", "max_gen_toks": 3})]))
    assert outs[0] == free[:free.find(stop)] and stop not in outs[0]
    assert outs[1] == free
    assert outs[2] == engine.generate(prompt, max_new_tokens=3)[0].text  # max_gen_toks
    acd = lm.use(1).generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 8})]))
    assert acd[0] == engine.generate(prompt, max_new_tokens=8, method="acd", amateur_layer=2)[0].text
    contexts = ["The quick brown", "Layers", "Contrastive decoding scores tokens by"]
    same = lm.use(0).generate_until(requests("generate_until", [(c, {"until": ["\u2603"], "max_new_tokens": 5})
                                                                for c in contexts]))  # one batch, longest first
    assert same == [engine.generate(c, max_new_tokens=5)[0].text for c in contexts]  # in the requests' order
    listed = LcdfastLM(engine, method="dola", dola_layers=[0, 1]).generate_until(
        requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 4})]))
    assert listed == [engine.generate(prompt, max_new_tokens=4, method="dola", dola_layers=[0, 1])[0].text]
    sampled = lm.use(0).generate_until(requests("generate_until", [(prompt, {"do_sample": True, "temperature": 1.0,
                                                                             "max_gen_toks": 8})]))
    assert sampled[0] == engine.generate(prompt, max_new_tokens=8, method="sample", temperature=1.0)[0].text


def write_tasks(tmp_path):
    """A 3-item loglikelihood task and a 3-item generate_until task in tmp_path/tasks, data beside them."""
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in PAIRS[:3]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_ll.yaml").write_text(f"""task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: generate_until
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    shared = tmp_path / "data"
    (shared / "lambada").mkdir(parents=True)
    (shared / "lambada" / "test.jsonl").write_text("".join(
        json.dumps({"text": t}) + "\n" for t in ("The quick brown fox jumps over the lazy dog",
                                                 "Layers improve gradually, layer by layer",
                                                 "Contrastive decoding scores tokens by how much")))
    (shared / "open-ended").mkdir()
    (shared / "open-ended" / "wikinews.jsonl").write_text("".join(
        json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in PAIRS[:3]))
    return tasks, shared


def test_the_harness_runs_local_tasks_end_to_end(tiny, tmp_path, monkeypatch):
    engine, _ = tiny
    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path / "home"))
    tasks, shared = write_tasks(tmp_path)
    manager = task_manager(shared, [tasks], ["tiny_ll", "tiny_gen", "lambada_openai"])
    lm = LcdfastLM(engine, methods=METHODS[:2])
    got = {}
    for i in range(2):
        result = lm_eval.simple_evaluate(model=lm.use(i), tasks=["tiny_ll", "tiny_gen", "lambada_openai"],
                                         task_manager=manager, bootstrap_iters=0, log_samples=True)
        got[i] = metrics_of(result["results"])
        assert result["n-samples"]["tiny_ll"]["effective"] == 3
        assert result["n-samples"]["lambada_openai"]["effective"] == 3
        lls = [s["resps"][0][0][0] for s in sorted(result["samples"]["tiny_ll"], key=lambda s: s["doc_id"])]
        api = engine.score([q for q, _ in PAIRS[:3]], [a for _, a in PAIRS[:3]], **METHODS[i])
        assert max(abs(a - b) for a, b in zip(lls, api)) < 1e-4
        gens = [s["resps"][0][0] for s in sorted(result["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
        assert all("." not in g for g in gens)
        words = [("The quick brown fox jumps over the lazy", " dog"), ("Layers improve gradually, layer by", " layer"),
                 ("Contrastive decoding scores tokens by how", " much")]
        ppl = math.exp(-sum(engine.score([c for c, _ in words], [w for _, w in words], **METHODS[i])) / 3)
        assert abs(got[i]["lambada_openai"]["perplexity"] - ppl) < 1e-3 * ppl
        greedy = [w for (c, w), (_, g) in zip(words, lm._loglikelihood_tokens(
            [(None, *lm._encode_pair(c, w)) for c, w in words])) if g]
        assert got[i]["lambada_openai"]["acc"] == pytest.approx(len(greedy) / 3)
    assert set(got[0]["tiny_ll"]) == {"acc"} and set(got[0]["tiny_gen"]) == {"exact_match"}


def test_eval_lm_eval_command(tiny_dir, tmp_path, monkeypatch, capsys):
    model, _ = tiny_dir("llama-untied")
    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path / "home"))
    tasks, shared = write_tasks(tmp_path)
    out = tmp_path / "out"
    code = main(["eval", "lm-eval", "--tasks", "lambada_openai,wikinews_rolling,tiny_gen", "--include-path",
                 str(tasks), "--data-dir", str(shared), "--methods", "greedy,acd:2,dola:low,dola:high/rt=0",
                 "--model", str(model), "--out", str(out), "--limit", "3"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err[-500:]
    summary = json.loads((out / "summary.json").read_text())["lm-eval"]
    assert summary["items_per_task"] == {"lambada_openai": 3, "wikinews_rolling": 3, "tiny_gen": 3}
    for name in ("greedy", "acd:2", "dola:low", "dola:high/rt=0"):
        row = summary["methods"][name]
        assert 0 <= row["lambada_openai"]["acc"] <= 1 and row["lambada_openai"]["perplexity"] > 1
        assert row["wikinews_rolling"]["word_perplexity"] > 1 and "exact_match" in row["tiny_gen"]
        assert (out / f"lm-eval-{name.replace(':', '_').replace('/', '_')}.json").exists()
        assert name in printed
    assert summary["methods"]["dola:low"]["options"]["relative_top"] == 0.1  # DoLa's likelihood recipe
    assert summary["methods"]["dola:high/rt=0"]["options"]["relative_top"] == 0.0


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "no_such_task"], "'no_such_task' is not a task"),
    (["--tasks", "lambada_openai", "--data-dir", "/nonexistent"], "/nonexistent/lambada/test.jsonl not found"),
    (["--tasks", "lambada_openai", "--include-path", "/nonexistent"], "--include-path: /nonexistent"),
    (["--tasks", ","], "names no task"),
    (["--tasks", "lambada_openai", "--methods", "greedy,acd:99"], "layer outside"),
    (["--tasks", "lambada_openai", "--limit", "0"], "--limit"),
])
def test_eval_lm_eval_errors_are_one_line(tiny_dir, tmp_path, monkeypatch, capsys, argv, needle):
    model, _ = tiny_dir("llama-untied")
    monkeypatch.setenv("LCDFAST_HOME", str(tmp_path / "home"))
    _, shared = write_tasks(tmp_path)
    if "--data-dir" not in argv:
        argv = [*argv, "--data-dir", str(shared)]
    code = main(["eval", "lm-eval", *argv, "--model", str(model), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and needle in err[-1] and err[-1].startswith("lcdfast: "), err


def test_without_lm_eval_the_command_says_how_to_install_it():
    import subprocess
    import sys

    code = "import sys; sys.modules['lm_eval'] = None; from lcdfast.cli import main; sys.exit(main(" \
           "['eval', 'lm-eval', '--tasks', 'lambada_openai']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "lcdfast: error: lm-eval is not installed: pip install -e '.[lm-eval]'"], run.stderr
