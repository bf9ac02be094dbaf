"""Your own task (issue 22): a JSONL data file, a reward function of your own (--reward), the
chat template applied to plain and conversational questions, and one line for every mistake.

Oracles: transformers' apply_chat_template on the real Qwen2.5 and Llama 3.2 tokenizers (the
expert's prompt must be exactly the checkpoint's rendering of [system P_i] + the question's
turns); rewards and counts worked by hand.
"""
import json

import pytest

from conftest import require_shared
from meml.data import load_jsonl
from meml.errors import InputError
from meml.prompts import expert_prompt
from meml.rewards import load_verifier


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CONVERSATION = [{"role": "user", "content": "I have a sum for you."},
                {"role": "assistant", "content": "Go ahead."},
                {"role": "user", "content": "What is 17 + 25?"}]


def test_a_jsonl_task_keeps_every_field_for_the_reward(tmp_path):
    path = write(tmp_path / "mine.jsonl", [
        {"question": "What is 2 + 3?", "answer": 5, "solution": "2 + 3 = 5. The answer is 5.", "unit": "apples"},
        {"question": CONVERSATION, "answer": "42", "id": "chat-1", "difficulty": 2},
        ""])  # a blank line is skipped
    plain, chat = load_jsonl(path)
    assert (plain.id, plain.question, plain.answer, plain.messages) == ("jsonl-mine-1", "What is 2 + 3?", "5", None)
    assert plain.record()["unit"] == "apples" and plain.solution.endswith("5.")
    assert chat.id == "chat-1" and chat.solution == "" and chat.messages == tuple(CONVERSATION)
    assert chat.record() == {"question": CONVERSATION, "answer": "42", "id": "chat-1", "difficulty": 2}


@pytest.mark.parametrize("line, message", [
    ({"answer": "1"}, "mine.jsonl:1: field 'question' is missing"),
    ({"question": "q"}, "mine.jsonl:1: field 'answer' is missing"),
    ({"question": 3, "answer": "1"}, "field 'question' must be a string or a list of messages"),
    ({"question": "q", "answer": True}, "field 'answer' must be a string or a number"),
    ({"question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], "answer": "1"},
     "mine.jsonl:1: message 0: a system message; the experts' system prompts are the system messages"),
    ({"question": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"},
     "mine.jsonl:1: the conversation ends with an assistant message"),
    ({"question": [{"role": "user"}], "answer": "1"}, "mine.jsonl:1: message 0: expected"),
    ({"question": [], "answer": "1"}, "mine.jsonl:1: field 'question' is an empty list of messages"),
    ("not json", "mine.jsonl:1: invalid JSON"),
])
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, line, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_jsonl(write(tmp_path / "mine.jsonl", [line]))


def test_two_records_with_one_id_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"mine.jsonl:3: id 'a' is already the id of line 1"):
        load_jsonl(write(tmp_path / "mine.jsonl", [{"question": "q", "answer": 1, "id": "a"},
                                                   {"question": "r", "answer": 2},
                                                   {"question": "s", "answer": 3, "id": "a"}]))


@pytest.mark.parametrize("name", ["qwen2.5", "llama3"])
def test_plain_and_conversational_questions_render_through_the_chat_template(tmp_path, name):
    """A plain string is the user message under the expert's system prompt; a conversation keeps
    its turns. Both are the checkpoint's own template's rendering (transformers as the oracle)."""
    transformers = pytest.importorskip("transformers")
    from meml.tokenizer import Tokenizer
    folder = require_shared("tokenizers", name)
    tok, reference = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    plain, chat = load_jsonl(write(tmp_path / "t.jsonl", [{"question": "What is 2 + 3?", "answer": 5},
                                                          {"question": CONVERSATION, "answer": 42}]))
    system = {"role": "system", "content": "You are Expert 1."}
    for example, turns in ((plain, [{"role": "user", "content": "What is 2 + 3?"}]), (chat, CONVERSATION)):
        expected = reference.apply_chat_template([system, *turns], tokenize=True, return_dict=True,
                                                 add_generation_prompt=True, date_string="26 Jul 2024")["input_ids"]
        assert expert_prompt(tok, system["content"], "jsonl", example) == expected


# ---- --reward ----

REWARDS = '''
import math

def half(completion, example):
    return 0.5

def by_field(completion, example):
    return 1.0 if completion.strip() == str(example["answer"]) + example.get("unit", "") else 0.0

def boom(completion, example):
    raise KeyError("no such field")

def nan(completion, example):
    return math.nan

def too_big(completion, example):
    return 1.5

def text(completion, example):
    return "1"
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARDS)
    return path


def test_a_reward_function_of_ones_own_reads_the_records_fields(tmp_path, reward_file):
    (example,) = load_jsonl(write(tmp_path / "d.jsonl", [{"question": "q", "answer": 5, "unit": "kg"}]))
    verifier = load_verifier(f"{reward_file}:by_field")
    assert verifier("5kg", example) == 1.0 and verifier("5", example) == 0.0
    assert load_verifier(f"{reward_file}:half")("anything", example) == 0.5
    assert verifier.builtin is None and verifier.answer("5kg", example) is None  # no answer reader: no vote


def test_a_module_reward_and_the_built_in_ones_are_one_path(tmp_path, monkeypatch, reward_file):
    monkeypatch.syspath_prepend(str(tmp_path))
    (example,) = load_jsonl(write(tmp_path / "d.jsonl", [{"question": "q", "answer": 7, "solution": "#### 7"}]))
    assert load_verifier("my_reward:half")("x", example) == 0.5
    gsm8k = load_verifier("gsm8k")
    assert gsm8k("so #### 7", example) == 1.0 and gsm8k("7", example) == 0.0  # no marker, no answer (D16)


@pytest.mark.parametrize("function, message", [
    ("boom", "--reward {f}:boom: example 'jsonl-d-1': raised KeyError: 'no such field'"),
    ("nan", "--reward {f}:nan: example 'jsonl-d-1': returned nan; a reward is a number in [0, 1]"),
    ("too_big", "--reward {f}:too_big: example 'jsonl-d-1': returned 1.5; a reward is a number in [0, 1]"),
    ("text", "--reward {f}:text: example 'jsonl-d-1': returned '1'; a reward is a number in [0, 1]"),
])
def test_a_bad_reward_stops_with_one_line_naming_function_example_and_value(tmp_path, reward_file, function, message):
    (example,) = load_jsonl(write(tmp_path / "d.jsonl", [{"question": "q", "answer": 5}]))
    verifier = load_verifier(f"{reward_file}:{function}")
    with pytest.raises(InputError) as caught:
        verifier("5", example)
    assert str(caught.value) == message.format(f=reward_file)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("spec, message", [
    ("nowhere.py:score", "--reward nowhere.py:score: no file nowhere.py"),
    ("{f}:missing", "--reward {f}:missing: {f} has no function 'missing'"),
    ("no_such_module_here:score", "--reward no_such_module_here:score: loading no_such_module_here failed"),
    ("score", "--reward score: expected one of gsm8k, mathqa, strategyqa, synthetic, PATH.py:function"),
])
def test_a_reward_that_cannot_be_loaded_is_one_line(reward_file, spec, message):
    with pytest.raises(InputError) as caught:
        load_verifier(spec.format(f=reward_file))
    assert str(caught.value).startswith(message.format(f=reward_file))


# ---- a whole run ----

COUNTING = '''
import json, os

def score(completion, example):
    """0.5 for anything; each call is written down, with the record's own field."""
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"id": example.get("id"), "colour": example["colour"]}) + "\\n")
    return 0.5
