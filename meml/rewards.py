"""The verifiers: read a completion's final answer and score it 0 or 1: the reward r(O) of
E2-E6 (decision D16 in README.md).

RLVR rewards are exact matches of an extracted final answer, so this file decides what counts
as "the final answer". It never executes model text (no eval): it only runs regular
expressions, and every one of them is linear-time on adversarial input (no nested unbounded
quantifiers; everything after a marker is read from a window of at most `_WINDOW` characters).
The work per call is bounded however many markers a text repeats: markers are found by a regex
scan from the end of the text (`_last_markers`), and at most `MAX_MARKERS` of them, the last
ones, are read, so a 200 KB completion of 40,000 "#### " takes about a millisecond, not the
100+ ms that reading every marker in Python took (bench/bench_verifier.py prints the figures).

Rules (the same for every data set):
- An answer follows one of these markers (case-insensitive): `#### x`, `\\boxed{x}`, and
  "answer is x" / "answer: x" (so "The answer is", "The final answer is", "**Answer:**").
  Inside a box, `\\text{x}` (and \\textbf, \\mathrm, ...) reads as x; after a marker the
  answer may stand in quotes or parentheses ("'b'", "(5)").
- When a completion has several, the LAST marker that is followed by a readable answer wins
  (a model that corrects itself is scored on its correction; a marker followed by something
  unreadable, e.g. "the answer is below", is skipped). No marker, no answer: reward 0.
  There is no fall-back to "the last number in the text". Only the last MAX_MARKERS (64)
  markers are read: a completion whose last 64 markers are all unreadable has no answer.
- Numbers (gsm8k, synthetic): commas as thousands separators ("1,080"), "$" or "\\$", a minus
  sign before or after the "$" ("-3", "$-3", also U+2212), decimals ("5.0", ".5"), fractions
  ("3/4", "\\frac{3}{4}"). The answer is the FIRST number after the marker; what follows it
  is ignored ("72 clips", "25%", but also "5 - 3 = 2" reads 5: expressions are not evaluated).
  Values compare EXACTLY as rationals: "5.0" == "5", "0.5" == "1/2", but "0.333" != "1/3"
  (no tolerance: GSM8K and synthetic answers are integers). Malformed groupings such as
  "1,2345" and dotted runs such as "10.5.3" are not read as numbers. At most 40 digits per part.
- MathQA: the option letter a-e ("c", "(c)", "c )", "option c"), or the option's value
  ("625", "31/36", "rs. 400"), mapped back to its letter through `Example.options`: an exact
  match of the text (case and spacing ignored) first, else an equal number when exactly one
  option holds that number and nothing but units around it. An ambiguous value gives no answer;
  a lone letter is always read as a letter, even where an option's text is a letter.
- StrategyQA: yes / no / true / false as a word; true means yes.
"""
import re
import sys
from fractions import Fraction

from meml.data import Example
from meml.errors import InputError

DATASETS = ("gsm8k", "mathqa", "strategyqa", "synthetic")

_WINDOW = 120  # characters read after a marker; bounds the work per marker
MAX_MARKERS = 64  # markers read, the last ones; bounds the number of windows read per call

# The lookahead names every alternative's first character: it changes no match, and lets the
# scan skip other characters ~2x faster on text with no marker.
_MARKER = re.compile(r"(?=[#\\a])(?:####|\\boxed\s{0,2}\{|\banswer\s{0,3}(?:is\b|:))", re.IGNORECASE)

_NUMBER = re.compile(r"""
    [\s*:=("']{0,8}                                # "is: ", "= ", markdown bold, "(5)", "'5'"
    (?P<sign>[-\u2212])?\s?(?:\\?\$\s?)?(?P<sign2>[-\u2212])?\s?   # -$3, $-3, \$3
    (?:
        \\d?frac\{(?P<fnum>\d{1,40})\}\{(?P<fden>\d{1,40})\}    # \frac{3}{4}
      | (?P<int>\d{1,3}(?:,\d{3}){1,13}|\d{1,40})(?!,?\d)       # 1,080 or 1080, not 1,2345
        (?: \.(?P<dec>\d{1,40})(?![.\d]\d)                      # 5.0 (not 1.2.3)
          | \s?/\s?(?P<den>\d{1,40})(?!\d) )?                   # 3/4
        (?!\.\d)                                                # 10.5.3 is no number at all
      | \.(?P<lead>\d{1,40})(?![.\d]\d)                         # .5
    )
""", re.VERBOSE)

_LETTER = re.compile(r"""
    [\s*:=("'$]{0,8}(?:(?:option|choice)\s{0,2})?\(?\s?
    (?P<letter>[a-e])
    (?:\s?\)|(?=\s{0,3}(?:[.,:;!*$}\n"']|\Z)))      # "c)", or a letter alone: not "a bit"
""", re.VERBOSE | re.IGNORECASE)

