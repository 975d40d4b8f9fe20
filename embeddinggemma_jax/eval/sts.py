"""Semantic textual similarity (STS Benchmark layout): Spearman x 100 of cosine vs gold score.

Files: ``DIR/stsb-LANG-SPLIT.csv``, CSV without a header, one pair per row: ``sentence1, sentence2,
score`` with the score a number in 0..5 (``../shared/data/stsb-multi-mt``, PhilipMay/stsb-multi-mt).
Anything else is refused in one line naming the file and line: a missing file or language, a row
with the wrong number of columns, a score that is not a number or is outside 0-5, an empty split.

The metric is sentence-transformers' ``EmbeddingSimilarityEvaluator``'s ``spearman_cosine``: the
Spearman rank correlation (ties ranked by their average, as ``scipy.stats.spearmanr``) between the
gold scores and the cosine of the two sentences' embeddings, here x 100. At a Matryoshka dimension
``d`` the embeddings are truncated to their first ``d`` components (cosine re-normalises them).

Each language's distinct sentences (both columns) are embedded once, through ``embed(texts)``: for
a model that is ``EmbeddingGemma.encode`` (the batching engine: sorted, bucketed batches), during
training the training forward (``train.eval.StsEvaluator``).
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embeddinggemma_jax.errors import BadRecordError, InputError

MAX_SCORE = 5.0
FILE_PATTERN = "stsb-{lang}-{split}.csv"
DEFAULT_DIMENSIONS = (768, 512, 256, 128)


@dataclass(frozen=True)
class StsPairs:
    """One language's pairs of one split."""

    language: str
    path: Path
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # [n] float64, 0..5

    def __len__(self) -> int:
        return len(self.scores)

    def head(self, n: int | None) -> "StsPairs":
        """The first ``n`` pairs (all when ``n`` is None)."""
        if n is None:
            return self
        return StsPairs(self.language, self.path, self.sentences1[:n], self.sentences2[:n], self.scores[:n])


