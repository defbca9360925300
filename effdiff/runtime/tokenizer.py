"""CLIP tokenization with the `tokenizers` library only, from the exported tokenizer.json."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from effdiff.errors import EffdiffError


class PromptTokenizer:
    """Prompts -> (batch, max_length) int64 ids: BOS, tokens, EOS, then padding; long prompts truncated."""

    def __init__(self, tokenizer_json: Path, max_length: int, pad_id: int, eos_id: int) -> None:
        if not Path(tokenizer_json).exists():
            raise EffdiffError(f"{tokenizer_json} is missing; re-run the export")
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable or malformed files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EffdiffError(
                f"{tokenizer_json} cannot be read as a tokenizer ({first}); re-run the export"
            ) from None
        # Saved tokenizer.json files may carry padding/truncation from their last use; we do both here.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, enc in enumerate(self.tokenizer.encode_batch(prompts)):
            tokens = enc.ids
            if len(tokens) > self.max_length:
                warnings.warn(
                    f"prompt {row} has {len(tokens)} tokens; truncated to {self.max_length} "
                    f"(dropped: {self.tokenizer.decode(tokens[self.max_length - 1 : -1])!r})",
                    stacklevel=2,
                )
                tokens = [*tokens[: self.max_length - 1], self.eos_id]
            ids[row, : len(tokens)] = tokens
        return ids
