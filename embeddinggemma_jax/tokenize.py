"""Tokenisation with the checkpoint's own fast tokenizer.

We use the ``tokenizers`` library on the folder's ``tokenizer.json`` (its post-processor adds
``<bos>`` ... ``<eos>``), not ``transformers.AutoTokenizer``, which imports PyTorch when it is
installed. Truncation keeps ``<eos>`` last, exactly as the reference does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Sequence

from embeddinggemma_jax.errors import WeightsError
from embeddinggemma_jax.io_utils import release_free_heap

# The tokenizer's files in a model folder: copied into checkpoints and exported folders.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


class TextTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_id: int = 0, eos_id: int = 1):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise WeightsError(f"{path} is missing; the model folder needs its tokenizer.json")
        self.path = path
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(f"{path} is not a readable tokenizer ({msg}); re-download or re-export the model "
                               "folder") from None
        release_free_heap()  # the JSON parse leaves much freed heap behind
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = max_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    def encode(self, texts: Sequence[str], truncate: bool = True, max_length: int | None = None) -> list[list[int]]:
        """Token ids with <bos>/<eos>; longer than ``max_length`` (default and at most: the model's limit)
        is truncated with <eos> kept last, as the reference does, or refused when ``truncate`` is False."""
        limit = min(max_length or self.max_length, self.max_length)
        encs = self._tok.encode_batch_fast(list(texts))  # the same ids, without computing character offsets
        return [self._truncate(e.ids, i, truncate, limit) for i, e in enumerate(encs)]

    def _truncate(self, ids: list[int], index: int, truncate: bool, limit: int) -> list[int]:
        if len(ids) > limit:
            if not truncate:
                raise ValueError(f"text {index} has {len(ids)} tokens, more than the limit of "
                                 f"{limit}; shorten it or pass truncate=True")
            ids = ids[:limit - 1] + [self.eos_id]
        return ids

    @functools.cached_property
    def _cuts(self) -> _SpaceCuts | None:
        return _SpaceCuts.of(self._tok)

    def encode_bounded(self, texts: Sequence[str], truncate: bool = True, max_chars: int = 1 << 62,
                       start_chars: int | None = None, first_index: int = 0) -> list[list[int]]:
        """``encode(texts, truncate)``, the same ids, without tokenising a long text whole.

        A text longer than ``start_chars`` (default: 4 characters per token of the limit) is tokenised up to
        a hard cut (see ``_SpaceCuts``) at or after that many characters; when that prefix already has the
        limit's tokens, they are the whole text's first tokens, so truncation gives the same ids (and with
        ``truncate=False`` the text is known to be too long); otherwise the prefix doubles. Never more than
        ``max_chars`` characters of a text are tokenised: a text that would need more raises
        ``TooManyCharacters``. Work and memory per text are therefore bounded by ``max_chars`` whatever the
        text's length. Errors name a text by its index plus ``first_index``."""
        limit = self.max_length
        start = min(start_chars or 4 * limit, max_chars)
        out: list[list[int] | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= start]
        if short:
            for i, e in zip(short, self._tok.encode_batch_fast([texts[i] for i in short])):
                out[i] = self._truncate(e.ids, first_index + i, truncate, limit)
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_long(first_index + i, t, truncate, start, max_chars)
        return out

    def _encode_long(self, index: int, text: str, truncate: bool, start: int, max_chars: int) -> list[int]:
        limit, cuts, n, tried = self.max_length, self._cuts, start, 0
        while cuts is not None:
            cut = cuts.first(text, n, min(len(text) - 1, max_chars)) if n <= max_chars else None
            if cut is None and tried < max_chars:  # the last hard cut the character limit allows
                cut = cuts.last(text, tried + 1, min(len(text) - 1, max_chars))
            if cut is None:
                break
            tried = cut
            ids = self._tok.encode_batch_fast([text[:cut]])[0].ids
            if len(ids) >= limit:  # the whole text has more tokens still (the rest starts with a space)
                if not truncate:
                    raise ValueError(f"text {index} has more than {limit} tokens (already in its first {cut} "
                                     f"characters), more than the limit of {limit}; shorten it or pass "
                                     f"truncate=True")
                return ids[:limit - 1] + [self.eos_id]
            n = 2 * cut
        if len(text) > max_chars:
            raise TooManyCharacters(index, len(text), max_chars)
        return self._truncate(self._tok.encode_batch_fast([text])[0].ids, index, truncate, limit)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts as ``encode(texts, truncate=True)`` would give (truncation keeps exactly the model's
        limit), without building the id lists."""
        return [min(len(e), self.max_length) for e in self._tok.encode_batch_fast(list(texts))]


class TooManyCharacters(ValueError):
    """``encode_bounded``: finding a text's first ``max_length`` tokens would take tokenising more characters
    than allowed."""

    def __init__(self, index: int, chars: int, max_chars: int):
        super().__init__(f"text {index} has {chars} characters and its first tokens cannot be found within "
                         f"{max_chars} characters (no space there the tokenizer cannot merge across); shorten it")
        self.index, self.chars, self.max_chars = index, chars, max_chars


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer writes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _SpaceCuts:
    """Which spaces of a raw text no token can span, so that the tokens before one do not depend on the text after
    it: tokenising a prefix ending there gives exactly the first tokens of the whole text.

    Derived from the tokenizer itself, for the pipelines the argument covers: a normalizer that is absent or
    replaces " " by one character (Gemma: "▁"); a pre-tokenizer that is absent, splits on " ", or is ByteLevel
    without its regex; a BPE model. BPE only ever builds tokens of its vocabulary, and added tokens are matched
    as whole strings, so the boundary between a character ``c`` and the space after it is a hard cut unless some
    vocabulary token or added token holds ``c`` (as that stage sees it) directly before a space. Added tokens that
    strip neighbouring whitespace void the argument (``of`` returns None then).
    """

    def __init__(self, space: str, bad_raw: frozenset, bad_vocab: frozenset, byte_level: bool):
        self.space, self.bad_raw, self.bad_vocab, self.byte_level = space, bad_raw, bad_vocab, byte_level
        self._bytes = _byte_chars() if byte_level else None

    @classmethod
    def of(cls, tok) -> "_SpaceCuts | None":
        def state(x):
            return json.loads(x.__getstate__()) if x is not None else None

        norm, pre = state(tok.normalizer), state(tok.pre_tokenizer)
        if norm is None:
            space = " "
        elif (norm.get("type") == "Replace" and norm.get("pattern") == {"String": " "}
              and len(norm.get("content", "")) == 1):
            space = norm["content"]
        else:
            return None
        byte_level = False
        if pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
            pass
        elif pre.get("type") == "ByteLevel" and not pre.get("use_regex", True):
            byte_level = True
        else:
            return None
        model = tok.model
        if type(model).__name__ != "BPE" or model.dropout or model.continuing_subword_prefix or model.end_of_word_suffix:
            return None
        added = tok.get_added_tokens_decoder().values()
        if any(a.lstrip or a.rstrip or a.single_word for a in added):
            return None
        cuts = cls(space, frozenset(), frozenset(), byte_level)
        sep = cuts._vocab_char(space, first=True)
        bad_vocab = {t[i - 1] for t in tok.get_vocab(with_added_tokens=False) if sep in t[1:]
                     for i in range(1, len(t)) if t[i] == sep}
        bad_raw = set()
        for a in added:
            c = a.content
            for i in range(1, len(c)):
                if c[i] in (" ", space):
                    bad_raw.add(c[i - 1])
                    if c[i - 1] == space:
                        bad_raw.add(" ")
        return cls(space, frozenset(bad_raw), frozenset(bad_vocab), byte_level)

    def _vocab_char(self, ch: str, first: bool = False) -> str:
        """``ch`` after the normalizer, as the vocabulary spells the part of it next to the cut."""
        ch = self.space if ch == " " else ch
        if self.byte_level:
            b = ch.encode("utf-8", "surrogatepass")
            return self._bytes[b[0] if first else b[-1]]
        return ch

    def hard(self, text: str, i: int) -> bool:
        """Whether the boundary before ``text[i]`` (a space) is a hard cut."""
        left = text[i - 1]
        return left not in self.bad_raw and self._vocab_char(left) not in self.bad_vocab

    def first(self, text: str, lo: int, hi: int) -> int | None:
        """The smallest hard cut in [lo, hi], or None."""
        i = text.find(" ", max(lo, 1), hi + 1)
        while i != -1:
            if self.hard(text, i):
                return i
            i = text.find(" ", i + 1, hi + 1)
        return None

    def last(self, text: str, lo: int, hi: int) -> int | None:
        """The largest hard cut in [lo, hi], or None."""
        i = text.rfind(" ", max(lo, 1), hi + 1)
        while i != -1:
            if self.hard(text, i):
                return i
            i = text.rfind(" ", max(lo, 1), i)
        return None


def check_texts(texts: Iterable, where=lambda i: f"text at index {i}") -> list[str]:
    """The texts as a list, each a str that UTF-8 can encode (a lone surrogate, e.g. from undecodable
    bytes, is refused naming ``where(i)``: the tokenizer would fail on it without saying where)."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where(i)} is {type(t).__name__}, not str; pass a list of strings")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where(i)} is not valid UTF-8 (an undecodable byte at character {e.start}); "
                             "pass UTF-8 text") from None
        out.append(t)
    return out
