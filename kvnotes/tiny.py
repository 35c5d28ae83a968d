"""Tiny random-initialised models (Llama, Qwen2, Gemma3; 2 layers, hidden 64) and a locally built word-level
tokenizer with a ChatML-like template, so that the whole pipeline runs in CI in seconds and offline.

The tokenizer's vocabulary is every word of the scenario families' prompts (a few seeds), so scenario values are
single known tokens; anything unseen becomes <unk>. Newlines are tokens of their own, as in real tokenizers.
"""
from __future__ import annotations

import functools
import re
import tempfile

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PIECE = re.compile(r"\n|[^\s\w]|[^\W_]+|_")


def _corpus_words() -> list[str]:
    from scenarios import FAMILIES, READ_FROM_FILE
    from kvnotes.readout import variants
    words = {"system", "user", "assistant", "Answer", ":"}
    for family, make in FAMILIES.items():
        if family in READ_FROM_FILE:        # the generated families only: a user's file does not change the vocabulary
            continue
        for seed in range(3):
            for inst in make(n_instances=4, seed=seed):
                for msgs in (inst.old_messages, inst.new_messages):
                    for m in msgs:
                        words.update(_PIECE.findall(m["content"]))
                words.update(_PIECE.findall(inst.suffix))
                for a in inst.candidates:
                    for v in variants(a):
                        words.update(_PIECE.findall(v))
    from scenarios.diverse import domain_table   # values only the same-conclusion controls write
    for d in domain_table().values():
        for v in d.other_values:
            words.update(_PIECE.findall(v))
    return sorted(words)


@functools.lru_cache(maxsize=1)
def build_tiny_tokenizer():
    """A PreTrainedTokenizerFast saved to and reloaded from a temp dir (TransformerLens needs `name_or_path`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in _corpus_words() if w not in SPECIALS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"_"), behavior="isolated"),
        pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins pieces with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    d = tempfile.mkdtemp(prefix="kvnotes-tiny-tok-")
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def build_tiny(arch: str, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer) for arch in {llama, qwen2, gemma3}; deterministic for a seed.

    The model is built in `dtype` the way `from_pretrained(dtype=...)` loads a real one (transformers'
    `from_config(..., dtype=...)`): parameters in `dtype`, RoPE frequency buffers (inv_freq, and Gemma-3's local and
    global ones) in fp32. A `.to(bfloat16)` would round inv_freq to bf16, a phase error of ~0.15 rad by position
    ~800. The parameters are the fp32 model's, rounded: initialisation draws the same numbers for every dtype."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config
    tok = build_tiny_tokenizer()
    vocab = ((len(tok) + 63) // 64) * 64
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(**common, rope_theta=10000.0)
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_theta=1e6)
    elif arch == "gemma3":
        # a short sliding window so the tests exercise sliding-window cache layers (Gemma-3's hybrid attention)
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=24,
                                  layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected llama, qwen2 or gemma3")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.architectures = [type(model).__name__]
    return model.eval(), tok
