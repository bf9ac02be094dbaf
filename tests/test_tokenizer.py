"""meml/tokenizer.py against the checkpoints' own chat templates.

The oracle renders each checkpoint's Jinja chat_template with jinja2 the way transformers does
(sandboxed, trim_blocks + lstrip_blocks, raise_exception, tojson, strftime_now at a fixed date) and
tokenizes the text without adding special tokens; our hand-written formats must give the same text
and the same ids. A second oracle is transformers' own apply_chat_template.
"""
import json
from datetime import datetime

import jinja2
import jinja2.ext
import pytest
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conftest import require_shared
from meml.tokenizer import (LLAMA3_DEFAULT_DATE, PLAIN_CHATML_TEMPLATE, ChatFormat, Tokenizer,
                            detect_chat_format)

FIXED_DAY = datetime(2025, 3, 9)  # the oracle's "today"
FIXED_DATE_STRING = "09 Mar 2025"  # the same day as the Llama template writes it ("%d %b %Y")

LONG_SYSTEM = " ".join(["You are expert 2 of 3: solve the problem by first writing one compact "
                        "arithmetic expression, then evaluating it step by step."] * 12)

# Conversation shapes: each is rendered with and without the generation prompt.
CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is 12 * 7?"}],
    "system + user": [{"role": "system", "content": "You are a careful math tutor."},
                      {"role": "user", "content": "What is 12 * 7?"}],
    "multi-turn, no system": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "Add 2 and 3."}],
    "multi-turn with system": [{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"},
                               {"role": "user", "content": "And 3+3?"},
                               {"role": "assistant", "content": "6"},
                               {"role": "user", "content": "Thanks."}],
    "assistant last": [{"role": "system", "content": "Be exact."},
                       {"role": "user", "content": "9-4?"},
                       {"role": "assistant", "content": "The answer is 5.\n#### 5"}],
    "empty user content": [{"role": "user", "content": ""}],
    "empty system content": [{"role": "system", "content": ""},
                             {"role": "user", "content": "Hello"}],
    "empty assistant content": [{"role": "user", "content": "Say nothing."},
                                {"role": "assistant", "content": ""}],
    "unicode": [{"role": "system", "content": "Réponds en français. 用中文回答。"},
                {"role": "user", "content": "Ünïcödé ✓ 🚀 → ∑ x² مرحبا こんにちは"}],
    "newlines and surrounding spaces": [
        {"role": "system", "content": "\n  Line one.\n\nLine two.  \n"},
        {"role": "user", "content": "  a\n\n\nb\r\n\tc  "},
        {"role": "assistant", "content": "\nStep 1: x = 1\nStep 2: y = 2\n\n"}],
    "whitespace-only content": [{"role": "user", "content": " \n\t "}],
    "long system prompt": [{"role": "system", "content": LONG_SYSTEM},
                           {"role": "user", "content": "Natalia sold 48 clips in April..."}],
    "second system message mid-conversation": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "From now on, answer in one word."},
        {"role": "user", "content": "Colour of the sky?"}],
    "system only": [{"role": "system", "content": "You are expert 1."}],
    "tag-like text and code": [{"role": "user", "content": "<b>bold</b> <think>x</think> "
                                "{\"a\": [1, 2]} ```py\nprint('<|')\n```"}],
}
SHAPES = [(name, gen) for name in CONVERSATIONS for gen in (True, False)]
SHAPE_IDS = [f"{name}|{'gen' if gen else 'nogen'}" for name, gen in SHAPES]


def jinja_render(template: str, messages, add_generation_prompt: bool, special_tokens: dict,
                 today: datetime | None = FIXED_DAY) -> str:
    """Render a chat template as transformers' apply_chat_template does (the oracle)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    if today is not None:  # today=None: the template falls back to its own default date
        env.globals["strftime_now"] = lambda fmt: today.strftime(fmt)
    return env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


def special_tokens_of(config: dict) -> dict:
    fields = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {f: config[f] for f in fields if config.get(f) is not None}


@pytest.fixture(scope="module", params=["qwen2.5", "llama3"])
def real(request):
    """(our Tokenizer, its folder, its tokenizer_config.json) for a real checkpoint's tokenizer."""
    folder = require_shared("tokenizers", request.param)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return Tokenizer.from_pretrained(folder), folder, config


@pytest.mark.parametrize("name,add_generation_prompt", SHAPES, ids=SHAPE_IDS)
def test_chat_template_parity_with_jinja(real, name, add_generation_prompt):
    tok, folder, config = real
    messages = CONVERSATIONS[name]
    expected_text = jinja_render(config["chat_template"], messages, add_generation_prompt,
                                 special_tokens_of(config))
    ours = tok.render_chat(messages, add_generation_prompt, date_string=FIXED_DATE_STRING)
    assert ours == expected_text
    expected_ids = tok.tokenizer.encode(expected_text, add_special_tokens=False).ids
    assert tok.apply_chat_template(messages, add_generation_prompt,
                                   date_string=FIXED_DATE_STRING) == expected_ids