def read_sts_file(path: str | Path, language: str = "") -> StsPairs:
    """The pairs of one ``sentence1, sentence2, score`` CSV file; bad rows and empty files are errors
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"STS file {path} does not exist; pass a folder of stsb-LANG-SPLIT.csv files "
                         "(sentence1, sentence2, score)")
    s1, s2, scores = [], [], []
    hint = "each row must be: sentence1, sentence2, score (a number in 0-5), CSV quoted where needed"
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                where = f"{path} line {start}"
                start = reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) != 3:
                    raise BadRecordError(f"{where} has {len(row)} columns, not 3; {hint}")
                try:
                    score = float(row[2])
                except ValueError:
                    raise BadRecordError(f"{where}: score {row[2]!r} is not a number; {hint}") from None
                if not (0.0 <= score <= MAX_SCORE):  # NaN fails too
                    raise BadRecordError(f"{where}: score {row[2]!r} is outside 0-5; {hint}")
                for k, text in enumerate(row[:2]):
                    if not text.strip():
                        raise BadRecordError(f"{where}: sentence{k + 1} is empty; {hint}")
                s1.append(row[0])
                s2.append(row[1])
                scores.append(score)
        except csv.Error as e:
            raise BadRecordError(f"{path} line {reader.line_num}: not valid CSV ({e}); {hint}") from None
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {hint}") from None
    if not scores:
        raise BadRecordError(f"{path} has no pairs (an empty split); {hint}")
    return StsPairs(language, path, s1, s2, np.asarray(scores, np.float64))


def available_languages(data: str | Path, split: str) -> list[str]:
    """Languages with a ``stsb-LANG-SPLIT.csv`` file in ``data``, sorted."""
    pat = re.compile(r"^stsb-(.+)-" + re.escape(split) + r"\.csv$")
    return sorted(m.group(1) for p in Path(data).iterdir() if (m := pat.match(p.name)))


def sts_files(data: str | Path, split: str, languages: str | Sequence[str]) -> dict[str, Path]:
    """{language: file} for ``languages`` (a list, a comma-separated string, or "all")."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"STS data folder {data} does not exist; pass a folder of stsb-LANG-SPLIT.csv files")
    have = available_languages(data, split)
    if isinstance(languages, str):
        languages = have if languages.strip() == "all" else [x.strip() for x in languages.split(",") if x.strip()]
    if not languages:
        raise InputError(f"no {FILE_PATTERN.format(lang='*', split=split)} files in {data}"
                         + (f" (languages of other splits: {', '.join(others)})"
                            if (others := sorted({p.name for p in data.glob('stsb-*.csv')})) else "")
                         + "; check --data and --split")
    missing = [x for x in languages if x not in have]
    if missing:
        path = data / FILE_PATTERN.format(lang=missing[0], split=split)
        raise InputError(f"STS file {path} does not exist (language {missing[0]!r}, split {split!r}); languages "
                         f"with a {split} split in {data}: {', '.join(have) or 'none'}")
    return {x: data / FILE_PATTERN.format(lang=x, split=split) for x in dict.fromkeys(languages)}


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(x))
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(x), np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long vectors (NaN where either is constant)."""
    ra, rb = rankdata(np.asarray(a, np.float64)), rankdata(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def pairwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
    return np.sum(a * b, axis=-1) / (na * nb)


def sts_spearman(e1: np.ndarray, e2: np.ndarray, gold: np.ndarray, dims: Sequence[int]) -> dict[int, float]:
    """{dim: Spearman x 100} of the cosine of ``e1[:, :dim]`` and ``e2[:, :dim]`` vs ``gold``."""
    return {int(d): 100.0 * spearman(gold, pairwise_cosine(e1[:, :d], e2[:, :d])) for d in dims}


def evaluate_pairs(embed: Callable[[list[str]], np.ndarray], pairs: StsPairs, dims: Sequence[int]) -> dict:
    """One language: its distinct sentences embedded once (``embed``: texts -> [n, out]), then the
    Spearman x 100 at each dimension. ``{"spearman", "pairs", "sentences", "seconds", "by_dimension"}``."""
    t0 = time.perf_counter()
    unique = list(dict.fromkeys(pairs.sentences1 + pairs.sentences2))
    index = {s: i for i, s in enumerate(unique)}
    emb = np.asarray(embed(unique), np.float32)
    i1 = np.fromiter((index[s] for s in pairs.sentences1), np.int64, len(pairs))
    i2 = np.fromiter((index[s] for s in pairs.sentences2), np.int64, len(pairs))
    by_dim = sts_spearman(emb[i1], emb[i2], pairs.scores, dims)
    if any(math.isnan(v) for v in by_dim.values()):
        raise ValueError(f"{pairs.path}: Spearman is undefined (every gold score, or every cosine, is the same)")
    return {"spearman": by_dim[max(by_dim)], "pairs": len(pairs), "sentences": len(unique),
            "seconds": time.perf_counter() - t0, "by_dimension": {str(d): v for d, v in by_dim.items()}}


def summarize(results: dict[str, dict]) -> dict:
    """The mean over languages, of ``spearman`` and of each dimension."""
    dims = list(next(iter(results.values()))["by_dimension"])
    return {"mean": float(np.mean([r["spearman"] for r in results.values()])),
            "mean_by_dimension": {d: float(np.mean([r["by_dimension"][d] for r in results.values()])) for d in dims}}


def run_sts(embed: Callable[[list[str]], np.ndarray], data: str | Path, split: str = "dev",
            languages: str | Sequence[str] = "all", dims: Sequence[int] = DEFAULT_DIMENSIONS,
            max_pairs: int | None = None, say: Callable[[str], None] | None = None) -> dict:
    """Every language of ``languages``: ``{"split", "results": {lang: ...}, "mean", "mean_by_dimension"}``.
    All files are read and checked before the first sentence is embedded."""
    files = sts_files(data, split, languages)
    pairs = {lang: read_sts_file(p, lang).head(max_pairs) for lang, p in files.items()}
    return {"split": split, **evaluate_languages(embed, pairs, dims, say)}


def evaluate_languages(embed: Callable[[list[str]], np.ndarray], pairs: dict[str, StsPairs], dims: Sequence[int],
                       say: Callable[[str], None] | None = None) -> dict:
    """``{"results": {lang: ...}, "mean", "mean_by_dimension"}`` of already read pairs."""
    results = {}
    for lang, p in pairs.items():
        results[lang] = evaluate_pairs(embed, p, dims)
        if say:
            say(f"{lang}: spearman x100 = {results[lang]['spearman']:.2f} ({len(p)} pairs, "
                f"{results[lang]['seconds']:.1f} s) " + " ".join(f"d{d}={v:.2f}" for d, v in
                                                                 results[lang]["by_dimension"].items()))
    return {"results": results, **summarize(results)}


def model_embedder(model, prompt_name: str | None = "STS", batch_size: int = 32) -> Callable[[list[str]], np.ndarray]:
    """``texts -> [n, out]`` unnormalised fp32 through ``EmbeddingGemma.encode`` with the prompt."""
    return lambda texts: model.encode(texts, prompt_name=prompt_name or None, normalize=False,
                                      batch_size=batch_size)

