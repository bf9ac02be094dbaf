"""E8 metrics on tables small enough to count by hand."""
from math import comb

import pytest

from meml.evaluation import accuracy, error_overlap, majority_vote, oracle_accuracy, pass_at_k

# 4 questions x 3 experts: True = right.
CORRECT = [
    [True, False, False],   # only expert 0 right
    [False, False, False],  # all wrong
    [True, True, True],     # all right
    [False, True, False],   # only expert 1 right
]


def test_oracle_counts_questions_any_expert_gets_right():
    assert oracle_accuracy(CORRECT) == 3 / 4
    assert accuracy([row[0] for row in CORRECT]) == 2 / 4


def test_majority_vote_ties_go_to_the_lowest_index_expert():
    assert majority_vote(["3", "5", "5"]) == "5"
    assert majority_vote(["3", "5", "7"]) == "3"      # three-way tie: expert 0's answer
    assert majority_vote([None, "5", "7"]) == "5"     # no answer casts no vote
    assert majority_vote([None, None, None]) is None


def test_error_overlap_by_hand():
    rows = {tuple(r["experts"]): r for r in error_overlap(CORRECT)}
    # Wrong sets per question: {1,2}, {0,1,2}, {}, {0,2}.
    assert rows[(0,)]["all_wrong"] == 2 and rows[(0,)]["exactly_wrong"] == 0
    assert rows[(2,)]["all_wrong"] == 3
    assert rows[(1, 2)]["all_wrong"] == 2 and rows[(1, 2)]["exactly_wrong"] == 1
    assert rows[(0, 2)]["exactly_wrong"] == 1
    assert rows[(0, 1, 2)]["all_wrong"] == 1 and rows[(0, 1, 2)]["exactly_wrong"] == 1
    assert len(rows) == 7  # 2^3 - 1 non-empty subsets


def test_pass_at_k_matches_its_definition():
    # n=4 samples, c=1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2.
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than k wrong samples: some draw of k has a right one
    # pass@k is the probability that a random k-subset contains a correct sample: enumerate it.
    from itertools import combinations
    samples = [1, 0, 1, 0, 0, 0]
    hits = [any(samples[i] for i in s) for s in combinations(range(6), 3)]
    assert pass_at_k(6, 2, 3) == pytest.approx(sum(hits) / comb(6, 3))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)


def test_majority_vote_reads_mathqa_answers_as_the_reward_does():
    """Option c is 12. "The answer is 12" earns reward 1, so it must vote for c: with votes
    12 (= c), b, c the vote is c and right. Read without the options, "12" would cast no vote,
    b and c would tie and the tie would go to b, the lower-index expert's answer."""
    from meml.data import Example
    from meml.evaluation import judge
    ex = Example("m", "q", "c", "s", {"a": "4", "b": "14", "c": "12", "d": "2", "e": "16"})
    correct, vote_right = judge("mathqa", ["The answer is 12", "The answer is c", "The answer is b"], ex)
    assert correct == [True, True, False] and vote_right
    correct, vote_right = judge("mathqa", ["The answer is 12", "The answer is b", "The answer is c"], ex)
    assert correct == [True, False, True] and vote_right  # c (value + letter) beats b
    correct, vote_right = judge("mathqa", ["The answer is 12", "The answer is b", "The answer is (b)"], ex)
    assert correct == [True, False, False] and not vote_right
    correct, vote_right = judge("mathqa", ["The answer is 12", "The answer is 12.", "#### b"], ex)
    assert correct == [True, True, False] and vote_right
