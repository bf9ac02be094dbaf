"""Data records shared by every data source (GSM8K, MathQA, StrategyQA, the synthetic world),
and the loaders that read the real files in their original formats into them.

A question with a verifiable gold answer and a gold worked solution (README.md, "The method, equation by equation"), and
an expert's reference answer used by MEF (E1), stored as JSONL (format below).
"""
import ast
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from meml.errors import InputError


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str                           # gold final answer, canonical form ("72", "c", "yes")
    solution: str                         # gold worked solution S_j (ends with the answer)
    options: dict[str, str] | None = None  # MathQA: option letter -> option text
    messages: tuple | None = None         # a JSONL question given as a conversation (user/assistant turns)
    fields: dict | None = None            # a JSONL record's fields, unchanged: what --reward receives

    def record(self) -> dict:
        """What a reward function of one's own receives (meml.rewards.Verifier)."""
        if self.fields is not None:
            return self.fields
        return {"id": self.id, "question": self.question, "answer": self.answer, "solution": self.solution,
                "options": self.options}


@dataclass(frozen=True)
class ExpertAnswer:
    id: str        # Example.id it answers
    expert: int    # expert index i (0 = the data set's gold solution, by convention)
    response: str  # A_j^(i): the expert's reference answer text


def question_key(example: Example) -> str:
    """A short fingerprint of a question's text, whitespace-normalised (meml_run.json keeps one
    per training question, so evaluate.py can tell when it is asked to score questions the run
    trained on, whatever file they now sit in)."""
    return hashlib.sha1(" ".join(example.question.split()).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loaders. Each returns list[Example]; a malformed record raises ValueError naming the file,
# the record (1-based line number for JSONL, 1-based record number for JSON arrays) and the field.

_CALCULATOR = re.compile(r"<<[^<>\n]{0,200}>>")  # GSM8K's "<<48/2=24>>" calculator notes


def _json_array_records(path: Path):
    """(record number, dict) for every record of a file holding one JSON array; a JSON error,
    or a record that is not an object, names the file (and the 1-based record number)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _jsonl_records(path: Path):
    """(line number, dict) for every non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def _field(record: dict, name: str, kind: type, where: str):
    """record[name], checked to be of type `kind` (bool is not accepted as int)."""
    if name not in record:
        raise InputError(f"{where}: field {name!r} is missing")
    value = record[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def load_gsm8k(path, *, keep_calculator_annotations: bool = False) -> list[Example]:
    """GSM8K JSONL ({"question", "answer"}): the answer text is the solution, `#### n` the answer.

    GSM8K solutions carry calculator annotations (`48/2 = <<48/2=24>>24`), written for a
    calculator tool used when sampling. No calculator runs here, so by default they are stripped:
    the model is trained to write the arithmetic in plain text, and does not learn a `<<...>>`
    syntax nothing executes (which also repeats every result and costs tokens).
    """
    path = Path(path)
    examples = []
    for line_no, record in _jsonl_records(path):
        where = f"{path}:{line_no}"
        question = _field(record, "question", str, where)
        solution = _field(record, "answer", str, where)
        if "####" not in solution:
            raise InputError(f"{where}: field 'answer' has no '#### <number>' final line")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not re.fullmatch(r"-?\d+(?:\.\d+)?", final):
            raise InputError(f"{where}: field 'answer': final answer {final!r} is not a number")
        if not keep_calculator_annotations:
            solution = _CALCULATOR.sub("", solution)
        examples.append(Example(f"gsm8k-{path.stem}-{line_no}", question, final, solution))
    return examples


def parse_mathqa_options(text: str) -> dict[str, str]:
    """MathQA options -> {"a": "12", ...}. Handles the three spellings found in the files:
    "a ) 12 , b ) 14 , ...", a Python-list string "['a ) 12', 'b ) 14', ...]", and the doubled
    "a ) a ) 12 , b ) b ) 14 , ..." (the inner letter is dropped). Raises ValueError if a-e are
    not all found in order.
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        items = ast.literal_eval(text)  # literals only: safe on data, never used on model text
        if not (isinstance(items, list) and all(isinstance(i, str) for i in items)):
            raise InputError(f"options list is not a list of strings: {text[:80]!r}")
        text = " , ".join(items)
    starts = []  # (letter, start of the text after "x )")
    pos = 0
    for letter in "abcde":
        sep = r"\A\s*" if letter == "a" else r"\s*,\s*"
        m = re.compile(sep + letter + r"\s?\)\s?").search(text, pos)
        if m is None:
            raise InputError(f"option {letter!r} not found in {text[:120]!r}")
        starts.append((letter, m.start(), m.end()))
        pos = m.end()
    options = {}
    for (letter, _, begin), nxt in zip(starts, starts[1:] + [(None, len(text), None)]):
        value = text[begin:nxt[1]].strip()
        options[letter] = re.sub(r"\A[a-e]\s?\)\s?", "", value).strip()  # doubled "a ) a ) 3"
    return options


def load_mathqa(path) -> list[Example]:
    """MathQA JSON array ({"Problem", "Rationale", "options", "correct", ...}).

    The solution is the Rationale with its stray surrounding double quotes removed (a CSV
    artefact in most records), plus a final line "The answer is <letter>." The Rationales end in
    many styles ("answer : c", "answer : option c", "therefore , answer c"), a few are cut short
    or name another letter; the appended line gives every gold solution the same verifiable end,
    read by the mathqa verifier (which takes the last answer marker).
    """
    path = Path(path)
    examples = []
    for number, record in _json_array_records(path):
        where = f"{path}: record {number}"
        question = _field(record, "Problem", str, where)
        rationale = _field(record, "Rationale", str, where).strip()
        correct = _field(record, "correct", str, where).strip().lower()
        if correct not in ("a", "b", "c", "d", "e"):
            raise InputError(f"{where}: field 'correct' must be a letter a-e, got {correct!r}")
        try:
            options = parse_mathqa_options(_field(record, "options", str, where))
        except (ValueError, SyntaxError) as e:
            raise InputError(f"{where}: field 'options': {e}") from e
        if len(rationale) >= 2 and rationale[0] == rationale[-1] == '"':
            rationale = rationale[1:-1].strip()
        solution = f"{rationale}\nThe answer is {correct}."
        examples.append(Example(f"mathqa-{path.stem}-{number}", question, correct, solution, options))
    return examples


def load_strategyqa(path) -> list[Example]:
    """StrategyQA JSON array ({"qid", "question", "answer": bool, "facts": [str], ...}).

    The solution is the facts, one after another on one line (runs of whitespace inside a fact
    collapsed to one space), then a line "The answer is yes." or "The answer is no."
    """
    path = Path(path)
    examples = []
    for number, record in _json_array_records(path):
        where = f"{path}: record {number}"
        qid = _field(record, "qid", str, where)
        question = _field(record, "question", str, where)
        answer = "yes" if _field(record, "answer", bool, where) else "no"
        facts = _field(record, "facts", list, where)
        if not all(isinstance(fact, str) for fact in facts):
            raise InputError(f"{where}: field 'facts' must be a list of strings")
        solution = " ".join(" ".join(fact.split()) for fact in facts)
        solution = f"{solution}\nThe answer is {answer}." if solution else f"The answer is {answer}."
        examples.append(Example(qid, question, answer, solution))
    return examples


# ---------------------------------------------------------------------------------------------
# Expert data for MEF (E1): JSONL, one object per line,
#     {"id": "<Example.id>", "expert": <int >= 0>, "response": "<the expert's answer text>"}
# Blank lines are skipped; other keys are allowed and ignored (e.g. the teacher's name).

def load_expert_jsonl(path) -> list[ExpertAnswer]:
    """Read expert answers; a bad line raises ValueError naming the file, line and field."""
    path = Path(path)
    answers = []
    for line_no, record in _jsonl_records(path):
        where = f"{path}:{line_no}"
        id_ = _field(record, "id", str, where)
        expert = _field(record, "expert", int, where)
        if expert < 0:
            raise InputError(f"{where}: field 'expert' must be >= 0, got {expert}")
        response = _field(record, "response", str, where)
        answers.append(ExpertAnswer(id_, expert, response))
    return answers


def write_expert_jsonl(path, answers) -> None:
    """Write expert answers atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for a in answers:
                row = {"id": a.id, "expert": a.expert, "response": a.response}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# Your own task: JSONL, one object per line,
#     {"question": "<text>" or [{"role": "user", "content": "..."}, ...], "answer": "<gold answer>",
#      "id": "<optional>", "solution": "<optional worked solution>", ...any other fields}
# The other fields reach the reward function unchanged (--reward, meml.rewards.Verifier).

def load_jsonl(path) -> list[Example]:
    """Questions of one's own task. `question` is a string (the user message) or a conversation:
    user and assistant turns, ending with the user's; the experts' system prompts are the system
    messages, so a record's own system message is refused. `answer` is a string or a number;
    `id` defaults to jsonl-<file stem>-<line>; `solution` (expert 0's worked answer: MEF's and
    the buffer's target) may be left out."""
    path = Path(path)
    examples, seen = [], {}
    for line_no, record in _jsonl_records(path):
        where = f"{path}:{line_no}"
        question = record.get("question")
        if question is None:
            raise InputError(f"{where}: field 'question' is missing")
        messages = _conversation(question, where) if isinstance(question, list) else None
        if messages is None and not isinstance(question, str):
            raise InputError(f"{where}: field 'question' must be a string or a list of messages, "
                             f"got {type(question).__name__}")
        if "answer" not in record:
            raise InputError(f"{where}: field 'answer' is missing")
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise InputError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
        id_ = _field(record, "id", str, where) if "id" in record else f"jsonl-{path.stem}-{line_no}"
        if id_ in seen:
            raise InputError(f"{where}: id {id_!r} is already the id of line {seen[id_]}")
        seen[id_] = line_no
        solution = _field(record, "solution", str, where) if "solution" in record else ""
        text = question if messages is None else "\n".join(m["content"] for m in messages)
        gold = format(Decimal(repr(answer)), "f") if isinstance(answer, float) else str(answer)  # 1e-05 -> 0.00001
        examples.append(Example(id_, text, gold, solution, messages=messages, fields=record))
    return examples


def _conversation(messages: list, where: str) -> tuple:
    """A JSONL question given as messages, checked: user/assistant turns ending with the user's."""
    if not messages:
        raise InputError(f"{where}: field 'question' is an empty list of messages")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant")):
            if isinstance(m, dict) and m.get("role") == "system":
                raise InputError(f"{where}: message {k}: a system message; the experts' system prompts are the "
                                 "system messages (an expert is its system prompt), so put it in the user turn")
            raise InputError(f"{where}: message {k}: expected {{\"role\": \"user\" or \"assistant\", "
                             f"\"content\": string}}, got {json.dumps(m)[:80]}")
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: the conversation ends with an assistant message; it must end with the "
                         "user's turn, which the experts answer")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


# Data set name -> loader of its original file format (train.py --dataset, evaluate.py --dataset).
LOADERS = {"gsm8k": load_gsm8k, "mathqa": load_mathqa, "strategyqa": load_strategyqa, "jsonl": load_jsonl}
