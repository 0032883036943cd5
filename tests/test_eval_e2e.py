"""Each `lcdfast eval` command end to end on a tiny random model and 3-item data files."""

import json

from lcdfast.cli import main

TFQA = ("\ufeffType,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        "Adversarial,Misc,Why is the fox quick?,It is quick,It is quick; The fox is fast,It is slow; No,src\n"
        "Adversarial,Misc,Who jumps?,The fox jumps,The fox jumps,The dog jumps; Nobody,src\n"
        "Adversarial,Misc,What improves?,Layers improve,Layers improve; Layer by layer,Nothing,src\n")
FACTOR = (",full_prefix,doc_id,completion,contradiction_0,contradiction_1,contradiction_2\n"
          "0,The quick brown fox,0,jumps over the dog.,sleeps.,eats.,runs away.\n"
          "1,Layers improve,1,gradually.,never.,backwards.,at once.\n"
          "2,The expert scores tokens,2,by contrast.,by chance.,by size.,by hand.\n")


def test_eval_commands_end_to_end(tiny_dir, tmp_path):
    model, _ = tiny_dir("llama-untied")
    prompts = tmp_path / "wikinews.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": " the quick brown fox jumps over the dog"}) + "\n"
                               for p in ("The quick brown", "Layers improve", "Contrastive decoding")))
    (tmp_path / "TruthfulQA.csv").write_text(TFQA, encoding="utf-8")
    (tmp_path / "news_factor.csv").write_text(FACTOR)
    out = tmp_path / "out"
    runs = [
        ["open-ended", "--prompts", prompts, "--methods", "greedy,top-p=0.95,acd:2,dola:low", "--max-new-tokens", 8,
         "--no-mauve"],
        ["truthfulqa", "--data", tmp_path / "TruthfulQA.csv", "--methods", "greedy,acd:3,dola:high"],
        ["factor", "--data", tmp_path / "news_factor.csv", "--methods", "greedy,acd,dola"],
    ]
    for argv in runs:
        assert main(["eval", *map(str, argv), "--model", str(model), "--out", str(out), "--limit", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    open_ended = summary["wikinews"]["methods"]
    assert set(open_ended) >= {"greedy", "top-p=0.95", "acd:2", "dola:low", "human"}
    assert all(0 <= open_ended[m]["rep-2"] <= 1 and open_ended[m]["new_tokens"] > 0 for m in open_ended if m != "human")
    mc = summary["TruthfulQA"]["methods"]
    assert all(0 <= mc[m][k] <= 1 for m in ("greedy", "acd:3", "dola:high") for k in ("MC1", "MC2", "MC3"))
    assert all(0 <= summary["news_factor"]["methods"][m]["accuracy"] <= 1 for m in ("greedy", "acd", "dola"))
    records = [json.loads(line) for line in (out / "TruthfulQA-scores.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["methods"]["greedy"]["scores"]) == 4 for r in records[:1])


def test_every_method_checked_before_the_first_runs(tiny_dir, tmp_path, capsys):
    model, _ = tiny_dir("llama-untied")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The quick brown", "reference": " fox"}) + "\n")
    out = tmp_path / "out"
    code = main(["eval", "open-ended", str(prompts), "--methods", "greedy,sample/temp=-1", "--model", str(model),
                 "--out", str(out), "--no-mauve"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sample/temp=-1" in err[0] and "temperature" in err[0], err
    assert not out.exists() or not any(out.iterdir())
    code = main(["eval", "open-ended", str(prompts), "--methods", "greedy/rt=0", "--model", str(model),
                 "--out", str(out), "--no-mauve"])
    assert code == 2 and "relative_top does not apply to open-ended" in capsys.readouterr().err
