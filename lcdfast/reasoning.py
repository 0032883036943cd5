"""Chain-of-thought reasoning as DoLa evaluates it (its gsm8k_eval.py and strqa_eval.py): few-shot exemplars
"Q: ...\\nA: <chain> <trigger> <answer>.", generation until "Q:" (and a task's second stop string), the answer
read from the completion, accuracy. DoLa runs these with its low layer bucket and repetition penalty 1.2 (its
scripts' default in DoLa mode; 1.0 for the baseline).

- GSM8K: Wei et al.'s 8 math exemplars; the answer is the first number after "the answer is", else the last
  number in the completion, commas dropped and a trailing "." cut; right if it equals, as a string, the number
  after "####" in the reference.
- StrategyQA: the 6 yes/no exemplars; the answer is the first sentence after "answer is" (yes or no), else
  "no" if "no" appears anywhere in the completion, else "yes"; anything else after the trigger counts as
  "no" (DoLa's one-try rule). Records keep whether the trigger was found."""

import json
import re
import time
from pathlib import Path

from .errors import LcdError
from .evaluate import MethodSpec, _check_limit, _finish, _run_methods

GSM8K_SHOTS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. "
     "So there must have been 21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
     "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.",
     "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8.", "8"),
]
STRATEGYQA_SHOTS = [
    ("Do hamsters provide food for any animals?",
     "Hamsters are prey animals. Prey are food for predators. Thus, hamsters provide food for some animals.", "yes"),
    ("Could Brooke Shields succeed at University of Pennsylvania?",
     "Brooke Shields went to Princeton University. Princeton University is about as academically rigorous as the "
     "University of Pennsylvania. Thus, Brooke Shields could also succeed at the University of Pennsylvania.", "yes"),
    ("Yes or no: Hydrogen's atomic number squared exceeds number of Spice Girls?",
     "Hydrogen has an atomic number of 1. 1 squared is 1. There are 5 Spice Girls. Thus, Hydrogen's atomic number "
     "squared is less than 5.", "no"),
    ("Yes or no: Is it common to see frost during some college commencements?",
     "College commencement ceremonies can happen in December, May, and June. December is in the winter, so there "
     "can be frost. Thus, there could be frost at some commencements.", "yes"),
    ("Yes or no: Could a llama birth twice during War in Vietnam (1945-46)?",
     "The War in Vietnam was 6 months. The gestation period for a llama is 11 months, which is more than 6 months. "
     "Thus, a llama could not give birth twice during the War in Vietnam.", "no"),
    ("Yes or no: Would a pear sink in water?",
     "The density of a pear is about 0.6 g/cm^3, which is less than water. Objects less dense than water float. "
     "Thus, a pear would float.", "no"),
]
TASKS = {  # exemplars, answer trigger, stop strings
    "gsm8k": (GSM8K_SHOTS, "The answer is", ["Q:", "\\end{code}"]),
    "strategyqa": (STRATEGYQA_SHOTS, "So the answer is", ["Q:", "\n\n##"]),
}


def cot_prompt(task: str, question: str) -> str:
    shots, trigger, _ = TASKS[task]
    demo = "".join(f"Q: {q}\nA: {chain} {trigger} {answer}.\n\n" for q, chain, answer in shots)
    return demo + "Q: " + question + "\nA:"


def gsm8k_answer(completion: str) -> str | None:
    """The number a completion gives (DoLa's clean_answer), None if it gives none."""
    parts = completion.lower().split("the answer is")
    text = (parts[1] if len(parts) > 1 else parts[-1]).replace(",", "")
    numbers = re.findall(r"-?\d+\.?\d*", text)
    if not numbers:
        return None
    number = numbers[0] if len(parts) > 1 else numbers[-1]
    return number[:-1] if number.endswith(".") else number


def gsm8k_truth(answer: str) -> str:
    """The reference's final number (after "####", commas dropped)."""
    m = re.search(r"#### (-?[0-9.,]+)", answer)
    if m is None:
        raise LcdError(f"gsm8k: reference answer {answer[-40:]!r} has no '#### NUMBER'")
    return m.group(1).strip().replace(",", "")


def strategyqa_answer(completion: str) -> tuple[bool, bool]:
    """(the completion's yes/no as a bool, whether it said "answer is") by DoLa's one-try rule."""
    text = completion.lower()
    if "answer is" in text:
        word = text.split("answer is")[1].split(".")[0].strip()
        return word == "yes", True
    return "no" not in text, False


def read_questions(task: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """{"id", "question", "truth"} from GSM8K's JSONL (question, answer) or StrategyQA's JSON list (question,
    answer as a boolean); LcdError naming the file and record for anything else."""
    _check_limit(limit)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if task == "gsm8k" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LcdError(f"{path}: not a {task} file ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(rows, list) or not rows:
        raise LcdError(f"{path}: expected {'JSON lines' if task == 'gsm8k' else 'a JSON list'} of questions")
    items = []
    for i, row in enumerate(rows[:limit]):
        kind = str if task == "gsm8k" else bool
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip() \
                or not isinstance(row.get("answer"), kind):
            raise LcdError(f"{path}: record {i + 1} needs a 'question' string and an 'answer' {kind.__name__}")
        truth = gsm8k_truth(row["answer"]) if task == "gsm8k" else row["answer"]
        items.append({"id": str(row.get("qid", i)), "question": row["question"], "truth": truth})
    return items


def eval_reasoning(engine, task: str, path: str | Path, out_dir: str | Path, methods: list[MethodSpec],
                   limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0) -> dict:
    """Each question answered with chain of thought under every method (resumable: out_dir/<stem>-<method>.jsonl);
    accuracy, how many answers were found, mean new tokens and time."""
    if task not in TASKS:
        raise LcdError(f"task: '{task}' is not one of {', '.join(TASKS)}")
    items = read_questions(task, path, limit)
    stops = TASKS[task][2]

    def work(batch: list[dict], opts: dict) -> list[dict]:
        t0 = time.perf_counter()
        outs = engine.generate([cot_prompt(task, it["question"]) for it in batch], max_new_tokens=max_new_tokens,
                               stop=stops, batch_size=batch_size, seed=seed, **opts)
        secs = (time.perf_counter() - t0) / len(batch)
        records = []
        for it, o in zip(batch, outs):
            completion = o.text.strip()
            if task == "gsm8k":
                answer = gsm8k_answer(completion)
                found = answer is not None
            else:
                answer, found = strategyqa_answer(completion)
            records.append({"id": it["id"], "completion": completion, "answer": answer, "found": found,
                            "correct": answer == it["truth"], "new_tokens": len(o.token_ids), "seconds": secs})
        return records

    config = {"max_new_tokens": max_new_tokens, "seed": seed, "prompt": "dola-cot-v1"}
    fields = {"completion": str, "correct": bool, "new_tokens": int, "seconds": int | float}
    rows = {}
    for name, (opts, recs) in _run_methods(task, path, out_dir, items, methods, batch_size, work, config,
                                           fields).items():
        n = len(recs)
        seconds = sum(r["seconds"] for r in recs)
        rows[name] = {"accuracy": sum(r["correct"] for r in recs) / n, "answered": sum(r["found"] for r in recs) / n,
                      "new_tokens": sum(r["new_tokens"] for r in recs) / n, "seconds": seconds, "options": opts}
    return _finish(task, path, out_dir, len(items), rows, [])
