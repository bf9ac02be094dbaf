"""Text <-> token ids, and conversations -> prompt ids, for Qwen2.5, Llama 3.x and our own tokenizers.

Why this exists: in MEML-GRPO an expert *is* a system prompt, so the prompt a model sees must be
byte-for-byte the one its chat template produces, or the "experts" are not the ones it was trained
with. Checkpoints ship their chat template as Jinja; we do not run Jinja here. Instead the two
formats in use are written out by hand below (`render_chatml`, `render_llama3`), and
tests/test_tokenizer.py checks them against the checkpoints' own templates rendered with jinja2.

Departures from `transformers` worth knowing:
- The format is recognised once, from the chat_template text (`detect_chat_format`); a template we
  do not recognise is an error naming the file, never a silent guess. Tool calls are not supported.
- Llama 3.x puts "Today Date: <date>" in every prompt; transformers uses today's date, which makes
  prompts change from day to day. We use a fixed date, `LLAMA3_DEFAULT_DATE` (the template's own
  fallback), which the caller may override with `date_string=`.
- `encode` never adds special tokens. Llama's tokenizer.json post-processor prepends
  <|begin_of_text|>, and the chat template writes it too: encoding a rendered chat with special
  tokens added would give a double BOS.
- `decode` does no "clean-up of tokenization spaces", so decode(encode(text)) == text.
- `stop_ids` also holds the end-of-turn id (`eot_id`), so a chat model stops at the end of its turn
  even when the config names another EOS (see `from_pretrained`).
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from meml.errors import InputError

# The Llama 3.x template's own date when `strftime_now` is not available (see its chat_template).
LLAMA3_DEFAULT_DATE = "26 Jul 2024"

# ChatML with no default system prompt: the chat_template our own tokenizers (the synthetic world)
# write into tokenizer_config.json. `detect_chat_format` recognises it.
PLAIN_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    name: str                          # "chatml" or "llama3"
    default_system: str | None = None  # chatml: system prompt used when a conversation has none


def detect_chat_format(template: str, source: str) -> ChatFormat:
    """Which hand-written format reproduces this Jinja chat template; `source` names its file."""
    if "<|start_header_id|>" in template and "Cutting Knowledge Date" in template:
        return ChatFormat("llama3")  # Llama 3.1 / 3.2 / 3.3 (3.0 has no date header: not this)
    if "<|im_start|>" in template and "<think>" not in template:  # ChatML, but not Qwen3's
        default_system = _chatml_default_system(template)
        if default_system is None and "messages[0]" in template:
            # It looks for a leading system message but we cannot find what it does without one.
            raise InputError(f"{source}: ChatML chat_template with a default system prompt we cannot "
                             "read; only Qwen2/Qwen2.5-style templates are supported")
        return ChatFormat("chatml", default_system)
    raise InputError(f"{source}: unrecognised chat_template; supported are ChatML (Qwen2.5, or "
                     "meml.tokenizer.PLAIN_CHATML_TEMPLATE) and Llama 3.1-3.3")


def _chatml_default_system(template: str) -> str | None:
    """The text of a Jinja string literal '<|im_start|>system\\n...<|im_end|>' in the template."""
    for quote in ("'", '"'):
        # one string literal: the quote, then characters other than that quote (or escapes)
        literal = quote + r"<\|im_start\|>system\\n((?:[^" + quote + r"\\]|\\.)*?)<\|im_end\|>"
        match = re.search(literal, template)
        if match:  # undo Jinja's string escapes ("\\n", "\\'") as Jinja's own lexer does
            return match.group(1).encode("ascii", "backslashreplace").decode("unicode-escape")
    return None


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise InputError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise InputError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, "
                             f"got {message!r}")


def render_chatml(messages: list[dict], add_generation_prompt: bool,
                  default_system: str | None) -> str:
    """<|im_start|>role\\ncontent<|im_end|>\\n per message; Qwen2.5 adds its default system turn."""
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}] + messages
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def render_llama3(messages: list[dict], add_generation_prompt: bool, bos_token: str,
                  date_string: str) -> str:
    """Llama 3.x: a system turn with two date lines always comes first; contents are .strip()-ed."""
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    text = (f"{bos_token}<|start_header_id|>system<|end_header_id|>\n\n"
            f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n"
            f"{system}<|eot_id|>")
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    if add_generation_prompt:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as "text" or as {"content": "text", ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a chat model needs: its chat format and its special ids."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_format: ChatFormat,
                 bos_token: str | None, stop_ids: list[int], pad_id: int, eot_id: int):
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.bos_token = bos_token
        self.stop_ids = stop_ids  # generation ends at any of these (sorted, no repeats)
        self.pad_id = pad_id
        self.eot_id = eot_id      # ends an assistant turn: <|im_end|> or <|eot_id|>
        # Ids 0 .. vocab_size-1 are the ones the tokenizer knows. A model's embedding may have more
        # rows (Qwen2.5: 151665 here, 151936 in the model); the sampler must mask those.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        """Read tokenizer.json, tokenizer_config.json and, when present, generation_config.json.

        The chat template is chat_template.jinja when that file exists (as recent transformers
        saves it), else tokenizer_config.json's "chat_template".
        """
        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        config_file = directory / "tokenizer_config.json"
        for path in (tokenizer_file, config_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: pass the folder of a Hugging Face "
                                        "checkpoint (it holds tokenizer.json and tokenizer_config.json)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the library raises a bare Exception for a file it cannot parse
            raise InputError(f"{tokenizer_file}: not a readable tokenizer file ({str(err)[:160]})") from None
        config = _read_json(config_file)

        def token_id(field: str, text: str) -> int:
            id_ = tokenizer.token_to_id(text)
            if id_ is None:
                raise InputError(f"{config_file}: {field} {text!r} is not a token of {tokenizer_file}")
            return id_

        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            template, source = template_file.read_text(encoding="utf-8"), str(template_file)
        else:
            template, source = config.get("chat_template"), f"{config_file} (field chat_template)"
            if isinstance(template, list):  # older multi-template form: [{"name", "template"}, ...]
                template = {t["name"]: t["template"] for t in template}.get("default")
        if not isinstance(template, str):
            raise InputError(f"{config_file}: no chat_template (and no {template_file}); meml needs a "
                             "chat model's tokenizer, because experts are system prompts")
        chat_format = detect_chat_format(template, source)
        eot_id = token_id("end of turn", "<|im_end|>" if chat_format.name == "chatml" else "<|eot_id|>")

        bos_token = _token_text(config.get("bos_token"))
        if chat_format.name == "llama3" and bos_token is None:
            raise InputError(f"{config_file}: bos_token missing; the Llama 3 chat format starts with it")
        eos_token = _token_text(config.get("eos_token"))
        stop_ids = {eot_id} | ({token_id("eos_token", eos_token)} if eos_token else set())
        generation_file = directory / "generation_config.json"
        if generation_file.is_file():
            eos = _read_json(generation_file).get("eos_token_id")
            stop_ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad_token = _token_text(config.get("pad_token"))
        pad_id = token_id("pad_token", pad_token) if pad_token else eot_id  # pads are masked anyway
        return cls(tokenizer, chat_format, bos_token, sorted(stop_ids), pad_id, eot_id)

    def fit_to_model(self, model_vocab_size: int, source: str) -> None:
        """Sample and score only ids the model has too: vocab_size = min(ours, the model's).

        The Llama 3.2 *Vision* tokenizer knows one id (<|image|>, 128256) past the text models'
        128256 rows; harmless as long as no id a chat needs lies beyond the model. Anything the
        chat format emits (stop, pad, end-of-turn) must fit, or the pair is a mismatch.
        """
        needed = {"eot_id": self.eot_id, "pad_id": self.pad_id, **{f"stop id {i}": i for i in self.stop_ids}}
        for name, i in needed.items():
            if i >= model_vocab_size:
                raise InputError(f"tokenizer's {name} = {i} is outside the model's vocabulary of "
                                 f"{model_vocab_size} ({source}): tokenizer and checkpoint do not match")
        # Any text can encode to any of the tokenizer's ordinary (non-added) tokens.
        ordinary = max(self.tokenizer.get_vocab(with_added_tokens=False).values()) + 1
        if ordinary > model_vocab_size:
            raise InputError(f"the tokenizer's ordinary tokens reach id {ordinary - 1}, past the model's vocabulary "
                             f"of {model_vocab_size} ({source}): text would encode to ids the model has no "
                             "embedding for; tokenizer and checkpoint do not match")
        self.vocab_size = min(self.vocab_size, model_vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (special-token text in it still maps to its id)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    date_string: str = LLAMA3_DEFAULT_DATE) -> str:
        """The chat template's text for `messages` ([{"role", "content"}]); date_string: Llama only,
        "%d %b %Y" as the template writes it."""
        _check_messages(messages)
        if self.chat_format.name == "llama3":
            return render_llama3(messages, add_generation_prompt, self.bos_token, date_string)
        return render_chatml(messages, add_generation_prompt, self.chat_format.default_system)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            date_string: str = LLAMA3_DEFAULT_DATE) -> list[int]:
        """Prompt ids for `messages`, the same as the checkpoint's own chat template gives."""
        return self.encode(self.render_chat(messages, add_generation_prompt, date_string))
