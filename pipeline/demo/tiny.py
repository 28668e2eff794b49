"""Tiny but real Hugging Face causal LMs and tokenizers, built locally (no hub access).

Tests, CI and benchmarks need real architectures (Llama, Qwen2, Qwen3) with real code
paths, but with tiny sizes so they run on 2 CPU cores in seconds. The tokenizer is a
byte-level BPE trained on a few lines of text with the `tokenizers` library, so every
string encodes; the model's vocabulary may be larger than the tokenizer's (as Qwen's
151,936 is larger than its 151,665 tokens), which is what the cache must handle.

    python -m pipeline.demo.tiny OUT_DIR --arch qwen2 --vocab-size 151936
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Knowledge distillation trains a small student to imitate a large teacher. "
    "A teacher's output distribution carries more information than a one-hot label. "
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and words like answer question because. "
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

ARCHS = ("llama", "qwen2", "qwen3")


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) trained on `texts`.

    Special tokens: `<|endoftext|>` (eos, bos and pad). Deterministic for the same texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [_DEFAULT_TEXT] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 4096, eos_token_id: int = 0, tie_word_embeddings: bool = True):
    """A transformers config of the given architecture with tiny sizes."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden // heads, **common)
    raise ValueError(f"arch={arch!r} is not one of {ARCHS}")


def build_tiny_model(out_dir: str | Path, arch: str = "llama", vocab_size: int | None = None,
                     hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                     tokenizer_vocab: int = 512, texts: list[str] | None = None,
                     tie_word_embeddings: bool = True) -> Path:
    """Save a tiny randomly initialised causal LM plus its tokenizer to `out_dir`.

    `vocab_size` defaults to the tokenizer's size; a larger value pads the model's
    vocabulary (ids the tokenizer never produces but the model can predict).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tok = train_tokenizer(texts, vocab_size=tokenizer_vocab)
    v = vocab_size or len(tok)
    if v < len(tok):
        raise ValueError(f"vocab_size={v} is smaller than the tokenizer's {len(tok)} tokens")
    torch.manual_seed(seed)
    cfg = tiny_config(arch, v, hidden=hidden, layers=layers, heads=heads,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=tie_word_embeddings)
    model = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build_tiny_model(args.out, args.arch, args.vocab_size, args.hidden, args.layers,
                            args.heads, args.seed)
    print(path)


if __name__ == "__main__":
    main()
