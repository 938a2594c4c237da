"""Tokenizers for the random trees, built locally (real ones cannot be downloaded here): CLIP's
byte-level BPE and T5's Unigram, each knowing a few dozen whole words and falling back to characters."""

from __future__ import annotations

import string

from transformers import CLIPTokenizer, T5Tokenizer

# fmt: off
WORDS = (  # the words the tokenizers know whole; anything else falls back to characters
    "a", "photo", "of", "the", "an", "in", "on", "with", "and", "red", "blue", "green", "fox", "cat", "dog",
    "tree", "snow", "city", "night", "day", "portrait", "painting", "style", "mountain", "river", "sky",
    "sun", "light", "dark", "house", "car", "person", "woman", "man",
)
# fmt: on


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE like CLIP's: every byte as a piece (and with `</w>`), plus whole words."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # Merge left to right: ("f", "o"), ("fo", "x</w>") builds "fox</w>" from its characters.
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merge = (current, nxt)
            current += nxt
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer like T5's sentencepiece: whole words first, then single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0) for w in WORDS]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
