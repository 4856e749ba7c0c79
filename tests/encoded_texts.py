"""A map-style torch Dataset that encodes its texts with a smallm Tokenizer, in whichever process asks:
what a DataLoader's workers receive (pickled) when they tokenize on the fly."""

from __future__ import annotations

import torch
from smallm import Tokenizer


class EncodedTexts(torch.utils.data.Dataset):
    def __init__(self, tokenizer: Tokenizer, texts: list[str]) -> None:
        self.tokenizer, self.texts = tokenizer, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> list[int]:
        return self.tokenizer.encode_ordinary(self.texts[i])
