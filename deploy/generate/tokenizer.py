"""Text <-> token ids through a checkpoint's `tokenizer.json` (the `tokenizers` library, no transformers).

Without a tokenizer the CLI takes and prints token ids. `write_id_tokenizer` makes a real, minimal
tokenizer for random models (one word per id: "t123"), which the onnxruntime-genai builder needs
because it loads a tokenizer even when converting weights only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from export.config import Gemma2Config
from export.errors import G2trtError

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(G2trtError, ValueError):
    """A missing or unreadable tokenizer.json."""


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0]})") from None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with the special tokens (Gemma's <bos>) its post-processor adds."""
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


def find_tokenizer(*candidates: str | Path | None) -> Path | None:
    """The first `tokenizer.json` among files or directories `candidates` (None when there is none)."""
    for c in candidates:
        if c is None:
            continue
        p = Path(c)
        p = p / TOKENIZER_FILE if p.is_dir() else (p if p.name == TOKENIZER_FILE else p.parent / TOKENIZER_FILE)
        if p.is_file():
            return p
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `path` (a tokenizer.json, or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise TokenizerError(f"{p}: not found; pass token ids with --ids instead of text")
    return Tokenizer(p)


def write_id_tokenizer(cfg: Gemma2Config, directory: str | Path) -> Path:
    """Write a word-level tokenizer.json (+ tokenizer_config.json) whose word "t{i}" is id i.

    pad / eos / bos keep the config's ids and names (<pad>, <eos>, <bos>); "<bos>" is prepended to
    every encoding as Gemma's tokenizer does. For random models only: the text means nothing.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    directory = Path(directory)
    special = {cfg.pad_token_id: "<pad>", cfg.bos_token_id: "<bos>"}
    special |= {i: "<eos>" if n == 0 else f"<eos{n}>" for n, i in enumerate(cfg.eos_token_id)}
    vocab = {special.get(i, f"t{i}"): i for i in range(cfg.vocab_size)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=special[cfg.pad_token_id]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", cfg.bos_token_id)]
    )
    tok.add_special_tokens(list(special.values()))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "model_max_length": cfg.max_position_embeddings,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory / TOKENIZER_FILE
