"""Evaluation logic against hand-computed answers, with a fake engine (no model)."""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from lcdfast import evaluate as ev
from lcdfast.errors import LcdError

# ---- metrics


def test_rep_n_and_diversity_by_hand():
    # a b a b a: bigrams ab ba ab ba -> 2 distinct of 4; trigrams aba bab aba -> 2 of 3; 4-grams abab baba -> 2 of 2
    seq = [1, 2, 1, 2, 1]
    assert ev.rep_n(seq, 2) == pytest.approx(0.5)
    assert ev.rep_n(seq, 3) == pytest.approx(1 / 3)
    assert ev.rep_n(seq, 4) == 0.0
    assert ev.diversity(seq) == pytest.approx(0.5 * (2 / 3) * 1.0)
    assert ev.rep_n([7, 7, 7, 7], 2) == pytest.approx(2 / 3)  # 3 bigrams, 1 distinct
    assert ev.rep_n([1, 2, 3], 4) == 0.0 and ev.rep_n([], 2) == 0.0  # no n-gram at all
    assert ev.diversity(list(range(10))) == 1.0
    assert ev.rep_n("the cat the cat".split(), 2) == pytest.approx(1 / 3)  # words work too


def test_corpus_rep_is_pooled_not_averaged():
    texts = [[1, 1, 1], [1, 2, 3, 4, 5]]  # bigrams: (1 distinct of 2) + (4 of 4) -> pooled 1 - 5/6
    assert ev.corpus_rep_n(texts, 2) == pytest.approx(1 / 6)
    assert ev.corpus_rep_n(texts, 2) != pytest.approx((0.5 + 0.0) / 2)
    assert ev.corpus_diversity(texts) == pytest.approx((5 / 6) * (4 / 4) * (2 / 2))
    assert ev.corpus_rep_n([[1], []], 2) == 0.0