_YES_NO = re.compile(r"[\s*:=(\"']{0,8}(?P<word>yes|no|true|false)\b", re.IGNORECASE)

_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s?\{([^{}]{0,100})\}")

_UNIT_PREFIX = re.compile(r"(?:rs|inr|usd)\s?\.?\s?", re.IGNORECASE)


def parse_number(text: str, pos: int = 0, endpos: int | None = None):
    """(value, end) of the number at text[pos:] (after spacing / "$"), or None. Exact rational."""
    m = _NUMBER.match(text, pos, len(text) if endpos is None else endpos)
    if m is None or (m["sign"] and m["sign2"]):
        return None
    if m["fnum"] is not None:
        if int(m["fden"]) == 0:
            return None
        value = Fraction(int(m["fnum"]), int(m["fden"]))
    elif m["int"] is not None:
        value = Fraction(int(m["int"].replace(",", "")))
        if m["dec"] is not None:
            value += Fraction(int(m["dec"]), 10 ** len(m["dec"]))
        elif m["den"] is not None:
            if int(m["den"]) == 0:
                return None
            value /= int(m["den"])
    else:
        value = Fraction(int(m["lead"]), 10 ** len(m["lead"]))
    return (-value if m["sign"] or m["sign2"] else value), m.end()


_BRACE = re.compile(r"[{}]")


def _boxed_content(text: str, start: int) -> str | None:
    """Text inside the braces opened just before `start`, if they close within the window.
    Only the braces are visited (found by a regex), not every character."""
    depth = 1
    for brace in _BRACE.finditer(text, start, min(len(text), start + _WINDOW)):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            # LaTeX thousands separators and thin spaces: 1{,}080, 1\,080; text wrappers:
            # \text{C}, \textbf{Yes}, \mathrm{5} read as their contents
            content = _TEXT_COMMAND.sub(r"\1", text[start:brace.start()])
            return content.replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    return None


def _last_markers(text: str) -> list:
    """The last MAX_MARKERS markers of the text, in text order. The scan starts near the end and
    reaches back (4x further each time) only while it has found fewer, so its work is at most a
    few scans of the text in C, never a Python step per marker of a text that repeats them.
    (A scan that starts inside a marker can read a shorter one there, e.g. the last four of
    "#####"; that can only happen to the oldest marker kept.)"""
    span = 4096
    while True:
        start = max(0, len(text) - span)
        found = list(_MARKER.finditer(text, start))
        if len(found) >= MAX_MARKERS or start == 0:
            return found[-MAX_MARKERS:]
        span *= 4


def _answer_spans(text: str):
    """(string, start, end) to read each candidate answer from, last marker first."""
    for m in reversed(_last_markers(text)):
        if m.group().startswith("\\"):
            content = _boxed_content(text, m.end())
            if content is not None:
                yield content, 0, len(content)
        else:
            yield text, m.end(), min(len(text), m.end() + _WINDOW)


def _format_number(value: Fraction) -> str:
    """Canonical text of a number: "72", "-3", "0.5" (terminating decimals), else "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    digits = 0
    while (value * 10 ** digits).denominator != 1 and digits <= 40:
        digits += 1
    if digits > 40:  # not a terminating decimal
        return f"{value.numerator}/{value.denominator}"
    scaled = str(abs(value * 10 ** digits).numerator).rjust(digits + 1, "0")
    return f"{'-' if value < 0 else ''}{scaled[:-digits]}.{scaled[-digits:]}"


def _simple_number(text: str) -> Fraction | None:
    """The number in an option-like text ("rs . 400", "625 ways"), if no other digit follows."""
    text = text.strip()
    prefix = _UNIT_PREFIX.match(text)
    pos = prefix.end() if prefix else 0
    parsed = parse_number(text, pos, min(len(text), pos + _WINDOW))
    if parsed is None or any(ch.isdigit() for ch in text[parsed[1]:pos + _WINDOW]):
        return None
    return parsed[0]


def _squash(text: str) -> str:
    return "".join(text.lower().split()).rstrip(".")


def option_for_value(value: str, options: dict[str, str]) -> str | None:
    """The letter whose option text is `value` (exact text first, then equal number), or None."""
    key = _squash(value)
    exact = [letter for letter, option in options.items() if _squash(option) == key]
    if exact:
        return exact[0] if len(exact) == 1 else None
    number = _simple_number(value)
    if number is None:
        return None
    hits = [letter for letter, option in options.items() if _simple_number(option) == number]
    return hits[0] if len(hits) == 1 else None


def _read_mathqa(text: str, pos: int, end: int, options: dict[str, str] | None) -> str | None:
    m = _LETTER.match(text, pos, end)
    if m is not None:
        return m["letter"].lower()
    if not options:
        return None
    value = text[pos:end].split("\n", 1)[0].strip(" \t*:=$")
    return option_for_value(value, options) if value else None


def _extract(dataset: str, text: str, options: dict[str, str] | None):
    """The last readable answer: a Fraction (numeric data sets) or a string, or None."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {DATASETS}")
    for span, pos, end in _answer_spans(text):
        if dataset in ("gsm8k", "synthetic"):
            parsed = parse_number(span, pos, end)
            answer = None if parsed is None else parsed[0]
        elif dataset == "mathqa":
            answer = _read_mathqa(span, pos, end, options)
        else:
            m = _YES_NO.match(span, pos, end)
            answer = None if m is None else _YES_NO_CANON[m["word"].lower()]
        if answer is not None:
            return answer
    return None


