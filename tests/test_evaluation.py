"""E8 metrics on tables small enough to count by hand."""
from math import comb

import pytest

from meml.rewards import Verifier
from meml.evaluation import (accuracy, best_expert, confidence_choice, error_overlap, majority_vote, oracle_accuracy,
                             pass_at_k)

# 4 questions x 3 experts: True = right.
CORRECT = [
    [True, False, False],   # only expert 0 right
    [False, False, False],  # all wrong
    [True, True, True],     # all right
    [False, True, False],   # only expert 1 right
]

MATHQA = Verifier("mathqa", builtin="mathqa")


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
    correct, vote_right = judge(MATHQA, ["The answer is 12", "The answer is c", "The answer is b"], ex)
    assert correct == [True, True, False] and vote_right
    correct, vote_right = judge(MATHQA, ["The answer is 12", "The answer is b", "The answer is c"], ex)
    assert correct == [True, False, True] and vote_right  # c (value + letter) beats b
    correct, vote_right = judge(MATHQA, ["The answer is 12", "The answer is b", "The answer is (b)"], ex)
    assert correct == [True, False, False] and not vote_right
    correct, vote_right = judge(MATHQA, ["The answer is 12", "The answer is 12.", "#### b"], ex)
    assert correct == [True, True, False] and vote_right


def test_confidence_choice_takes_each_questions_most_confident_expert_by_hand():
    correct = [[True, False, False], [False, True, False], [False, False, True], [True, True, False]]
    confidence = [[-0.1, -0.5, -0.9],   # expert 0 chosen: right
                  [-0.2, -0.3, -0.1],   # expert 2 chosen: wrong
                  [-0.4, -0.4, -0.4],   # a tie: expert 0 chosen: wrong
                  [-1.0, -0.2, -0.3]]   # expert 1 chosen: right
    assert confidence_choice(correct, confidence) == 0.5


def test_best_expert_ties_go_to_the_lowest_index():
    assert best_expert([0.3, 0.5, 0.5]) == 1 and best_expert([0.2, 0.1]) == 0


def test_per_question_results_hold_the_whole_table(tmp_path):
    """evaluate_experts on a random tiny model: the per-question records recompute every
    figure, the per-level tables are those of the level's questions, and each confidence is the
    mean log-prob of the greedy answer as a full forward pass scores it."""
    import torch

    from meml import synthetic, synthetic_assets
    from meml.evaluation import evaluate_experts
    from meml.model import ModelConfig, Transformer
    from meml.prompts import expert_prompt
    from meml.tokenizer import Tokenizer

    folder = synthetic_assets.write_synthetic_assets(tmp_path / "assets")
    tok = Tokenizer.from_pretrained(folder)
    config = ModelConfig.from_json(folder / "config.json")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.3)
    tok.fit_to_model(config.vocab_size, source=str(folder))
    examples = [p.to_example() for p in synthetic.generate_problems(9, "eval", seed=0)]
    prompts = list(synthetic.EXPERT_PROMPTS)
    out = evaluate_experts(model, tok, examples, prompts, "synthetic", max_new_tokens=6,
                           family=synthetic.family_of)
    rows = out["per_question"]
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    for i in range(3):
        assert out["accuracy"][i] == sum(r["correct"][i] for r in rows) / 9
    assert out["majority_vote"] == sum(r["vote"] for r in rows) / 9
    assert set(out["by_family"]) == {synthetic.family_of(ex.id) for ex in examples}
    for family, table in out["by_family"].items():
        mine = [r for r in rows if synthetic.family_of(r["id"]) == family]
        assert table["num_questions"] == len(mine) > 0
        assert table["oracle"] == sum(any(r["correct"]) for r in mine) / 3
    # confidence: the greedy completion's mean log-prob, recomputed from full logits
    ex, i = examples[4], 2
    prompt = expert_prompt(tok, prompts[i], "synthetic", ex)
    ids, completion = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(6):
            logp = torch.log_softmax(model(ids)[0, -1, :tok.vocab_size].float(), -1)
            completion.append(logp.max().item())
            token = int(logp.argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token in tok.stop_ids:
                break
    assert rows[4]["confidence"][i] == pytest.approx(sum(completion) / len(completion), abs=1e-4)
