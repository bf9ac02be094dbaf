"""The synthetic world's checkpoint folder (no weights): tokenizer, chat template, tiny config.

`python train.py` with no arguments trains a model from scratch on meml/synthetic.py's world, and
loads it exactly as it would a real checkpoint, so this module writes what a Hugging Face
checkpoint folder holds besides the weights:
- tokenizer.json: a byte-level BPE trained on the world's own text (digits one per token, as in
  Qwen2.5), with ChatML special tokens appended after it;
- tokenizer_config.json: a plain ChatML template with a real system role and NO default system
  prompt (experts are system prompts, so the template must not add one of its own);
- generation_config.json and config.json: a tiny Qwen2 (MODEL_SIZES).
"""
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from meml.hf_checkpoint import atomic_write, write_json
from meml.synthetic import EXPERT_FORMATS, EXPERT_PROMPTS, FORMATS, generate_problems, teacher, write

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad / turn start / eos
# Plain ChatML with a real system role and no default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5's pre-tokenizer split (words, digits ONE PER TOKEN, punctuation, spaces), except that a
# space before a number stays with its first digit (" 12" -> " 1", "2"): shorter sequences on CPU.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Decoder sizes (0.38M parameters), picked so the default run (MEF + RIEL + evaluation) fits a
# 2-core CPU; measurements in reference_runs/LOG.md (2026-11-22, synthetic world feasibility).
MODEL_SIZES = dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2)


def world_text(seed: int = 0, n: int = 600) -> list[str]:
    """Text the tokenizer is trained on: prompts, questions, every format's solutions (with and
    without the blind spots), roles."""
    problems = generate_problems(n, "train", seed)
    texts = list(EXPERT_PROMPTS) + ["system\n", "user\n", "assistant\n"]
    for p in problems:
        texts.append(p.question())
        texts.extend(write(p, fmt) for fmt in FORMATS)
        texts.extend(teacher(i, p) for i in range(len(EXPERT_FORMATS)))
    return texts


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> Tokenizer:
    """A byte-level BPE trained on the world's text, ChatML special tokens appended after it.

    Byte-level, so any text round-trips exactly; the special tokens get the last ids, as in
    Qwen2.5, and are never split or merged.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(world_text(seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def model_config(tokenizer_vocab: int, special_ids: dict[str, int], **sizes) -> dict:
    """A Hugging Face Qwen2 config.json for the tiny decoder (embedding rows padded to 64,
    so, as with Qwen2.5, the model has more rows than the tokenizer has ids)."""
    s = {**MODEL_SIZES, **sizes}
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": -(-tokenizer_vocab // 64) * 64,
        "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"],
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 512, "attention_bias": True, "attention_dropout": 0.0,
        "tie_word_embeddings": True, "initializer_range": 0.02,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": s["num_hidden_layers"],
        "bos_token_id": special_ids["<|endoftext|>"], "eos_token_id": special_ids["<|im_end|>"],
        "torch_dtype": "float32", "use_cache": True,
    }


def write_synthetic_assets(out_dir, *, seed: int = 0, vocab_size: int = 512, **sizes) -> Path:
    """Write the synthetic checkpoint dir (no weights): tokenizer.json, tokenizer_config.json,
    generation_config.json and config.json. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, seed)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    atomic_write(out / "tokenizer.json", tok.save)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHAT_TEMPLATE,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "errors": "replace", "model_max_length": 512,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
    })
    write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    })
    write_json(out / "config.json", model_config(tok.get_vocab_size(), ids, **sizes))
    return out