_YES_NO_CANON = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def extract_answer(dataset: str, text: str, options: dict[str, str] | None = None) -> str | None:
    """The completion's final answer in canonical form ("72", "0.5", "c", "yes"), or None.

    `options` (MathQA only) lets a written-out option value count as its letter.
    """
    answer = _extract(dataset, text, options)
    return _format_number(answer) if isinstance(answer, Fraction) else answer


def reward(dataset: str, completion: str, example: Example) -> float:
    """r(O) in {0.0, 1.0}: does the completion's final answer equal the example's gold answer?"""
    answer = _extract(dataset, completion, example.options)
    if answer is None:
        return 0.0
    if dataset in ("gsm8k", "synthetic"):
        gold = parse_number(example.answer)
        if gold is None:
            raise InputError(f"example {example.id}: gold answer {example.answer!r} is not a number")
        return float(answer == gold[0])
    return float(answer == example.answer.strip().lower())


# ---------------------------------------------------------------------------------------------
# A task's reward, built-in or the user's own (--reward)

class Verifier:
    """The reward every stage reads (E2, E5's pairs, the buffer's "wrong", D1's check of teacher
    answers, evaluation): completion, example -> a number in [0, 1]. "Correct" means 1.

    `--reward gsm8k` (or mathqa, strategyqa, synthetic) is a built-in verifier above; `--reward
    my_task.py:score` or `--reward my_package.rewards:score` is the user's own function

        def score(completion: str, example: dict) -> float     # in [0, 1]

    where `example` holds the JSONL record's fields unchanged (for a built-in data set: id,
    question, answer, solution, options). A value that is not a number in [0, 1], or an
    exception, stops the run with one line naming the function, the example and the value.
    Majority votes need to know when two answers are the same: a built-in verifier's answer
    reader (`extract_answer`) decides; the user's own function has none, so no vote is taken."""

    def __init__(self, name: str, fn=None, builtin: str | None = None, spec: str | None = None):
        self.name, self.fn, self.builtin = name, fn, builtin
        self.spec = spec or name  # what meml_run.json records: a file's path made absolute

    def __call__(self, completion: str, example: Example) -> float:
        if self.builtin is not None:
            return reward(self.builtin, completion, example)
        try:
            value = self.fn(completion, example.record())
        except Exception as e:  # the user's function failed: name it, the example and the error (one line)
            first = (str(e).splitlines() or [""])[0]
            raise InputError(f"--reward {self.name}: example {example.id!r}: raised {type(e).__name__}: {first}") from e
        number = None if isinstance(value, (str, bytes)) or value is None else _as_float(value)
        if number is None or not 0.0 <= number <= 1.0:  # NaN fails both comparisons
            raise InputError(f"--reward {self.name}: example {example.id!r}: returned {value!r}; a reward is a "
                             "number in [0, 1]")
        return number

    def answer(self, completion: str, example: Example) -> str | None:
        """The completion's answer for a majority vote (built-in verifiers only)."""
        return extract_answer(self.builtin, completion, example.options) if self.builtin else None


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def verifier_for(dataset: str, verifier: Verifier | None = None) -> Verifier:
    """`verifier`, or the data set's built-in one where none is given."""
    return verifier or Verifier(dataset, builtin=dataset)


def load_verifier(spec: str) -> Verifier:
    """--reward SPEC: a built-in name, PATH.py:function or module:function."""
    if spec in DATASETS:
        return Verifier(spec, builtin=spec)
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise InputError(f"--reward {spec}: expected one of {', '.join(DATASETS)}, PATH.py:function or "
                         "module:function")
    import importlib
    import importlib.util
    from pathlib import Path
    try:
        if path.endswith(".py"):
            if not Path(path).is_file():
                raise InputError(f"--reward {spec}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"meml_reward_{Path(path).stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # as an import does (dataclasses look themselves up there)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(path)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"--reward {spec}: loading {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--reward {spec}: {path} has no function {name!r}")
    resolved = f"{Path(path).resolve()}:{name}" if path.endswith(".py") else spec
    return Verifier(spec, fn=fn, spec=resolved)
