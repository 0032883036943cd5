"""GSM8K and StrategyQA as DoLa evaluates them: prompts, answer extraction on hand-made (and malformed) outputs,
accuracy through a scripted engine, and each command end to end on a tiny model and a 3-item file."""

import json
from types import SimpleNamespace

import pytest

from lcdfast.cli import main
from lcdfast.errors import LcdError
from lcdfast.evaluate import MethodSpec
from lcdfast.reasoning import cot_prompt, eval_reasoning, gsm8k_answer, gsm8k_truth, read_questions, strategyqa_answer

GSM8K = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
          "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
         {"question": "A box holds 1,200 pens. 200 are sold. How many are left?", "answer": "#### 1,000"},
         {"question": "It is 5 degrees and falls by 8. What is it now?", "answer": "5 - 8 = -3\n#### -3"}]
STRATEGYQA = [{"qid": "a1", "question": "Can a fish climb a tree?", "answer": False},
              {"qid": "b2", "question": "Is water wet?", "answer": True},
              {"qid": "c3", "question": "Do cats bark?", "answer": False}]


@pytest.mark.parametrize("completion, expected", [
    ("Tom had 3. He bought 4. 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $1,234.50 in total.", "1234.50"),
    ("The answer is -3.", "-3"),
    ("The answer is 5. Then 6 more", "5"),  # the first number after the trigger
    ("So 2 + 2 = 4, and 4 * 3 = 12", "12"),  # no trigger: the last number
    ("the ANSWER IS 9", "9"),  # case does not matter
    ("The answer is unknown, maybe 8 or 9", "8"),
    ("The answer is 12.", "12"),  # a trailing period is not part of the number
    ("", None),
    ("I cannot say.", None),
    ("The answer is none.", None),
])
def test_gsm8k_answer(completion, expected):
    assert gsm8k_answer(completion) == expected


def test_gsm8k_truth():
    assert gsm8k_truth("3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_truth("#### 1,000") == "1000"
    assert gsm8k_truth("#### -3") == "-3"
    with pytest.raises(LcdError, match="no '#### NUMBER'"):
        gsm8k_truth("seven")


@pytest.mark.parametrize("completion, expected", [
    ("Fish have fins. Thus, fish cannot climb. So the answer is no.", (False, True)),
    ("Water is liquid. So the answer is yes.", (True, True)),
    ("The answer is Yes.", (True, True)),
    ("So the answer is maybe.", (False, True)),  # not yes/no after the trigger: no
    ("I do not know", (False, False)),  # no trigger: "no" anywhere (here inside "not") means no
    ("It is true", (True, False)),
    ("", (True, False)),
])
def test_strategyqa_answer(completion, expected):
    assert strategyqa_answer(completion) == expected


def test_cot_prompts_follow_dola():
    p = cot_prompt("gsm8k", "How many?")
    assert p.startswith("Q: There are 15 trees in the grove.") and p.endswith("\n\nQ: How many?\nA:")
    assert p.count("Q: ") == 9 and p.count("The answer is ") == 8 and "The answer is 6.\n\n" in p
    s = cot_prompt("strategyqa", "Is it?")
    assert s.startswith("Q: Do hamsters provide food for any animals?\nA: Hamsters are prey animals.")
    assert s.count("Q: ") == 7 and s.count("So the answer is ") == 6 and s.endswith("\n\nQ: Is it?\nA:")


def write(tmp_path):
    g = tmp_path / "gsm8k.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    s = tmp_path / "strategyqa.json"
    s.write_text(json.dumps(STRATEGYQA))
    return g, s


@pytest.mark.parametrize("task, text, needle", [
    ("gsm8k", '{"question": "x"}\n', "record 1 needs a 'question' string and an 'answer' str"),
    ("gsm8k", "not json\n", "not a gsm8k file"),
    ("gsm8k", '{"question": "x", "answer": "seven"}\n', "no '#### NUMBER'"),
    ("strategyqa", '[{"question": "x", "answer": "yes"}]', "record 1 needs a 'question' string and an 'answer' bool"),
    ("strategyqa", '{"question": "x"}', "expected a JSON list"),
    ("strategyqa", "[]", "expected a JSON list"),
])
def test_bad_files_are_one_line_errors(tmp_path, task, text, needle):
    path = tmp_path / "data"
    path.write_text(text)
    with pytest.raises(LcdError, match=needle.replace("(", r"\(")):
        read_questions(task, path)


class ScriptedEngine:
    """Answers every prompt with the next scripted completion; records what it was asked."""

    def __init__(self, completions):
        self.completions, self.calls = list(completions), []

    def generate(self, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        return [SimpleNamespace(text=self.completions.pop(0), token_ids=[0] * 5) for _ in prompts]


def test_accuracy_through_a_scripted_engine(tmp_path):
    g, s = write(tmp_path)
    engine = ScriptedEngine([" 3 + 4 = 7. The answer is 7.\n\n", " The answer is 1,000.", " It rises to 13."])
    summary = eval_reasoning(engine, "gsm8k", g, tmp_path / "out", [MethodSpec("greedy")], batch_size=2)
    assert summary["methods"]["greedy"]["accuracy"] == pytest.approx(2 / 3)
    (prompts, kwargs), _ = engine.calls
    assert prompts == [cot_prompt("gsm8k", r["question"]) for r in GSM8K[:2]]
    assert kwargs["stop"] == ["Q:", "\\end{code}"] and kwargs["max_new_tokens"] == 256
    records = [json.loads(line) for line in (tmp_path / "out" / "gsm8k-greedy.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == ["7", "1000", "13"] and [r["correct"] for r in records] == [1, 1, 0]
    engine = ScriptedEngine(["So the answer is no.", "Water is wet. So the answer is yes.", "Cats meow."])
    summary = eval_reasoning(engine, "strategyqa", s, tmp_path / "out", [MethodSpec("dola", "dola", {})])
    row = summary["methods"]["dola"]
    assert row["accuracy"] == pytest.approx(2 / 3) and row["answered"] == pytest.approx(2 / 3)
    assert row["options"]["dola_layers"] == "low" and row["options"]["repetition_penalty"] == 1.2  # as DoLa
    assert engine.calls[0][1]["stop"] == ["Q:", "\n\n##"]
    again = ScriptedEngine([])  # every record is there: nothing is generated again
    assert eval_reasoning(again, "strategyqa", s, tmp_path / "out", [MethodSpec("dola", "dola", {})]) == summary
    assert again.calls == []


def test_reasoning_commands_end_to_end(tiny_dir, tmp_path):
    model, _ = tiny_dir("llama-untied")
    g, s = write(tmp_path)
    out = tmp_path / "out"
    for task, path in (("gsm8k", g), ("strategyqa", s)):
        argv = ["eval", task, str(path), "--methods", "greedy,acd:2,dola:low", "--max-new-tokens", "6",
                "--model", str(model), "--out", str(out)]
        assert main(argv) == 0
        rows = json.loads((out / "summary.json").read_text())[path.stem]["methods"]
        assert set(rows) == {"greedy", "acd:2", "dola:low"}
        assert all(0 <= r["accuracy"] <= 1 and 0 < r["new_tokens"] <= 6 for r in rows.values())
        lines = (out / f"{path.stem}-greedy.jsonl").read_text()
        assert len(lines.splitlines()) == 3
        assert main(argv) == 0 and (out / f"{path.stem}-greedy.jsonl").read_text() == lines  # resumed, not redone
    assert main(["eval", "gsm8k", str(g), "--methods", "greedy/rt=0.1", "--model", str(model)]) == 2
