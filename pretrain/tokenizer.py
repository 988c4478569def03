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


SPECIAL = ("[PAD]", "[BOS]", "[EOS]")  # PAD, BOS, EOS in a transformers tokenizer of the byte tokenizer


def byte_tokenizer_for_transformers(context_length: int):
    """The byte tokenizer as a transformers tokenizer (a ``tokenizers`` model, saved as
    ``tokenizer.json``): each UTF-8 byte is its own token (the byte-level alphabet as vocabulary,
    no merges: byte b -> b + 3), texts become ``[BOS] bytes [EOS]``, pad id 0, and truncation to
    ``context_length`` keeps BOS and EOS, so ``tok(text, truncation=True, padding="max_length")``
    gives ``ByteTokenizer(context_length).encode(text)`` and its mask, for any text. Special-token
    names in a text are bytes like any other (``split_special_tokens``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()  # byte -> the printable character byte-level tokenizers name it by
    vocab = {name: i for i, name in enumerate(SPECIAL)}
    vocab.update({chars[b]: b + _OFFSET for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes, unsplit
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True) for name in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL[BOS]} $A {SPECIAL[EOS]}", special_tokens=[(SPECIAL[BOS], BOS), (SPECIAL[EOS], EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL[PAD], bos_token=SPECIAL[BOS], eos_token=SPECIAL[EOS],
        model_max_length=context_length, split_special_tokens=True, model_input_names=["input_ids", "attention_mask"])


class HFTokenizer:
    """A transformers tokenizer from a local folder, with the ByteTokenizer's interface: ``encode``
    gives (context_length,) ids, truncated and right-padded; ``pad_id``; ``vocab_size``; ``eos_id``,
    the id it ends every text with (None if it appends none), for the attention mask when it pads
    with that same token (CLIP)."""

    def __init__(self, folder: str, context_length: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tok.pad_token_id is None:  # GPT-style vocabularies: pad with the end token
            self.tok.pad_token = self.tok.eos_token
        self.context_length = context_length
        self.pad_id = int(self.tok.pad_token_id)
        self.vocab_size = len(self.tok)
        eos, ends = self.tok.eos_token_id, self.tok("a")["input_ids"]
        self.eos_id = int(eos) if eos is not None and ends and ends[-1] == eos else None

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tok(text, truncation=True, max_length=self.context_length, padding="max_length")["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts])

    def decode(self, ids: torch.Tensor) -> str:
        return self.tok.decode(ids.tolist(), skip_special_tokens=True)


class OpenClipTokenizer:
    """OpenCLIP's tokenizer, offline: ``open_clip`` is its BPE (the vocabulary ships inside the
    package), ``open_clip:NAME`` the tokenizer open_clip pairs with model NAME (refused when that is
    a Hugging Face tokenizer, which would be downloaded). Ids: start, text, end, then 0 (padding)."""

    def __init__(self, spec: str, context_length: int):
        try:
            import open_clip
        except ImportError:
            raise ValueError("OpenCLIP's tokenizer needs the open-clip-torch package: pip install -e '.[openclip]'") \
                from None

        name = spec.partition(":")[2]
        if name:
            cfg = open_clip.get_model_config(name)
            if cfg is None:
                raise ValueError(f"open_clip has no model {name!r}")
            if cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
                raise ValueError(f"open_clip {name!r} uses the Hugging Face tokenizer "
                                 f"{cfg['text_cfg']['hf_tokenizer_name']!r}; give a local folder holding it")
            self.tok = open_clip.get_tokenizer(name, context_length=context_length)
        else:
            self.tok = open_clip.SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.pad_id = 0
        self.vocab_size = int(self.tok.vocab_size)

    def encode(self, text: str) -> torch.Tensor:
        return self.tok([text])[0].long()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tok(texts).long()

    def decode(self, ids: torch.Tensor) -> str:
        body = [int(i) for i in ids.tolist() if int(i) not in (0, self.tok.sot_token_id, self.tok.eot_token_id)]
        return self.tok.decode(body).strip()


def is_open_clip(spec: str) -> bool:
    return spec == "open_clip" or spec.startswith("open_clip:")


def make_tokenizer(spec: str, context_length: int):
    """``byte`` (offline, no vocabulary), ``open_clip`` / ``open_clip:MODEL`` (OpenCLIP's BPE,
    offline), or a local folder holding a transformers tokenizer."""
    if spec == "byte":
        return ByteTokenizer(context_length)
    if is_open_clip(spec):
        return OpenClipTokenizer(spec, context_length)
    return HFTokenizer(spec, context_length)