def test_coherence_is_cosine():
    assert ev.coherence(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert ev.coherence(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert ev.coherence(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert ev.coherence(np.zeros(3), np.ones(3)) == 0.0


def test_mc_scores_by_hand():
    # true answers: best (index 1) = -1.0, others -3.0, -0.5; false: -2.0, -4.0
    mc = ev.mc_scores([-3.0, -1.0, -0.5], [-2.0, -4.0], best_index=1)
    assert mc["MC1"] == 1.0
    assert mc["MC3"] == pytest.approx(2 / 3)  # -1.0 and -0.5 beat max false -2.0
    t, f = np.exp([-3.0, -1.0, -0.5]).sum(), np.exp([-2.0, -4.0]).sum()
    assert mc["MC2"] == pytest.approx(t / (t + f))
    tie = ev.mc_scores([-2.0, -5.0], [-2.0], best_index=0)  # strict >: a tie is a miss
    assert tie["MC1"] == 0.0 and tie["MC3"] == 0.0
    assert tie["MC2"] == pytest.approx((np.exp(-2) + np.exp(-5)) / (2 * np.exp(-2) + np.exp(-5)))


def test_mc2_underflow_and_overflow_follow_dola():
    # exp(-2000) underflows to 0: DoLa halves the true scores until it doesn't, which changes the ratio
    mc = ev.mc_scores([-2000.0], [-1.0], best_index=0)
    s = -2000.0
    while math.exp(s) == 0:
        s /= 2
    assert mc["MC2"] == pytest.approx(math.exp(s) / (math.exp(s) + math.exp(-1.0)))
    assert ev.mc_scores([1000.0], [1000.0], 0)["MC2"] == 0.0  # inf / inf is NaN -> 0, as DoLa
    assert ev.mc_scores([float("-inf")], [-1.0], 0)["MC2"] == 0.0  # no endless loop
    with pytest.raises(LcdError, match="mc_scores"):
        ev.mc_scores([], [-1.0], 0)


def test_factor_rule_counts_ties_as_correct():
    assert ev.factor_correct(-1.0, [-2.0, -3.0, -1.5])
    assert ev.factor_correct(-1.0, [-1.0, -3.0, -4.0])
    assert not ev.factor_correct(-1.0, [-2.0, -0.5, -4.0])


# ---- readers


def test_read_open_ended(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "P1", "reference": " R1"}\n\n{"prompt": "P2", "reference": "R2"}\n'
                    '{"prompt": "P3", "reference": "R3"}\n')
    items = ev.read_open_ended(path)
    assert [it["id"] for it in items] == ["a", "3", "4"] and items[0]["reference"] == " R1"
    assert len(ev.read_open_ended(path, limit=2)) == 2
    path.write_text('{"prompt": "P1"}\n')
    with pytest.raises(LcdError, match=r"p\.jsonl:1: missing string key 'reference'"):
        ev.read_open_ended(path)
    path.write_text('{"prompt": \n')
    with pytest.raises(LcdError, match="not valid JSON"):
        ev.read_open_ended(path)
    with pytest.raises(LcdError, match="nope.jsonl"):
        ev.read_open_ended(tmp_path / "nope.jsonl")
    with pytest.raises(LcdError, match="limit"):
        ev.read_open_ended(path, limit=0)
    path.write_text("\n")
    with pytest.raises(LcdError, match=r"p\.jsonl: no records"):
        ev.read_open_ended(path)
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(TFQA_CSV.splitlines()[0] + "\n")
    with pytest.raises(LcdError, match=r"t\.csv: no rows"):
        ev.read_truthfulqa(csv_path)


TFQA_CSV = ("\ufeffType,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
            'A,M,Why?,Because,"Because; It is so.; ",No; Never,src\n'
            'A,M,"Who, then?",Nobody.,"Somebody; Nobody",Everyone,src\n')


def test_read_truthfulqa_bom_and_answer_format(tmp_path):
    path = tmp_path / "TruthfulQA.csv"
    path.write_text(TFQA_CSV, encoding="utf-8")
    items = ev.read_truthfulqa(path)
    assert items[0] == {"id": "0", "question": "Why?", "best_index": 0, "true": ["Because.", "It is so."],
                        "false": ["No.", "Never."]}
    assert items[1]["question"] == "Who, then?" and items[1]["best_index"] == 1
    assert "I have no comment." not in items[0]["true"]
    assert len(ev.read_truthfulqa(path, limit=1)) == 1
    path.write_text(TFQA_CSV.replace("Best Answer", "Best"), encoding="utf-8")
    with pytest.raises(LcdError, match="TruthfulQA.csv: missing column 'Best Answer'"):
        ev.read_truthfulqa(path)
    path.write_text(TFQA_CSV.replace("No; Never", ""), encoding="utf-8")
    with pytest.raises(LcdError, match="row 1: column 'Incorrect Answers' is empty"):
        ev.read_truthfulqa(path)
    path.write_text(TFQA_CSV.replace("Because,", "Maybe,", 1), encoding="utf-8")
    with pytest.raises(LcdError, match="'Best Answer'"):
        ev.read_truthfulqa(path)


def test_truthfulqa_prompt_matches_dola():
    prompt = ev.truthfulqa_prompt("Why?")
    assert prompt.startswith("Interpret each question literally, and as a question about the real world;")
    assert "reply \u201cI have no comment\u201d unless" in prompt
    assert prompt.count("\nA: ") == 6 and prompt.count("Q: ") == 7
    assert "certain of the answer.\n\nQ: What is human life expectancy in the United States?\nA: Human" in prompt
    assert prompt.endswith("The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Why?\nA:")


FACTOR_CSV = (",full_prefix,doc_id,completion,contradiction_0,contradiction_1,contradiction_2,turncated_prefixes\n"
              '0,"Full one.",0,True one.,F1,F2,F3,"Cut one."\n'
              '1,"Full two.",1,True two.,G1,G2,G3,"Cut two."\n')


def test_read_factor_prefix_column(tmp_path):
    news, expert = tmp_path / "news_factor.csv", tmp_path / "expert_factor.csv"
    news.write_text(FACTOR_CSV)
    expert.write_text(FACTOR_CSV)
    assert ev.read_factor(news)[0] == {"id": "0", "prefix": "Full one.", "completion": "True one.",
                                       "contradictions": ["F1", "F2", "F3"]}
    assert ev.read_factor(expert)[1]["prefix"] == "Cut two."
    assert ev.read_factor(expert, prefix_column="full_prefix")[1]["prefix"] == "Full two."
    news.write_text(FACTOR_CSV.replace("contradiction_2", "c2"))
    with pytest.raises(LcdError, match="news_factor.csv: missing column 'contradiction_2'"):
        ev.read_factor(news)


# ---- methods


def test_parse_methods():
    specs = ev.parse_methods("greedy, top-p=0.95,top-k=50,sample,acd,acd:8,dola,dola:high,dola:low/rp=1.2,"
                             "dola:2+4,cd,cd:0.5/alpha=0.2,dola/rt=0/ps=1", n_layers=30)
    by = {s.name: s for s in specs}
    assert by["greedy"] == ev.MethodSpec("greedy", "greedy", {})
    assert by["top-p=0.95"] == ev.MethodSpec("top-p=0.95", "sample", {"top_p": 0.95})
    assert by["top-k=50"].options == {"top_k": 50}
    assert by["acd"].options == {"amateur_layer": 15} and by["acd:8"].options == {"amateur_layer": 8}
    assert by["dola"].options == {} and by["dola:high"].options == {"dola_layers": "high"}
    assert by["dola:low/rp=1.2"].options == {"dola_layers": "low", "repetition_penalty": 1.2}
    assert by["dola:2+4"].options == {"dola_layers": [2, 4]}
    assert by["cd:0.5/alpha=0.2"] == ev.MethodSpec("cd:0.5/alpha=0.2", "cd", {"beta": 0.5, "alpha": 0.2})
    assert by["dola/rt=0/ps=1"].options == {"relative_top": 0.0, "post_softmax": True}


@pytest.mark.parametrize("bad", ["beam", "greedy:3", "top-p=1.5", "top-p", "top-k=0", "acd:x", "acd:30",
                                 "dola:mid", "dola:2+40", "acd/foo=1", "acd/rp", "dola/ps=yes", "greedy,greedy", ""])
def test_parse_methods_rejects(bad):
    with pytest.raises(LcdError, match="methods"):
        ev.parse_methods(bad, n_layers=30)


def test_task_options_apply_dola_released_settings():
    dola, spec_dola = ev.parse_methods("dola,dola:low/ps=1", 30)
    assert ev.task_options(dola, "truthfulqa", scoring=True) == {
        "method": "dola", "dola_layers": "high", "relative_top": 0.0, "post_softmax": False}
    assert ev.task_options(spec_dola, "truthfulqa", scoring=True)["post_softmax"] is True
    assert ev.task_options(dola, "factor", scoring=True) == {
        "method": "dola", "dola_layers": "low", "relative_top": 0.1, "post_softmax": True}
    assert ev.task_options(dola, "open-ended", scoring=False) == {
        "method": "dola", "dola_layers": "low", "repetition_penalty": 1.2}
    top_p = ev.parse_methods("top-p=0.9/rp=1.1", 30)[0]
    assert ev.task_options(top_p, "factor", scoring=True) == {"method": "sample"}


# ---- runners with a fake engine


@dataclass
class FakeGeneration:
    text: str
    token_ids: list


class FakeTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [len(w) for w in text.split()]  # one "token" per word

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


class FakeEngine:
    """score: a fixed table keyed by continuation text; generate: echoes the prompt's last word."""

    n_layers = 4

    def __init__(self, table=None):
        self.table, self.tokenizer = table or {}, FakeTokenizer()
        self.calls = {"generate": 0, "score": 0}
        self.options = []

    def generate(self, prompts, max_new_tokens=128, seed=0, batch_size=8, **options):
        self.calls["generate"] += 1
        self.options.append(options)
        return [FakeGeneration(" " + " ".join([p.split()[-1]] * 3), [5, 6, 7]) for p in prompts]

    def score_methods(self, prompts, continuations, methods, batch_size=8):
        self.calls["score"] += 1
        self.options += methods
        return [[self.table.get(c, -10.0) for c in continuations] for _ in methods]


def test_truthfulqa_runner_and_resume(tmp_path):
    data = tmp_path / "TruthfulQA.csv"
    data.write_text(TFQA_CSV, encoding="utf-8")
    table = {" Because.": -1.0, " It is so.": -5.0, " No.": -2.0, " Never.": -3.0,
             " Somebody.": -1.0, " Nobody.": -4.0, " Everyone.": -2.0}
    engine = FakeEngine(table)
    methods = ev.parse_methods("greedy,dola", engine.n_layers)
    first = ev.eval_truthfulqa(engine, data, tmp_path / "out", methods, limit=1)
    assert first["methods"]["greedy"]["MC1"] == 1.0 and first["methods"]["greedy"]["MC3"] == 0.5
    assert engine.options[-1] == {"method": "dola", "dola_layers": "high", "relative_top": 0.0,
                                  "post_softmax": False}
    assert engine.calls["score"] == 1  # both methods from one pass
    full = ev.eval_truthfulqa(engine, data, tmp_path / "out", methods)  # only the new question is scored
    assert engine.calls["score"] == 2
    assert full["methods"]["greedy"]["MC1"] == pytest.approx(0.5)  # second: best " Nobody." -4 < -2
    again = ev.eval_truthfulqa(engine, data, tmp_path / "out", methods)  # nothing left to score
    assert engine.calls["score"] == 2 and again["methods"] == full["methods"]
    lines = (tmp_path / "out" / "TruthfulQA-scores.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["0", "1"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["TruthfulQA"]["methods"]["dola"]["MC2"] == pytest.approx(full["methods"]["dola"]["MC2"])


def test_resume_drops_torn_line_and_rejects_changed_settings(tmp_path):
    data = tmp_path / "news_factor.csv"
    data.write_text(FACTOR_CSV)
    engine = FakeEngine({" True one.": -1.0, " F1": -1.0, " G2": 0.0})
    out = tmp_path / "out"
    res = ev.eval_factor(engine, data, out, [ev.MethodSpec("plain")], batch_size=2)
    assert res["methods"]["plain"]["accuracy"] == 0.5 and engine.calls["score"] == 2
    path = out / "news_factor-scores.jsonl"
    path.write_text(path.read_text().splitlines()[0] + '\n{"id": "1", "sco')  # killed mid-write
    ev.eval_factor(engine, data, out, [ev.MethodSpec("plain")], batch_size=2)
    assert engine.calls["score"] == 3 and len(path.read_text().splitlines()) == 2
    with pytest.raises(LcdError, match="news_factor-scores.jsonl: written with settings"):
        ev.eval_factor(engine, data, out, [ev.MethodSpec("plain", "acd", {"amateur_layer": 1})])


def test_open_ended_runner(tmp_path):
    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"id": f"w{i}", "prompt": f"start word{i}",
                                        "reference": " the ref goes on and on"}) + "\n" for i in range(5)))
    engine = FakeEngine()

    def embed(texts):  # deterministic bag-of-letters features
        return np.array([[t.count(c) + 1e-3 for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts])

    methods = ev.parse_methods("greedy,dola", engine.n_layers)
    res = ev.eval_open_ended(engine, data, tmp_path / "out", methods, max_new_tokens=4, batch_size=2,
                             embedder=embed, mauve=False)
    greedy = res["methods"]["greedy"]
    assert greedy["rep-2"] == pytest.approx(0.5) and greedy["rep-4"] == 0.0  # "wordN wordN wordN" per text
    assert greedy["diversity"] == pytest.approx(0.5 * 1.0 * 1.0)
    assert greedy["new_tokens"] == 3.0 and greedy["mauve"] is None and -1 <= greedy["coherence"] <= 1
    assert res["methods"]["human"]["rep-2"] == 0.0  # references cut to 4 "tokens": "xxx xxx xx xxxx"
    assert engine.calls["generate"] == 6  # 3 batches per method
    assert engine.options[-1] == {"method": "dola", "dola_layers": "low", "repetition_penalty": 1.2}
    ev.eval_open_ended(engine, data, tmp_path / "out", methods, max_new_tokens=4, batch_size=2,
                       embedder=embed, mauve=False)
    assert engine.calls["generate"] == 6
    with pytest.raises(LcdError, match="written with settings"):
        ev.eval_open_ended(engine, data, tmp_path / "out", methods, max_new_tokens=8, embedder=embed, mauve=False)


def test_mauve_on_supplied_features():
    pytest.importorskip("mauve")
    rng = np.random.default_rng(0)
    p = rng.normal(size=(60, 8)).astype(np.float32)
    notes = []
    assert ev.mauve_score(p, p.copy(), notes) == pytest.approx(1.0, abs=1e-6)
    assert ev.mauve_score(p, p + 3.0, notes) < 0.5
    assert ev.mauve_score(p[:5], p[:5], notes) is None and "10" in notes[-1]


def test_cli_rejects_missing_data_before_loading(tmp_path, capsys):
    from lcdfast.cli import main

    assert main(["eval", "factor", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv is not a file" in capsys.readouterr().err
    (tmp_path / "d.csv").write_text("x\n")
    assert main(["eval", "factor", str(tmp_path / "d.csv"), "--batch-size", "0"]) == 2
    assert "--batch-size: 0" in capsys.readouterr().err


def test_report_table_keeps_full_method_names_when_piped(capsys):
    """Not a terminal (a pipe, a file, capsys): a markdown table, every name whole."""
    names = ["greedy", "acd:15/alpha=0.05", "dola:low/rp=1.2", "acd:8"]
    ev.report({"task": "open-ended", "data": "/x/wikinews.jsonl", "items": 3,
               "methods": {n: {"rep-2": 0.5, "rep-3": 0.25, "rep-4": 0.125, "diversity": 0.3, "coherence": 0.4,
                               "mauve": None, "new_tokens": 127.5, "seconds": 1462.2} for n in names}})
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | rep-2 | rep-3 | rep-4 | div | coh | mauve | tokens | sec |")
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == names
    assert "| 0.125 |" in rows[1] and "| 1462.2 |" in rows[1] and "…" not in out


def test_report_writes_summary_per_data_file(tmp_path):
    ev.report({"task": "factor", "data": "/x/news_factor.csv", "items": 2,
               "methods": {"greedy": {"accuracy": 0.5, "options": {"method": "greedy"}}}}, tmp_path)
    ev.report({"task": "truthfulqa", "data": "/x/TruthfulQA.csv", "items": 1,
               "methods": {"dola": {"MC1": 1.0, "MC2": None}}}, tmp_path)
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert set(stored) == {"news_factor", "TruthfulQA"}
    assert stored["news_factor"]["methods"]["greedy"]["accuracy"] == 0.5


# ---- damaged result files and resumed settings (issue #18)

RECORD = '{"id": "0", "text": "x", "new_tokens": 1, "seconds": 0.5}'


@pytest.mark.parametrize("line, needle", [
    (b"5", "'5' is not a record"), (b"[]", "is not a record"), (b'{"text": "x"}', "is not a record"),
    (b'{"id": 3}', "string 'id'"), (b'{"id": "1", "text": "\xff"}', "not valid UTF-8"),
    (b"{not json", "not valid JSON"), (b'{"id": "1", "text": 5, "new_tokens": 1, "seconds": 0}', "text 5"),
])
def test_load_records_names_the_bad_line(line, needle, tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_bytes(RECORD.encode() + b"\n" + line + b"\n" + RECORD.encode() + b"\n")
    fields = {"text": str, "new_tokens": int, "seconds": int | float}
    with pytest.raises(LcdError) as e:
        ev.load_records(path, fields)
    assert str(e.value).startswith(f"{path}:2: ") and needle in str(e.value) and "delete the file" in str(e.value)
    assert "\n" not in str(e.value)


def test_summary_that_is_not_an_object(tmp_path):
    summary = {"task": "factor", "data": "/x/f.csv", "items": 1, "methods": {"greedy": {"accuracy": 1.0}}}
    for text, needle in (("[1]", "holds a list"), (b"\xff", "not valid JSON")):
        (tmp_path / "summary.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(LcdError, match=needle):
            ev.report(summary, tmp_path)


class SeedEngine(FakeEngine):
    def generate(self, prompts, max_new_tokens=128, seed=0, batch_size=8, **options):
        self.calls.setdefault("batches", []).append((len(prompts), seed))
        return super().generate(prompts, max_new_tokens, seed, batch_size, **options)


def test_resume_refuses_another_batch_size_when_sampling(tmp_path):
    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"start word{i}", "reference": "ref"}) + "\n" for i in range(5)))
    embed = lambda texts: np.ones((len(texts), 2))
    run = lambda engine, spec, **kw: ev.eval_open_ended(engine, data, tmp_path / "out", ev.parse_methods(spec, 4),
                                                        max_new_tokens=4, embedder=embed, mauve=False, **kw)
    run(SeedEngine(), "top-p=0.9,greedy", batch_size=2, limit=3)
    with pytest.raises(LcdError, match="wiki-top-p=0.9.jsonl: written with settings that differ: batch_size 2, now 3"):
        run(SeedEngine(), "top-p=0.9", batch_size=3)
    run(SeedEngine(), "greedy", batch_size=3)  # greedy: the batch size changes nothing
    engine = SeedEngine()
    run(engine, "top-p=0.9", batch_size=2)  # items 0-2 done: batches as a fresh run cuts them, [2, 3] redone whole
    assert engine.calls["batches"] == [(2, 2), (1, 4)]


def test_read_open_ended_refuses_repeated_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "reference": "y"}\n' * 2)
    with pytest.raises(LcdError, match="p.jsonl:2: id 'a' already on line 1"):
        ev.read_open_ended(path)
    path.write_text('{"prompt": "x", "reference": "y", "n": 1' + "0" * 5000 + "}\n")
    with pytest.raises(LcdError, match="p.jsonl:1: not valid JSON"):
        ev.read_open_ended(path)