def test_chat_template_parity_with_transformers(real):
    transformers = pytest.importorskip("transformers")
    tok, folder, _ = real
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for name, add_generation_prompt in SHAPES:
        messages = CONVERSATIONS[name]
        expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=add_generation_prompt,
                                                 date_string=FIXED_DATE_STRING)["input_ids"]
        assert tok.apply_chat_template(messages, add_generation_prompt,
                                       date_string=FIXED_DATE_STRING) == expected, name


def test_llama3_default_date_is_the_templates_own_fallback():
    folder = require_shared("tokenizers", "llama3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    messages = CONVERSATIONS["system + user"]
    expected = jinja_render(config["chat_template"], messages, True, special_tokens_of(config),
                            today=None)
    assert f"Today Date: {LLAMA3_DEFAULT_DATE}\n" in expected
    assert Tokenizer.from_pretrained(folder).render_chat(messages) == expected


def test_exactly_one_bos(real):
    tok, _, _ = real
    ids = tok.apply_chat_template(CONVERSATIONS["system + user"])
    if tok.bos_token is None:  # Qwen2.5 has no BOS; its prompts open with <|im_start|>
        assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>")
        return
    bos_id = tok.tokenizer.token_to_id(tok.bos_token)
    assert ids[0] == bos_id and ids.count(bos_id) == 1
    # The trap encode() avoids: Llama's post-processor would prepend a second BOS.
    text = tok.render_chat(CONVERSATIONS["system + user"])
    assert tok.tokenizer.encode(text, add_special_tokens=True).ids[:2] == [bos_id, bos_id]


def test_encode_adds_nothing_and_decode_round_trips(real):
    tok, _, _ = real
    text = " Natalia sold 48/2 = 24 clips in May.\n#### 72 — ✓ 用中文"
    ids = tok.encode(text)
    assert ids == tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.eot_id] + ids, skip_special_tokens=True) == text



def test_prompt_plus_response_plus_eot_is_the_rendered_conversation(real):
    """What MEF trains on (prompt ids + encode(response) + [eot_id]) is the template's own
    tokenization of the finished conversation, for responses without surrounding whitespace
    (Llama's template strips it; a leading newline would merge with ChatML's)."""
    tok, _, _ = real
    prompt = CONVERSATIONS["system + user"]
    for response in ["12 * 7 = 84.\n#### 84", "Step 1: 10*7 = 70.\n\nStep 2: 2*7 = 14.\n#### 84"]:
        ours = tok.apply_chat_template(prompt) + tok.encode(response) + [tok.eot_id]
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                       add_generation_prompt=False)
        assert full[:len(ours)] == ours  # ChatML's full text ends with one more "\n"

@pytest.mark.parametrize("name,eot,eos,pad,model_config,model_vocab", [
    ("qwen2.5", "<|im_end|>", "<|im_end|>", "<|endoftext|>", "Qwen2.5-0.5B-Instruct", 151936),
    ("llama3", "<|eot_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "Llama-3.2-1B-Instruct",
     128256),
])
def test_special_ids_and_vocab_bound(name, eot, eos, pad, model_config, model_vocab):
    folder = require_shared("tokenizers", name)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.eot_id == tok.tokenizer.token_to_id(eot)
    assert tok.stop_ids == sorted({tok.eot_id, tok.tokenizer.token_to_id(eos)})
    assert tok.pad_id == tok.tokenizer.token_to_id(pad)
    # Every id below vocab_size is a token, none at or above it.
    assert tok.tokenizer.id_to_token(tok.vocab_size - 1) is not None
    assert tok.tokenizer.id_to_token(tok.vocab_size) is None
    config = json.loads(require_shared("configs", model_config, "config.json").read_text())
    assert config["vocab_size"] == model_vocab
    if name == "qwen2.5":  # the model pads its vocab: ids 151665..151935 are not tokens
        assert tok.vocab_size == 151665 < model_vocab
    else:  # this is the Vision tokenizer: one more token (<|image|>, id 128256) than the text model
        assert tok.vocab_size == 128257 == model_vocab + 1
        assert tok.tokenizer.id_to_token(128256) == "<|image|>"


@pytest.mark.parametrize("name,generation_eos,expected", [
    ("qwen2.5", [151645, 151643], [151643, 151645]),        # Qwen2.5-Instruct's generation config
    ("llama3", [128001, 128008, 128009], [128001, 128008, 128009]),  # Llama 3.2 Instruct's
    ("llama3", 128001, [128001, 128009]),                    # a single id, not a list
])
def test_stop_ids_are_the_union_with_generation_config(tmp_path, name, generation_eos, expected):
    folder = require_shared("tokenizers", name)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).symlink_to(folder / file)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    assert Tokenizer.from_pretrained(tmp_path).stop_ids == expected


