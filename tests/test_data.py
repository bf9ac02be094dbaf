"""The loaders (meml/data.py): every record of the real files loads into an Example, and a
malformed file fails with a message naming the file, the line (or record) and the field."""
import json
import os

import pytest

from conftest import require_shared
from meml.data import (ExpertAnswer, load_expert_jsonl, load_gsm8k, load_mathqa,
                       load_strategyqa, parse_mathqa_options, write_expert_jsonl)


# ---- the real files ----

def test_gsm8k_train_loads_every_record():
    path = require_shared("gsm8k", "train.jsonl")
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    examples = load_gsm8k(path)
    assert len(examples) == len(raw) == 7473
    assert len({e.id for e in examples}) == 7473
    for e, r in zip(examples, raw):
        assert e.question == r["question"]
        assert e.answer == r["answer"].split("####")[-1].strip().replace(",", "")
        assert "<<" not in e.solution and ">>" not in e.solution   # calculator notes stripped
        assert e.solution.splitlines()[-1] == r["answer"].splitlines()[-1]  # "#### n" kept
    assert examples[0].solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                                    "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                                    "#### 72")
    assert {e.answer for e in examples} >= {"1080", "-7"}     # "1,080" and a negative answer


def test_gsm8k_can_keep_calculator_annotations():
    path = require_shared("gsm8k", "train.jsonl")
    kept = load_gsm8k(path, keep_calculator_annotations=True)
    assert kept[0].solution.startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")


