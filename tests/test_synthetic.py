"""Tests for meml/synthetic.py: the built-in arithmetic world, its teachers and its checkpoint dir.

The oracles are independent of the generator's own arithmetic: a reader that recomputes the
answer from the *question text* alone, a tiny recursive-descent evaluator for the compact
expression, Python arithmetic on every "a op b = c" line the teachers write, jinja2 for the
chat template and transformers for loading the tokenizer and config.
"""
import re
from collections import Counter

import pytest

from meml.synthetic import (DIFFICULTIES, EXPERT_PROMPTS, MAX_VALUE, SPECIAL_TOKENS, TEACHERS,
                            build_tokenizer, compact_expression, difficulty_of, generate_problems,
                            load_synthetic, teacher_answers, world_text, write_synthetic_assets)

MARKERS = [re.compile(r"^#### (\d+)$"), re.compile(r"^The answer is (\d+)\.$"), re.compile(r"^\\boxed\{(\d+)\}$")]


@pytest.fixture(scope="module")
def problems():
    return generate_problems(600, "train", seed=0) + generate_problems(300, "eval", seed=0)


def read_question(text: str) -> tuple[list[tuple[str, int]], int]:
    """Recompute the answer from the words alone: [(op, operands...)], answer."""
    sentences = re.findall(r"[^.?]+[.?]", text)
    assert sentences[-1].strip() == "How many now?", text
    start = int(re.fullmatch(r"\w+ has (\d+) \w+\.", sentences[0].strip()).group(1))
    ops, x = [], start
    for sentence in sentences[1:-1]:
        s = sentence.strip()
        if m := re.fullmatch(r"(?:She|He) (?:finds (\d+)|gets (\d+) more)\.", s):
            ops.append(("+", int(m.group(1) or m.group(2))))
            x += ops[-1][1]
        elif m := re.fullmatch(r"(?:She|He) (?:loses (\d+)|gives away (\d+))\.", s):
            ops.append(("-", int(m.group(1) or m.group(2))))
            x -= ops[-1][1]
        elif m := re.fullmatch(r"(?:She|He) buys (\d+) bags of (\d+)\.", s):
            ops.append(("bags", int(m.group(1)), int(m.group(2))))
            x += ops[-1][1] * ops[-1][2]
        elif m := re.fullmatch(r"(?:Her|His) \w+ grow (\d+) times\.", s):
            ops.append(("*", int(m.group(1))))
            x *= ops[-1][1]
        else:
            raise AssertionError(f"unrecognised sentence {s!r} in {text!r}")
    return [("start", start)] + ops, x


def evaluate(expr: str) -> int:
    """Integer + - * and brackets, by recursive descent (never eval())."""
    tokens = re.findall(r"\d+|[-+*()]", expr)
    assert "".join(tokens) == expr.replace(" ", ""), expr
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            value = total()
            assert tokens[pos] == ")"
            pos += 1
            return value
        return int(tok)

    def product():
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            value *= atom()
        return value

    def total():
        nonlocal pos
        value = product()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            value = value + product() if op == "+" else value - product()
        return value

    value = total()
    assert pos == len(tokens), expr
    return value


def test_gold_answer_matches_the_question_text_and_the_compact_expression(problems):
    for p in problems:
        _, answer = read_question(p.question())
        assert p.to_example().answer == str(answer), p.question()
        assert evaluate(compact_expression(p)) == answer, compact_expression(p)


def test_every_teacher_ends_with_its_marker_and_the_gold_answer(problems):
    for p in problems:
        for i, teach in enumerate(TEACHERS):
            last = teach(p).splitlines()[-1]
            m = MARKERS[i].match(last)
            assert m and m.group(1) == p.to_example().answer, (i, teach(p))


def test_every_equation_a_teacher_writes_is_true(problems):
    for p in problems:
        for teach in TEACHERS:
            for line in teach(p).splitlines()[:-1]:
                lhs, rhs = re.sub(r"^(gains|losses) ", "", line).split("=")
                assert evaluate(lhs) == int(rhs), line


def test_teachers_use_different_formats(problems):
    multi = [p for p in problems if len(p.steps) >= 3]
    for p in multi:
        steps, compact, ledger = (t(p).splitlines() for t in TEACHERS)
        assert len(compact) == 2                           # one expression, one answer line
        assert len(steps) == len(p.steps) + sum(s.kind == "groups" for s in p.steps) + 1
    # the ledger decomposes differently from the step list on most multi-step problems
    differ = sum(TEACHERS[0](p).splitlines()[:-1] != TEACHERS[2](p).splitlines()[:-1] for p in multi)
    assert differ / len(multi) > 0.5
    assert any("gains " in TEACHERS[2](p) for p in multi) and any("losses " in TEACHERS[2](p) for p in multi)
    assert len(set(EXPERT_PROMPTS)) == 3