# --- our own tokenizers: plain ChatML, built here with the `tokenizers` library -------------------

def write_small_tokenizer(folder, chat_template, **config) -> None:
    """A byte-level tokenizer (256 byte tokens, no merges) with the three ChatML special tokens."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))},
                                                     merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", **config}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


# Qwen2-Instruct's template: ChatML whose default system prompt is "You are a helpful assistant."
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template,default_system", [(PLAIN_CHATML_TEMPLATE, None),
                                                     (QWEN2_TEMPLATE, "You are a helpful assistant.")])
def test_small_chatml_tokenizer_parity(tmp_path, template, default_system):
    write_small_tokenizer(tmp_path, template)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_format == ChatFormat("chatml", default_system)
    for name, add_generation_prompt in SHAPES:
        messages = CONVERSATIONS[name]
        expected = jinja_render(template, messages, add_generation_prompt, {})
        assert tok.render_chat(messages, add_generation_prompt) == expected, name
        assert tok.apply_chat_template(messages, add_generation_prompt) == tok.encode(expected)
    # The system role is exactly what the caller gave (an expert's prompt), nothing added.
    ids = tok.apply_chat_template([{"role": "system", "content": "Expert 3."},
                                   {"role": "user", "content": "1+1?"}])
    assert tok.decode(ids) == ("<|im_start|>system\nExpert 3.<|im_end|>\n<|im_start|>user\n1+1?"
                               "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.vocab_size == 259 and tok.pad_id == 256
    assert tok.eot_id == 258 and tok.stop_ids == [256, 258]  # <|endoftext|> and <|im_end|>


# --- errors a user can cause --------------------------------------------------------------------

def test_missing_folder_or_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere[/\\]tokenizer\.json not found"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    write_small_tokenizer(tmp_path, PLAIN_CHATML_TEMPLATE)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json not found"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_json_names_file_and_line(tmp_path):
    write_small_tokenizer(tmp_path, PLAIN_CHATML_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text('{\n  "eos_token": "<|im_end|>",\n}\n')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON \(line 3"):
        Tokenizer.from_pretrained(tmp_path)
    write_small_tokenizer(tmp_path, PLAIN_CHATML_TEMPLATE)
    (tmp_path / "generation_config.json").write_text("{eos_token_id: 1}")
    with pytest.raises(ValueError, match=r"generation_config\.json: not valid JSON \(line 1"):
        Tokenizer.from_pretrained(tmp_path)


def test_unusable_config_is_named(tmp_path):
    write_small_tokenizer(tmp_path, None)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: no chat_template"):
        Tokenizer.from_pretrained(tmp_path)
    write_small_tokenizer(tmp_path, "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json \(field chat_template\): unrecognised"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("<|im_start|>{{ m }}<think></think>")  # Qwen3-like
    with pytest.raises(ValueError, match=r"chat_template\.jinja: unrecognised"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    write_small_tokenizer(tmp_path, PLAIN_CHATML_TEMPLATE, eos_token="</s>")
    with pytest.raises(ValueError, match=r"eos_token '</s>' is not a token of .*tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_default_system_prompt_we_cannot_read_is_an_error():
    template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + default "
                "+ '<|im_end|>\\n' }}{% endif %}")
    with pytest.raises(ValueError, match="my_template: ChatML chat_template with a default system"):
        detect_chat_format(template, "my_template")


@pytest.mark.parametrize("messages,match", [
    ([], "at least one message"),
    ([{"role": "tool", "content": "42"}], "message 0 must be"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 1 must be"),
    ([{"role": "user", "content": None}], "message 0 must be"),
])
def test_bad_messages_are_named(tmp_path, messages, match):
    write_small_tokenizer(tmp_path, PLAIN_CHATML_TEMPLATE)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(messages)


def test_fit_to_model_drops_ids_past_the_models_vocabulary_and_refuses_a_mismatch():
    # The shared Llama tokenizer is the Vision one: <|image|> = 128256, one past the text model.
    tok = Tokenizer.from_pretrained(require_shared("tokenizers", "llama3"))
    assert tok.vocab_size == 128257
    tok.fit_to_model(128256, source="Llama-3.2-1B-Instruct")
    assert tok.vocab_size == 128256
    tok.fit_to_model(200000, source="bigger model")  # never grows
    assert tok.vocab_size == 128256
    with pytest.raises(ValueError, match=r"eot_id = 128009 is outside the model's vocabulary of 32000 \(tiny\)"):
        tok.fit_to_model(32000, source="tiny")
