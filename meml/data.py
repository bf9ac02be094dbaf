"""Data records shared by every data source (GSM8K, MathQA, StrategyQA, the synthetic world).

A question with a verifiable gold answer and a gold worked solution (METHOD.md, Notation), and
an expert's reference answer used by MEF (E1).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str                           # gold final answer, canonical form ("72", "c", "yes")
    solution: str                         # gold worked solution S_j (ends with the answer)
    options: dict[str, str] | None = None  # MathQA: option letter -> option text


@dataclass(frozen=True)
class ExpertAnswer:
    id: str        # Example.id it answers
    expert: int    # expert index i (0 = the data set's gold solution, by convention)
    response: str  # A_j^(i): the expert's reference answer text
