"""The verifiers (meml/rewards.py): what counts as a final answer, checked on hand-picked cases,
on the gold solution of every record of the real data files, and under a fuzz."""
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_shared
from meml.data import Example, load_gsm8k, load_mathqa, load_strategyqa
from meml.rewards import extract_answer, option_for_value, reward


@pytest.mark.parametrize("text, expected", [
    ("#### 72", "72"),
    ("so 48 + 24 = 72\n#### 72", "72"),
    ("#### 1,080", "1080"),
    ("The answer is $1,080.00.", "1080"),
    ("The answer is \\$12", "12"),
    ("the answer is -3", "-3"),
    ("The answer is $-3.", "-3"),
    ("The answer is \u22124", "-4"),                       # U+2212 minus sign
    ("#### 5.0", "5"),
    ("#### 0.50", "0.5"),
    ("#### .5", "0.5"),
    ("The answer is 3/4", "0.75"),
    ("The answer is 1/3", "1/3"),
    ("$\\boxed{72}$", "72"),
    ("\\boxed{1{,}080 \\text{ clips}}", "1080"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("THE ANSWER IS 9", "9"),
    ("The final answer is 15 pints.", "15"),
    ("**Answer:** 42", "42"),
    ("The answer is 25%.", "25"),
    ("#### 5\nwait, no.\n#### 6", "6"),                    # several: the last marker wins
    ("\\boxed{5} ... The answer is 7", "7"),
    ("The answer is 7 ... \\boxed{5}", "5"),
    ("#### 8\nThe answer is below.", "8"),                 # unreadable last marker: skipped
    ("The answer is 2+3", "2"),                            # text is read, never evaluated
    ("The answer is 1,2345", None),                        # malformed thousands grouping
    ("no marker here: 72", None),                          # no fall-back to the last number
    ("", None),
    ("\\boxed{72", None),                                  # unclosed box
    # answer styles of instruct and math checkpoints (Llama 3.x, Qwen2.5-Math, R1-style)
    ("The final answer is: $\\boxed{18}$", "18"),
    ("The final answer is $\\boxed{18}$.", "18"),
    ("\\boxed{\\text{5}}", "5"),
    ("\\boxed{\\textbf{12} \\text{ apples}}", "12"),
    ("The answer is (5).", "5"),
    ("The answer is '5'", "5"),
    ('The answer is "5".', "5"),
    ("The answer is 10.5.3", None),                        # a version number, not 10
    ("The answer is 10.5.", "10.5"),                       # a sentence's full stop is no digit
])
def test_numeric_extraction(text, expected):
    assert extract_answer("gsm8k", text) == expected
    assert extract_answer("synthetic", text) == expected


def test_numeric_reward_compares_values_exactly():
    example = Example("x", "q", "1080", "#### 1,080")
    assert reward("gsm8k", "The answer is $1,080.0", example) == 1.0
    assert reward("gsm8k", "The answer is 1080.5", example) == 0.0
    assert reward("gsm8k", "I am not sure.", example) == 0.0
    half = Example("h", "q", "0.5", "#### 0.5")
    assert reward("gsm8k", "#### 1/2", half) == 1.0
    assert reward("gsm8k", "#### 0.4999", half) == 0.0
    assert reward("synthetic", "#### -3", Example("s", "q", "-3", "#### -3")) == 1.0
    assert type(reward("gsm8k", "#### 1080", example)) is float


OPTIONS = {"a": "24", "b": "120", "c": "625", "d": "rs . 400", "e": "31 / 36"}


@pytest.mark.parametrize("text, expected", [
    ("The answer is c", "c"),
    ("The answer is (C).", "c"),
    ("answer : option c", "c"),
    ("The answer is c ) 625", "c"),
    ("\\boxed{e}", "e"),
    ("The answer is 625 ways.", "c"),                      # the option's value, not its letter
    ("The answer is Rs. 400", "d"),
    ("The answer is 400", "d"),
    ("The answer is 31/36", "e"),
    ("The answer is 999", None),                           # no option holds it
    ("The answer is a bit unclear", None),                 # "a" inside a sentence is no letter
    ("The answer is b. No, the answer is d.", "d"),
    ("\\boxed{\\text{C}}", "c"),
    ("$\\boxed{\\textbf{(B)}}$", "b"),
    ("The answer is 'b'", "b"),
    ('The answer is "c".', "c"),
    ("Answer: C) 625", "c"),
    ("The correct answer is (e) 31/36.", "e"),
])
def test_mathqa_extraction(text, expected):
    assert extract_answer("mathqa", text, OPTIONS) == expected


def test_mathqa_value_that_two_options_share_is_no_answer():
    assert option_for_value("16", {"a": "4", "b": "16", "c": "8", "d": "2", "e": "16"}) is None


@pytest.mark.parametrize("text, expected", [
    ("The answer is yes.", "yes"),
    ("The answer is: No", "no"),
    ("answer is TRUE", "yes"),
    ("The answer is false.", "no"),
    ("The answer is yes. Actually, the answer is no.", "no"),
    ("The answer is not obvious", None),
    ("yes", None),                                         # no marker
    ("\\boxed{\\text{Yes}}", "yes"),
    ("The final answer is $\\boxed{\\textbf{No}}$.", "no"),
    ("The answer is 'yes'.", "yes"),
])
def test_strategyqa_extraction(text, expected):
    assert extract_answer("strategyqa", text) == expected


def test_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="unknown dataset"):
        extract_answer("mmlu", "#### 1")


