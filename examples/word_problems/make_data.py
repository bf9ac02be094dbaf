"""Writes word_problems.jsonl (`python examples/word_problems/make_data.py`): questions of the built-in world's
held-out split, so the default run never trained on them, a third of them asked as a short
conversation and the rest as a plain string, each with its own `tolerance` for the reward (2 where
a product is involved, else 1). A worked solution in expert 0's format is given for half of them
(the others show a task without one)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for meml
from meml import synthetic  # noqa: E402

problems = synthetic.generate_problems(360, "eval", seed=7, mix={"sub": 1, "groups": 1, "mul": 1})
with open(Path(__file__).parent / "word_problems.jsonl", "w") as f:
    for k, p in enumerate(problems):
        question = p.question()
        if k % 3 == 0:
            question = [{"role": "user", "content": "Can you help with a word problem?"},
                        {"role": "assistant", "content": "Yes. What is it?"},
                        {"role": "user", "content": question}]
        record = {"id": f"wp-{k:03d}", "question": question, "answer": p.answer, "tolerance": 1 if p.family == "sub" else 2}
        if k % 2 == 0:
            record["solution"] = synthetic.write(p, "steps")
        f.write(json.dumps(record) + "\n")
