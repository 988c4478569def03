"""A byte-level tokenizer: works offline, needs no vocabulary file, covers any UTF-8 text."""
from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2
_OFFSET = 3  # byte b -> token b + 3


class ByteTokenizer:
    vocab_size = 256 + _OFFSET
    pad_id = PAD

    def __init__(self, context_length: int):
        if context_length < 3:
            raise ValueError("context_length must be >= 3 (BOS, one byte, EOS)")
        self.context_length = context_length

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (context_length,), BOS ... EOS then PAD; long texts are truncated."""
        body = [b + _OFFSET for b in text.encode("utf-8")][: self.context_length - 2]
        ids = [BOS, *body, EOS]
        ids += [PAD] * (self.context_length - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts])

    def decode(self, ids: torch.Tensor) -> str:
        data = bytes(int(i) - _OFFSET for i in ids.tolist() if int(i) >= _OFFSET)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer from a local folder, with the ByteTokenizer's interface: ``encode``
    gives (context_length,) ids, truncated and right-padded; ``pad_id``; ``vocab_size``."""

    def __init__(self, folder: str, context_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tok.pad_token_id is None:  # GPT-style vocabularies: pad with the end token
            self.tok.pad_token = self.tok.eos_token
        self.context_length = context_length
        self.pad_id = int(self.tok.pad_token_id)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tok(text, truncation=True, max_length=self.context_length, padding="max_length")["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts])

    def decode(self, ids: torch.Tensor) -> str:
        return self.tok.decode(ids.tolist(), skip_special_tokens=True)


def make_tokenizer(spec: str, context_length: int):
    """``byte`` (offline, no vocabulary) or a local folder holding a transformers tokenizer."""
    if spec == "byte":
        return ByteTokenizer(context_length)
    return HFTokenizer(spec, context_length)