# ---- every gold solution of the real files scores 1, and 0 once its final answer is changed ----

def test_gsm8k_train_gold_solutions_score_one():
    examples = load_gsm8k(require_shared("gsm8k", "train.jsonl"))
    assert len(examples) == 7473
    for e in examples:
        assert reward("gsm8k", e.solution, e) == 1.0, e.id
        final = re.search(r"#### *(.*)$", e.solution).group(1)
        wrong = str(int(final.replace(",", "")) + 1)
        perturbed = e.solution[: e.solution.rindex("####")] + "#### " + wrong
        assert reward("gsm8k", perturbed, e) == 0.0, e.id


def test_mathqa_dev_gold_solutions_score_one():
    examples = load_mathqa(require_shared("mathqa", "dev.json"))
    assert len(examples) == 4475
    resolved = 0
    for e in examples:
        assert reward("mathqa", e.solution, e) == 1.0, e.id
        other = "abcde"[("abcde".index(e.answer) + 1) % 5]
        perturbed = e.solution[: e.solution.rindex("The answer is")] + f"The answer is {other}."
        assert reward("mathqa", perturbed, e) == 0.0, e.id
        # writing the correct option's value instead of its letter never gives a wrong letter
        # (except a value that is itself a lone letter: mathqa-dev-1734's option a is "d")
        value = e.options[e.answer]
        by_value = extract_answer("mathqa", f"The answer is {value}", e.options)
        assert by_value in (e.answer, None) or value in "abcde", e.id
        resolved += by_value == e.answer
    assert resolved == 4460  # 14 correct values also appear under another letter, 1 is "d"


def test_strategyqa_train_gold_solutions_score_one():
    examples = load_strategyqa(require_shared("strategyqa", "strategyqa_train.json"))
    assert len(examples) == 2290
    for e in examples:
        assert reward("strategyqa", e.solution, e) == 1.0, e.id
        flipped = {"yes": "no", "no": "yes"}[e.answer]
        perturbed = e.solution[: e.solution.rindex("The answer is")] + f"The answer is {flipped}."
        assert reward("strategyqa", perturbed, e) == 0.0, e.id