def test_mathqa_dev_loads_every_record():
    path = require_shared("mathqa", "dev.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    examples = load_mathqa(path)
    assert len(examples) == len(raw) == 4475
    for e, r in zip(examples, raw):
        assert e.question == r["Problem"] and e.answer == r["correct"]
        assert sorted(e.options) == list("abcde") and all(e.options.values())
        assert e.solution.endswith(f"\nThe answer is {r['correct']}.")
        assert r["Rationale"].strip().strip('"').strip() in e.solution
    first = examples[0]
    assert first.options == {"a": "24", "b": "120", "c": "625", "d": "720", "e": "1024"}
    assert not first.solution.startswith('"')


def test_strategyqa_train_loads_every_record():
    path = require_shared("strategyqa", "strategyqa_train.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    examples = load_strategyqa(path)
    assert len(examples) == len(raw) == 2290
    assert [e.id for e in examples] == [r["qid"] for r in raw]
    assert sum(e.answer == "yes" for e in examples) == 1071   # SOURCES.md: True 1071 / False 1219
    assert examples[0].solution == (
        "Julius Caesar had three children. Genghis Khan had sixteen children. Modern "
        "geneticists have determined that out of every 200 men today has DNA that can be traced "
        "to Genghis Khan.\nThe answer is yes.")


# ---- MathQA's three spellings of the options ----

@pytest.mark.parametrize("text", [
    "a ) 12 , b ) 14 , c ) 1 / 2 , d ) $ 1,600 , e ) none of these",
    "['a ) 12', 'b ) 14', 'c ) 1 / 2', 'd ) $ 1,600', 'e ) none of these']",
    "a ) a ) 12 , b ) b ) 14 , c ) c ) 1 / 2 , d ) d ) $ 1,600 , e ) d ) none of these",
])
def test_mathqa_options_spellings(text):
    assert parse_mathqa_options(text) == {
        "a": "12", "b": "14", "c": "1 / 2", "d": "$ 1,600", "e": "none of these"}


def test_mathqa_option_text_may_contain_commas():
    options = parse_mathqa_options("a ) 1 , 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6")
    assert options["a"] == "1 , 2" and options["b"] == "3"


# ---- malformed files: the error names the file, the line (or record) and the field ----

GOOD_GSM8K = json.dumps({"question": "q", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"})


@pytest.mark.parametrize("bad_line, field", [
    ('{"question": "q", "answer": "#### 2"', "invalid JSON"),
    ('{"answer": "#### 2"}', "'question'"),
    ('{"question": "q", "answer": 2}', "'answer'"),
    ('{"question": "q", "answer": "no final line"}', "'answer'"),
    ('{"question": "q", "answer": "#### two"}', "'answer'"),
    ('["q", "#### 2"]', "JSON object"),
])
def test_gsm8k_bad_line_names_file_line_and_field(tmp_path, bad_line, field):
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD_GSM8K}\n\n{bad_line}\n{GOOD_GSM8K}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_gsm8k(path)
    assert f"{path}:3:" in str(info.value) and field in str(info.value)


def _mathqa_record(**change):
    record = {"Problem": "p", "Rationale": "r", "correct": "b",
              "options": "a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5"}
    record.update(change)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize("change, field", [
    ({"Problem": None}, "'Problem'"),
    ({"correct": "f"}, "'correct'"),
    ({"correct": 2}, "'correct'"),
    ({"options": "a ) 1 , b ) 2 , d ) 4 , e ) 5"}, "'options'"),
])
def test_mathqa_bad_record_names_file_record_and_field(tmp_path, change, field):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([_mathqa_record(), _mathqa_record(**change)]), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_mathqa(path)
    assert f"{path}: record 2:" in str(info.value) and field in str(info.value)


def test_mathqa_loads_a_good_record(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([_mathqa_record()]), encoding="utf-8")
    [e] = load_mathqa(path)
    assert e.id == "mathqa-dev-1" and e.answer == "b" and e.solution == "r\nThe answer is b."


@pytest.mark.parametrize("loader", [load_mathqa, load_strategyqa])
def test_whole_file_json_error_names_the_file(tmp_path, loader):
    path = tmp_path / "broken.json"
    path.write_text('[{"a": 1},\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        loader(path)


@pytest.mark.parametrize("change, field", [
    ({"answer": "yes"}, "'answer'"),
    ({"facts": "one fact"}, "'facts'"),
    ({"facts": ["ok", 3]}, "'facts'"),
    ({"qid": None}, "'qid'"),
])
def test_strategyqa_bad_record_names_file_record_and_field(tmp_path, change, field):
    good = {"qid": "x", "question": "q?", "answer": True, "facts": ["f."]}
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([good, bad]), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_strategyqa(path)
    assert f"{path}: record 2:" in str(info.value) and field in str(info.value)


# ---- the expert JSONL used by MEF (E1) ----

ANSWERS = [ExpertAnswer("gsm8k-train-1", 0, "48/2 = 24\n#### 72"),
           ExpertAnswer("gsm8k-train-1", 2, "Unicode é ✓ and \"quotes\"\n#### 72")]


def test_expert_jsonl_round_trip(tmp_path):
    path = tmp_path / "experts.jsonl"
    write_expert_jsonl(path, ANSWERS)
    assert load_expert_jsonl(path) == ANSWERS
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == {
        "id": "gsm8k-train-1", "expert": 0, "response": "48/2 = 24\n#### 72"}


def test_expert_jsonl_write_is_atomic(tmp_path):
    path = tmp_path / "experts.jsonl"
    write_expert_jsonl(path, ANSWERS)
    before = path.read_bytes()

    def failing():
        yield ANSWERS[0]
        raise RuntimeError("teacher crashed")

    with pytest.raises(RuntimeError):
        write_expert_jsonl(path, failing())
    assert path.read_bytes() == before          # the old file is untouched
    assert os.listdir(tmp_path) == ["experts.jsonl"]  # and no temporary file is left


def test_expert_jsonl_skips_blank_lines_and_ignores_extra_keys(tmp_path):
    path = tmp_path / "experts.jsonl"
    path.write_text('\n{"id": "a", "expert": 1, "response": "r", "teacher": "R1"}\n\n',
                    encoding="utf-8")
    assert load_expert_jsonl(path) == [ExpertAnswer("a", 1, "r")]


@pytest.mark.parametrize("bad_line, field", [
    ("not json", "invalid JSON"),
    ('{"expert": 1, "response": "r"}', "'id'"),
    ('{"id": "a", "response": "r"}', "'expert'"),
    ('{"id": "a", "expert": "1", "response": "r"}', "'expert'"),
    ('{"id": "a", "expert": true, "response": "r"}', "'expert'"),
    ('{"id": "a", "expert": -1, "response": "r"}', "'expert'"),
    ('{"id": "a", "expert": 1}', "'response'"),
    ('{"id": "a", "expert": 1, "response": null}', "'response'"),
    ('{"id": 7, "expert": 1, "response": "r"}', "'id'"),
])
def test_expert_jsonl_bad_line_names_file_line_and_field(tmp_path, bad_line, field):
    path = tmp_path / "experts.jsonl"
    path.write_text('{"id": "a", "expert": 0, "response": "r"}\n' + bad_line + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_expert_jsonl(path)
    assert f"{path}:2:" in str(info.value) and field in str(info.value)
