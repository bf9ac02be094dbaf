"""Stage 1: which (question, expert, answer) triples MEF trains on, and teacher data generation."""
import pytest
import torch

from meml import synthetic_assets
from meml.data import Example, ExpertAnswer
from meml.errors import InputError
from meml.mef import generate_expert_data, mef_items, sft_loss, verified_answers
from meml.model import ModelConfig, Transformer
from meml.prompts import expert_prompt, response_ids
from meml.rewards import reward
from meml.tokenizer import Tokenizer

EXAMPLES = [Example("a", "Mia has 7 pens and gives away 3. How many now?", "4", "7-3=4\n#### 4"),
            Example("b", "Leo has 2 cards and finds 6. How many now?", "8", "2+6=8\n#### 8")]
PROMPTS = ["Step by step.", "One expression.", "Ledger."]


def tiny(tmp_path):
    folder = synthetic_assets.write_synthetic_assets(tmp_path / "assets")
    tok = Tokenizer.from_pretrained(folder)
    config = ModelConfig.from_json(folder / "config.json")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return model, tok


def test_only_verified_answers_train_and_experts_map_to_prompts(tmp_path):
    _, tok = tiny(tmp_path)
    answers = [ExpertAnswer("a", 0, "7-3=4\n#### 4"), ExpertAnswer("a", 1, "The answer is 5."),  # wrong
               ExpertAnswer("b", 1, "The answer is 8."), ExpertAnswer("b", 2, "\\boxed{8}")]
    kept, dropped = verified_answers(answers, EXAMPLES, "synthetic")
    assert dropped == {1: 1} and kept == [answers[0], answers[2], answers[3]]
    items = mef_items(tok, EXAMPLES, kept, PROMPTS, "synthetic", experts=[0, 1, 2])
    assert len(items) == 3
    assert items[1].prompt == expert_prompt(tok, PROMPTS[1], "synthetic", EXAMPLES[1])
    assert items[1].completion == response_ids(tok, "The answer is 8.")
    assert items[1].completion[-1] == tok.eot_id
    # ExpertX-SFT: only expert 2's answers, trained under the one prompt given (index 0).
    items = mef_items(tok, EXAMPLES, kept, ["Ledger."], "synthetic", experts=[2])
    assert [it.expert for it in items] == [0] and items[0].prompt == expert_prompt(tok, "Ledger.", "synthetic", EXAMPLES[1])


def test_an_answer_to_an_unknown_question_is_an_error_naming_its_source():
    with pytest.raises(InputError, match=r"expert1.jsonl: answer of expert 1 names question 'zz'"):
        verified_answers([ExpertAnswer("zz", 1, "#### 4")], EXAMPLES, "synthetic", source="expert1.jsonl")


def test_teacher_data_keeps_only_verified_answers(tmp_path):
    """A teacher that learned one answer by heart ("7-3=4 #### 4") says it to every question:
    right for question a, wrong for b, so only a's answer may be kept."""
    teacher, tok = tiny(tmp_path)
    item = mef_items(tok, EXAMPLES[:1], [ExpertAnswer("a", 1, "7-3=4\n#### 4")], [PROMPTS[1]], "synthetic", [1])
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    # Train until the answer is learned by heart, not for a fixed number of steps: the path of a
    # fixed-step run changes with last-bit differences between attention kernels.
    for _ in range(400):
        optimizer.zero_grad()
        loss, _ = sft_loss(teacher, tok, item * 4, micro_batch_size=4)
        optimizer.step()
        if loss < 0.01:
            break
    assert loss < 0.01
    kept = generate_expert_data(teacher, tok, EXAMPLES, PROMPTS[1], expert=1, dataset="synthetic",
                                samples_per_question=2, max_new_tokens=16, temperature=0.2,
                                generator=torch.Generator().manual_seed(0))
    assert [(a.id, a.expert) for a in kept] == [("a", 1)]
    assert reward("synthetic", kept[0].response, EXAMPLES[0]) == 1.0
    assert "#### 4" in kept[0].response
