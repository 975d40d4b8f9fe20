"""Evaluation (``embeddinggemma_jax.eval``, ``embeddinggemma-jax evaluate``): STS Spearman equal to
sentence-transformers' EmbeddingSimilarityEvaluator (tiny model; real weights in fp32 and bf16,
measured live), retrieval metrics equal to its InformationRetrievalEvaluator, bad STS files refused
in one line naming the file and line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from embeddinggemma_jax.cli import main
from embeddinggemma_jax.eval import sts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.eval_sts_reference import reference_spearman  # noqa: E402 - the reference, one home

ROOT = Path(__file__).resolve().parents[1]
# The STS-B files (shared/data/stsb-multi-mt): $EMBEDDINGGEMMA_JAX_STSB, else shared/ inside or beside the checkout.
_CANDIDATES = [Path(os.environ.get("EMBEDDINGGEMMA_JAX_STSB", ROOT / "shared" / "data" / "stsb-multi-mt")),
               ROOT / "shared" / "data" / "stsb-multi-mt", ROOT.parent / "shared" / "data" / "stsb-multi-mt"]
DATA = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
TINY_DIMS = (40, 32)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


def _pairs_csv(n: int = 24, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = []
    for i in range(n):
        a = " ".join(words[j] for j in rng.choice(len(words), 3, replace=False))
        b = " ".join(words[j] for j in rng.choice(len(words), 4, replace=False))
        rows.append(f'"{a}, {i}",{b},{rng.integers(0, 51) / 10}')
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- metric
def test_spearman_equals_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for n in (2, 7, 500):
        gold = rng.integers(0, 6, n) / 1.0  # many ties, as STS-B's scores
        cos = rng.normal(size=n)
        cos[: n // 3] = cos[n // 3: 2 * (n // 3)]  # ties on the other side too
        if np.ptp(gold) == 0:
            gold[0] += 1
        assert sts.spearman(gold, cos) == pytest.approx(spearmanr(gold, cos).statistic, abs=1e-12)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text,line,what", [
    ('a,b,1.0\n"x","y"\n', 2, "has 2 columns, not 3"),
    ("a,b,1.0\nc,d,1.5,extra\n", 2, "has 4 columns, not 3"),
    ('a,b,1.0\n"multi\nline",d,2\ne,f,high\n', 4, "score 'high' is not a number"),
    ("a,b,1.0\nc,d,5.5\n", 2, "score '5.5' is outside 0-5"),
    ("a,b,-0.1\n", 1, "score '-0.1' is outside 0-5"),
    ("a,b,nan\n", 1, "score 'nan' is outside 0-5"),
    ("a,,3\n", 1, "sentence2 is empty"),
])
def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, capsys, text, line, what):
    p = _write(tmp_path, "stsb-en-dev.csv", text)
    with pytest.raises(ValueError, match=f"line {line}.*{what}"):
        sts.read_sts_file(p)
    # the CLI: one line, the file and line named, before any model is loaded (no --model needed)
    assert main(["evaluate", "sts", "--data", str(tmp_path), "--languages", "en", "--model", "/nonexistent"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{p} line {line}" in err and what in err, err


def test_missing_file_language_and_empty_split(tmp_path, capsys):
    _write(tmp_path, "stsb-en-dev.csv", "a,b,1\n")
    _write(tmp_path, "stsb-de-dev.csv", "\n")  # an empty split
    _write(tmp_path, "stsb-fr-train.csv", "a,b,1\n")
    cases = [
        (["--languages", "xx"], f"{tmp_path / 'stsb-xx-dev.csv'} does not exist (language 'xx', split 'dev'); "
                                f"languages with a dev split in {tmp_path}: de, en"),
        (["--languages", "en", "--split", "test"], f"languages with a test split in {tmp_path}: none"),
        (["--languages", "all", "--split", "test"], "no stsb-*-test.csv files"),
        (["--languages", "en,de"], f"{tmp_path / 'stsb-de-dev.csv'} has no pairs (an empty split)"),
        (["--languages", "all"], f"{tmp_path / 'stsb-de-dev.csv'} has no pairs"),
    ]
    for argv, what in cases:
        assert main(["evaluate", "sts", "--data", str(tmp_path), "--model", "/nonexistent", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err, (argv, err)
    assert main(["evaluate", "sts", "--data", str(tmp_path / "nope"), "--model", "/nonexistent"]) == 1
    assert "STS data folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stsb-fr-dev.csv does not exist"):
        sts.sts_files(tmp_path, "dev", ["fr"])
    assert sts.available_languages(tmp_path, "train") == ["fr"]


# ----------------------------------------------------------------------------- tiny model vs sentence-transformers
@pytest.fixture(scope="module")
def tiny_pair(tiny_folder):
    from sentence_transformers import SentenceTransformer

    from embeddinggemma_jax import EmbeddingGemma

    return EmbeddingGemma.from_pretrained(tiny_folder), SentenceTransformer(str(tiny_folder), device="cpu")


def test_evaluate_sts_cli_json_equals_embedding_similarity_evaluator(tiny_folder, tiny_pair, tmp_path, capsys):
    _write(tmp_path / "d", "stsb-aa-dev.csv", _pairs_csv(30, 1))
    _write(tmp_path / "d", "stsb-bb-dev.csv", _pairs_csv(20, 2) + _pairs_csv(6, 1))  # repeats: embedded once
    out = tmp_path / "r.json"
    assert main(["evaluate", "sts", "--model", str(tiny_folder), "--data", str(tmp_path / "d"), "--split", "dev",
                 "--languages", "all", "--dimensions", "40,32", "--prompt-name", "query", "--batch-size", "8",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    assert res["task"] == "sts" and res["split"] == "dev" and res["model"] == str(tiny_folder)
    assert set(res["results"]) == {"aa", "bb"}
    _, st = tiny_pair
    for lang, n in (("aa", 30), ("bb", 26)):
        r = res["results"][lang]
        assert r["pairs"] == n and set(r["by_dimension"]) == {"40", "32"} and r["spearman"] == r["by_dimension"]["40"]
        pairs = sts.read_sts_file(tmp_path / "d" / f"stsb-{lang}-dev.csv")
        assert r["sentences"] == len(set(pairs.sentences1 + pairs.sentences2))
        for d in TINY_DIMS:
            ref = reference_spearman(st, pairs, "query", truncate_dim=d)
            assert abs(r["by_dimension"][str(d)] - ref) < 0.05, (lang, d, r["by_dimension"][str(d)], ref)
    assert res["mean"] == pytest.approx(np.mean([r["spearman"] for r in res["results"].values()]))
    assert res["mean_by_dimension"]["32"] == pytest.approx(
        np.mean([r["by_dimension"]["32"] for r in res["results"].values()]))


def test_retrieval_equals_information_retrieval_evaluator(tiny_folder, tiny_pair, tmp_path, capsys):
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    rng = np.random.default_rng(3)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
    recs = [{"query": " ".join(rng.choice(words, 3)), "positive": f"doc {i % 17}: " + " ".join(rng.choice(words, 5))}
            for i in range(30)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "r.json"
    assert main(["evaluate", "retrieval", "--model", str(tiny_folder), "--data", str(data), "--dimensions", "40",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "retrieval" and res["queries"] == 30 and res["documents"] == 30
    _, st = tiny_pair
    ev = InformationRetrievalEvaluator(
        {f"q{i}": r["query"] for i, r in enumerate(recs)}, {f"d{i}": r["positive"] for i, r in enumerate(recs)},
        {f"q{i}": {f"d{i}"} for i in range(len(recs))}, accuracy_at_k=[1, 10], precision_recall_at_k=[10],
        mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10], query_prompt_name="query", corpus_prompt_name="document",
        score_functions={"cosine": lambda a, b: __import__("sentence_transformers").util.cos_sim(a, b)},
        write_csv=False)
    ref = ev(st)
    mine = res["by_dimension"]["40"]
    for k, rk in (("recall@1", "accuracy@1"), ("recall@10", "recall@10"), ("mrr@10", "mrr@10"),
                  ("ndcg@10", "ndcg@10")):
        assert mine[k] == pytest.approx(ref[f"cosine_{rk}"], abs=1e-6), k


# ----------------------------------------------------------------------------- real weights
REAL_LANGUAGES = ("en", "ja")  # one Latin-script, one not
REAL_PAIRS = 200  # the first 200 dev pairs of each (benchmarks/eval_sts_reference.py runs the full split)


@pytest.fixture(scope="module")
def real_dev():
    if not DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the STS-B data is not at {DATA}; set EMBEDDINGGEMMA_JAX_STSB to shared/data/stsb-multi-mt")
        pytest.skip(f"STS-B data not at {DATA}")
    return {lang: sts.read_sts_file(DATA / f"stsb-{lang}-dev.csv", lang).head(REAL_PAIRS) for lang in REAL_LANGUAGES}


@pytest.fixture(scope="module")
def real_reference(real_dev, st_model):
    return {lang: reference_spearman(st_model, p, "STS") for lang, p in real_dev.items()}


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [("float32", 0.05), ("bfloat16", 0.3)])
def test_real_sts_equals_embedding_similarity_evaluator(request, real_dev, real_reference, dtype, tolerance):
    # the session's real models (conftest), so no second load and the encode buckets are already compiled
    model = request.getfixturevalue({"float32": "real_model", "bfloat16": "real_model_bf16"}[dtype])
    embed = sts.model_embedder(model, "STS")
    for lang, pairs in real_dev.items():
        r = sts.evaluate_pairs(embed, pairs, (768, 128))
        assert r["pairs"] == REAL_PAIRS and r["spearman"] > 70, (lang, r)  # a real model, not noise
        assert abs(r["spearman"] - real_reference[lang]) < tolerance, (dtype, lang, r["spearman"], real_reference[lang])
