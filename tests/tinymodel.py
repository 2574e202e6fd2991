"""Tiny Llama checkpoints built in code, so tests run offline and in seconds.

`save_tiny_base` writes an ordinary Hugging Face folder (config, safetensors weights, a real
byte-level BPE tokenizer trained on a few sentences, and a chat template). `save_finetune` writes
a perturbed copy of a base folder that stands in for a fine-tune: small dense deltas on every
attention and MLP weight, plus a changed norm, so every kind of tensor is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "deltamux serves many fine-tuned tasks from one base model.",
    "Sparse deltas are applied in place and restored exactly.",
    "What is two plus two? The answer is four.",
    "I love this phone, the battery lasts all day!",
    "Terrible service, I will never come back.",
    "Translate to French: good morning. Bonjour.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with the special tokens a chat model needs."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(vocab_size: int, *, tie_word_embeddings: bool = True) -> LlamaConfig:
    """Return a Llama config with odd sizes, so a transposed index shows up as a shape error."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_tiny_base(out: Path, *, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """Write a tiny random-weight Llama base with its tokenizer into `out` and return `out`."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), tie_word_embeddings=tie_word_embeddings))
    # Larger weights than the default init, so greedy decoding is not stuck on one token.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_finetune(base: Path, out: Path, *, seed: int, scale: float = 0.02) -> Path:
    """Write a fine-tune stand-in of `base`: dense random deltas on linear weights and one norm."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
        model.model.norm.weight.add_(torch.randn(model.model.norm.weight.shape, generator=generator) * scale)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(base).save_pretrained(out)
    return out