'''


def _own_task_run(tmp_path, monkeypatch, extra):
    import sys

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    from test_train import _model_folder
    folder = _model_folder(tmp_path)
    (tmp_path / "counting.py").write_text(COUNTING)
    records = [{"question": f"What is {n} + 1?" if n % 2 else [{"role": "user", "content": "A sum."},
                                                                 {"role": "assistant", "content": "Yes?"},
                                                                 {"role": "user", "content": f"{n} + 1?"}],
                "answer": n + 1, "colour": "red" if n % 3 else "blue",
                **({"solution": f"{n}+1={n + 1}\n#### {n + 1}"} if n < 4 else {})} for n in range(8)]
    data = write(tmp_path / "sums.jsonl", records)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    monkeypatch.chdir(tmp_path)  # the reward named relative to here, as a user types it
    args = ["--model", str(folder), "--dataset", "jsonl", "--data", str(data),
            "--reward", "counting.py:score", "--output", str(tmp_path / "run"), "--mef-steps", "0", "--riel-steps", "2", "--eval-size", "2",
            "--pass-k", "0", "--max-new-tokens", "4", "--eval-max-new-tokens", "4", "--questions-per-step", "2",
            "--group-size", "3", "--buffer-k", "1", "--buffer-capacity", "2", "--mef-batch-size", "2", *extra]
    assert train.main(args) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("stage") == "riel"]
    return calls, steps, json.loads((tmp_path / "run" / "results.json").read_text())["results"]


def test_a_run_on_ones_own_task_reads_its_reward_everywhere(tmp_path, monkeypatch, capsys):
    calls, steps, results = _own_task_run(tmp_path, monkeypatch, [])
    out = capsys.readouterr().out
    # D1 checks expert 0's 4 solutions with the reward: 0.5 is not correct, so all are dropped
    assert "dropped as wrong: {0: 4, 1: 0, 2: 0}" in out
    # 2 RIEL steps x 2 questions x 3 experts x G = 3 rollouts, 2 evaluations x 2 questions x 3 experts
    assert len(calls) == 4 + 2 * 2 * 3 * 3 + 2 * 2 * 3 and {c["colour"] for c in calls} == {"red", "blue"}
    assert [s["reward"] for s in steps] == [0.5, 0.5]
    assert sum(s["buffer/insertions"] for s in steps) > 0  # 0.5 is below --buffer-wrong-below 1: "wrong"
    assert results["after RIEL"]["accuracy"] == [0.0, 0.0, 0.0]  # correct means reward 1
    assert results["after RIEL"]["majority_vote"] is None and "n/a" in out  # no answer reader: no vote
    assert "training questions have no SFT target for the buffer" in out
    # evaluate.py scores the run's checkpoint with the run's own reward, recorded with its absolute path
    import evaluate
    info = json.loads((tmp_path / "run" / "meml_run.json").read_text())
    assert info["reward"] == f"{(tmp_path / 'counting.py').resolve()}:score"
    (tmp_path / "calls.jsonl").unlink()
    monkeypatch.chdir(tmp_path / "run")  # evaluate.py from another folder
    assert evaluate.main(["--model", str(tmp_path / "run" / "checkpoint-000002"), "--pass-k", "0"]) == 0
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 2 * 3


def test_buffer_wrong_below_sets_what_counts_as_wrong(tmp_path, monkeypatch):
    _, steps, _ = _own_task_run(tmp_path, monkeypatch, ["--buffer-wrong-below", "0.5"])
    assert sum(s["buffer/insertions"] for s in steps) == 0  # 0.5 is not below 0.5


def test_a_jsonl_task_without_a_reward_is_one_line(tmp_path, capsys):
    import sys

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    data = write(tmp_path / "d.jsonl", [{"question": "q", "answer": 1}] * 3)
    assert train.main(["--model", str(tmp_path), "--dataset", "jsonl", "--data", str(data),
                       "--output", str(tmp_path / "run")]) == 2
    assert "--dataset jsonl needs --reward" in capsys.readouterr().err


def test_the_examples_files_run_through_train_py(tmp_path, capsys):
    """examples/word_problems as the README runs it (on a random checkpoint of the built-in
    world's shapes here, a step of each kind): its data loads, its prompts are the experts', and
    its reward reads the records' own `tolerance` (a near miss scores 0.5)."""
    import sys

    from conftest import REPO_ROOT
    sys.path.insert(0, str(REPO_ROOT))
    import train
    from test_train import _model_folder
    folder, example = _model_folder(tmp_path), REPO_ROOT / "examples" / "word_problems"
    records = load_jsonl(example / "word_problems.jsonl")
    score = load_verifier(f"{example / 'reward.py'}:score")
    two_step = next(r for r in records if r.record()["tolerance"] == 2)
    right = int(two_step.answer)
    assert (score(f"#### {right}", two_step), score(f"#### {right + 2}", two_step), score(f"{right}", two_step)) \
        == (1.0, 0.5, 0.0)
    assert sum(r.messages is not None for r in records) == 120 and sum(bool(r.solution) for r in records) == 180
    assert train.main(["--model", str(folder), "--dataset", "jsonl", "--data", str(example / "word_problems.jsonl"),
                       "--reward", f"{example / 'reward.py'}:score", "--system-prompts", str(example / "prompts.json"),
                       "--mef-steps", "1", "--riel-steps", "1", "--eval-size", "2", "--pass-k", "0",
                       "--max-new-tokens", "4", "--eval-max-new-tokens", "4", "--questions-per-step", "1",
                       "--group-size", "2", "--buffer-k", "1", "--mef-batch-size", "2",
                       "--output", str(tmp_path / "run")]) == 0
    assert "after RIEL" in capsys.readouterr().out


def test_a_json_float_answer_keeps_its_digits(tmp_path):
    """0.00001 is the answer 0.00001: str() wrote 1e-05, which the verifier read as 1."""
    (example,) = load_jsonl(write(tmp_path / "d.jsonl", [{"question": "q", "answer": 0.00001}]))
    assert example.answer == "0.00001"
    assert load_verifier("gsm8k")("#### 1", example) == 0.0 and load_verifier("gsm8k")("#### 0.00001", example) == 1.0


MULTI = ("from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass Box:\n"
         "    value: float\n\ndef score(completion, example):\n    return Box(1.0).value\n")


def test_a_reward_module_may_define_a_dataclass(tmp_path):
    """The module is in sys.modules while it runs, as an import would put it (dataclasses look it up)."""
    (tmp_path / "multi.py").write_text(MULTI)
    (example,) = load_jsonl(write(tmp_path / "d.jsonl", [{"question": "q", "answer": 1}]))
    assert load_verifier(f"{tmp_path / 'multi.py'}:score")("x", example) == 1.0


def test_a_reward_error_of_several_lines_is_still_one_line(tmp_path):
    (tmp_path / "noisy.py").write_text("def noisy(completion, example):\n    raise ValueError('first line\\nsecond line')\n")
    (example,) = load_jsonl(write(tmp_path / "d.jsonl", [{"question": "q", "answer": 1}]))
    with pytest.raises(InputError) as caught:
        load_verifier(f"{tmp_path / 'noisy.py'}:noisy")("x", example)
    assert str(caught.value).endswith("raised ValueError: first line")