# ---- fuzz: no exception, and no catastrophic backtracking, on arbitrary and adversarial text ----
# The time ceiling guards against super-linear regexes (a quadratic or exponential pattern takes
# seconds to hours on 100 KB of repeated marker fragments); it is NOT a speed target.
CEILING_S = 5.0
EXAMPLE = Example("f", "q", "7", "#### 7", {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"})
FRAGMENTS = ["####", "#", "\\boxed{", "\\boxed", "{", "}", "{,}", "\\frac{", "the answer is ",
             "answer:", "answer", " ", "\n", "$", "\\$", "-", ",", ",000", ".", "1", "123", "/",
             "(", ")", "a )", "option ", "yes", "no", "<<", ">>", "**", "9" * 45]


def _score_all(text):
    start = time.perf_counter()
    for dataset in ("gsm8k", "mathqa", "strategyqa", "synthetic"):
        assert reward(dataset, text, EXAMPLE) in (0.0, 1.0)
        answer = extract_answer(dataset, text, EXAMPLE.options)
        assert answer is None or isinstance(answer, str)
    assert time.perf_counter() - start < CEILING_S


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=2000))
def test_fuzz_arbitrary_text(text):
    _score_all(text)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12),
       st.integers(min_value=1_000, max_value=100_000))
def test_fuzz_repeated_marker_fragments_up_to_100kb(fragments, size):
    unit = "".join(fragments)
    _score_all((unit * (size // len(unit) + 1))[:size])


# ---- the work per call is bounded: only the last MAX_MARKERS markers are read ----

@pytest.mark.parametrize("unit", ["#### ", "\\boxed{", "the answer is ", "#### 1.2.3 ", "\\boxed{1.2.3} ", "answer: ("])
def test_a_200kb_text_of_repeated_markers_reads_at_most_max_markers_windows(unit, monkeypatch):
    """Counted, not timed: each marker read is one box scanned and one window handed to the
    data set's reader; 200 KB of one marker repeated ~15,000-50,000 times reads at most 64."""
    from meml import rewards
    counts = {"boxes": 0, "windows": 0}
    real_box, real_spans = rewards._boxed_content, rewards._answer_spans

    def boxes(*args):
        counts["boxes"] += 1
        return real_box(*args)

    def windows(text):
        for span in real_spans(text):
            counts["windows"] += 1
            yield span
    monkeypatch.setattr(rewards, "_boxed_content", boxes)
    monkeypatch.setattr(rewards, "_answer_spans", windows)
    text = (unit * (200_000 // len(unit) + 1))[:200_000]
    for dataset in ("gsm8k", "mathqa", "strategyqa"):
        counts.update(boxes=0, windows=0)
        extract_answer(dataset, text, EXAMPLE.options)
        assert 0 < counts["boxes"] + counts["windows"], dataset  # the counters see the reads
        assert counts["boxes"] <= rewards.MAX_MARKERS and counts["windows"] <= rewards.MAX_MARKERS, (dataset, counts)


def test_only_the_last_64_markers_are_read():
    from meml.rewards import MAX_MARKERS
    readable, unreadable = "#### 5 ", "#### x "
    assert extract_answer("gsm8k", readable + unreadable * (MAX_MARKERS - 1)) == "5"
    assert extract_answer("gsm8k", readable + unreadable * MAX_MARKERS) is None  # the documented limit


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["####", "\\boxed{", "answer is ", "ANSWER:", "answe", "x" * 500, "#", " ", "{"]),
                min_size=1, max_size=600))
def test_the_scan_from_the_end_finds_the_markers_a_scan_from_the_start_finds(pieces):
    """_last_markers (scans from near the end, reaching back) against the plain scan of the
    whole text: the same last markers, but for the oldest one kept (a scan that starts inside a
    run such as "#####" may read its tail there, as the docstring says)."""
    from meml.rewards import _MARKER, MAX_MARKERS, _last_markers
    text = "".join(pieces)
    ours = [m.span() for m in _last_markers(text)]
    plain = [m.span() for m in _MARKER.finditer(text)][-MAX_MARKERS:]
    assert len(ours) == len(plain) and ours[1:] == plain[1:]