def test_difficulty_sets_steps_operand_sizes_and_kinds(problems):
    seen = Counter()
    for p in problems:
        d = DIFFICULTIES[p.difficulty]
        assert difficulty_of(p.id) == p.difficulty
        ops, _ = read_question(p.question())
        assert len(ops) - 1 == len(p.steps) == d.steps
        assert all(s.kind in d.kinds for s in p.steps)
        assert p.start <= d.max_operand
        assert all(s.a <= d.max_operand for s in p.steps if s.kind in ("add", "sub"))
        assert all(0 <= v <= MAX_VALUE for v in p.values())
        seen[p.difficulty] += 1
    assert seen[1] == seen[2] == seen[3] == 300        # equal mix by default, exact counts


def test_mix_gives_exact_proportions():
    ps = generate_problems(10, "train", seed=1, mix={1: 1, 3: 4})
    assert Counter(p.difficulty for p in ps) == {1: 2, 3: 8}
    with pytest.raises(ValueError, match="unknown difficulty"):
        generate_problems(3, "train", mix={7: 1.0})


def test_same_seed_same_data_and_splits_are_disjoint():
    assert generate_problems(50, "train", seed=3) == generate_problems(50, "train", seed=3)
    assert generate_problems(50, "train", seed=3) != generate_problems(50, "train", seed=4)
    # a split does not depend on the other split's size
    assert generate_problems(40, "eval", seed=3) == generate_problems(40, "eval", seed=3)
    train = {p.question() for p in generate_problems(3000, "train", seed=3)}
    evals = {p.question() for p in generate_problems(600, "eval", seed=3)}
    assert not train & evals                            # no question in both splits


def test_load_synthetic_gives_three_answers_per_train_example_gold_first():
    train, evals, answers = load_synthetic(n_train=30, n_eval=9, seed=0)
    assert len(train) == 30 and len(evals) == 9 and len(answers) == 90
    assert len({e.id for e in train + evals}) == 39
    by_id = {e.id: e for e in train}
    for a in answers:
        if a.expert == 0:
            assert a.response == by_id[a.id].solution
    assert Counter(a.expert for a in answers) == {0: 30, 1: 30, 2: 30}
    assert teacher_answers([]) == []


def test_tokenizer_round_trips_world_text_and_keeps_specials_whole():
    tok = build_tokenizer()
    texts = world_text(seed=5, n=200) + ["Ünïcode ✓ and tabs\t and  double  spaces\n\n"]
    for text in texts:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    chat = "<|im_start|>system\nSolve.<|im_end|>\n<|im_start|>user\nMia has 12 pens.<|im_end|>\n"
    ids = tok.encode(chat).ids
    assert tok.decode(ids, skip_special_tokens=False) == chat
    vocab = tok.get_vocab_size()
    for k, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special).ids == [tok.token_to_id(special)] == [vocab - len(SPECIAL_TOKENS) + k]
    assert ids.count(tok.token_to_id("<|im_start|>")) == 2 and ids.count(tok.token_to_id("<|im_end|>")) == 2
    # digits one per token: "12345" is five tokens
    assert [t.strip() for t in tok.encode("x=12345").tokens if t.strip("Ġ").isdigit()] == list("12345")


def test_assets_load_in_transformers_with_a_plain_chatml_template(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    transformers = pytest.importorskip("transformers")
    import json
    out = write_synthetic_assets(tmp_path / "syn")
    tc = json.loads((out / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    rendered = jinja2.Template(tc["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    # no default system prompt: without a system message none appears
    no_system = jinja2.Template(tc["chat_template"]).render(messages=messages[1:], add_generation_prompt=False)
    assert no_system == "<|im_start|>user\nQ<|im_end|>\n"
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.decode(hf.encode(rendered, add_special_tokens=False)) == rendered

    config = json.loads((out / "config.json").read_text())
    needed = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
              "attention_bias", "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id"]
    assert not [k for k in needed if k not in config]
    assert config["model_type"] == "qwen2" and config["attention_bias"] is True
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert config["vocab_size"] >= len(hf) and config["vocab_size"] % 64 == 0
    assert config["eos_token_id"] == hf.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] in gen["eos_token_id"]
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_pretrained(out))
    assert model.lm_head.weight.shape == (config["vocab_size"], config["hidden_size"])
