"""CoSENT (``train --loss cosent``): loss and every gradient equal sentence-transformers'
``MatryoshkaLoss(CoSENTLoss)`` under PyTorch autograd on the tiny model (rtol 1e-4), step 1 on the
real weights within 1e-3, and the STS files -> JSONL -> train path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import PARITY_WEIGHTS, TINY_DIMS, _assert_grads_equal, _tokenizer

from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.data import BatchEncoder, TextBatch

# Scores with a tie (the tie adds no term) and pairs of different lengths (padding matters).
COSENT_BATCH = TextBatch(
    ["a b c", "hello", "x y z w", "why is the sky blue?", "the cat sat", "one two"],
    ["doc a", "doc hello there", "xyz", "rayleigh scattering of sunlight by the molecules of the air", "a cat sits",
     "three"], None, [4.2, 1.0, 2.5, 4.2, 0.0, 3.3])


def _torch_cosent(folder, b, dims, weights, backward: bool = True):
    """sentence-transformers' MatryoshkaLoss(CoSENTLoss) on the token batch ``b``: (loss, grads by (file, key))."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MatryoshkaLoss

    from embeddinggemma_jax.weights import DENSE1_FILE, DENSE2_FILE, ENCODER_FILE

    model = SentenceTransformer(str(folder), device="cpu")
    B = b.query_ids.shape[1]

    def features(ids, mask):
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}

    cols = [features(b.query_ids[0], b.query_mask[0]), features(b.doc_ids[0, :B], b.doc_mask[0, :B])]
    with torch.set_grad_enabled(backward):
        loss = MatryoshkaLoss(model, CoSENTLoss(model), list(dims), list(weights))(cols, torch.tensor(b.scores[0]))
    if not backward:
        return loss.item(), None
    loss.backward()
    grads = {(file, name): p.grad.numpy() for file, mod in ((ENCODER_FILE, model[0].auto_model),
                                                            (DENSE1_FILE, model[2]), (DENSE2_FILE, model[3]))
             for name, p in mod.named_parameters()}
    return loss.item(), grads


def _jax_cosent(folder, dims, weights, dtype="float32", prompts=("query", "document")):
    from embeddinggemma_jax.train.run import load_base

    cfg = st.TrainConfig(loss="cosent", matryoshka_dims=dims, matryoshka_weights=weights, dtype=dtype, remat=True)
    base, module = load_base(str(folder), cfg)
    t, params = st.make_trainable(module, cfg)
    tok, head = _tokenizer(folder)
    b = BatchEncoder(tok, head.prompts, 128, (32, 64, 128), *prompts).encode([COSENT_BATCH])
    assert b.scores.shape == (1, 6)
    loss, grads = st.loss_and_grads(t, cfg, params, b, dims, weights)
    return base.encoder_config, b, loss, grads


def test_cosent_loss_and_every_gradient_equal_sentence_transformers(tiny_folder):
    enc, b, loss, grads = _jax_cosent(tiny_folder, TINY_DIMS, PARITY_WEIGHTS)
    torch_loss, torch_grads = _torch_cosent(tiny_folder, b, TINY_DIMS, PARITY_WEIGHTS)
    assert torch_loss > 0
    np.testing.assert_allclose(float(loss), torch_loss, rtol=1e-4)
    _assert_grads_equal(enc, grads, torch_grads)


@pytest.mark.real
@pytest.mark.slow
def test_real_weights_step_one_cosent_loss_equals_sentence_transformers(real_folder):
    """Step 1 of --loss cosent on the real weights (fp32, the STS prompt on both sides, the default
    Matryoshka dims): the loss within 1e-3 of sentence-transformers' MatryoshkaLoss(CoSENTLoss)."""
    from embeddinggemma_jax.train.losses import DEFAULT_MATRYOSHKA_DIMS

    weights = (1.0,) * len(DEFAULT_MATRYOSHKA_DIMS)
    _, b, loss, grads = _jax_cosent(real_folder, DEFAULT_MATRYOSHKA_DIMS, weights, prompts=("STS", "STS"))
    del grads
    torch_loss, _ = _torch_cosent(real_folder, b, DEFAULT_MATRYOSHKA_DIMS, weights, backward=False)
    assert torch_loss > 0
    assert abs(float(loss) - torch_loss) < 1e-3, (float(loss), torch_loss)


def test_cosent_settings_and_records_are_checked(tmp_path):
    from embeddinggemma_jax.train.data import Fields, PairFile
    from embeddinggemma_jax.train.run import check_loss_input

    with pytest.raises(ValueError, match="--cached-loss works with --loss mnrl only"):
        st.TrainConfig(loss="cosent", cached_loss=True, mini_batch_size=2)
    p = tmp_path / "p.jsonl"
    p.write_text('{"query": "a", "positive": "b", "score": 1.5}\n{"query": "c", "positive": "d", "score": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl line 2: field 'score' is 'x', not a finite number"):
        PairFile(p, Fields(score="score"))
    p.write_text('{"query": "a", "positive": "b", "score": 1.5}\n{"query": "c", "positive": "d"}\n')
    with pytest.raises(ValueError, match="p.jsonl line 2 has no field 'score'"):
        PairFile(p, Fields(score="score"))
    p.write_text('{"query": "a", "positive": "b", "score": 1.5}\n')
    assert PairFile(p, Fields(score="score")).record(0) == ("a", "b", None, 1.5)
    with pytest.raises(ValueError, match="--loss cosent needs each pair's gold score"):
        check_loss_input(st.TrainConfig(loss="cosent"), Fields(), PairFile(p))
    with pytest.raises(ValueError, match="--score-field score is for --loss cosent"):
        check_loss_input(st.TrainConfig(), Fields(score="score"), PairFile(p, Fields(score="score")))


@pytest.mark.slow
def test_sts_files_to_jsonl_train_cosent(tiny_folder, tmp_path):
    """evaluate sts-to-jsonl writes scored pairs that train --loss cosent reads; the loss falls."""
    from embeddinggemma_jax.cli import main

    rows = [f'"s{i} alpha beta",s{i} gamma,{(i * 7) % 51 / 10}' for i in range(12)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "stsb-aa-train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "d" / "stsb-bb-train.csv").write_text("\n".join(rows[:4]) + "\n")
    out = tmp_path / "train.jsonl"
    assert main(["evaluate", "sts-to-jsonl", "--data", str(tmp_path / "d"), "--split", "train", "--out", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 16 and recs[0] == {"query": "s0 alpha beta", "positive": "s0 gamma", "score": 0.0,
                                           "language": "aa"}
    assert main(["train", "--model", str(tiny_folder), "--train-file", str(out), "--output-dir", str(tmp_path / "r"),
                 "--loss", "cosent", "--score-field", "score", "--steps", "6", "--lr", "3e-3", "--dtype", "float32",
                 "--matryoshka-dims", "40,32", "--batch-size", "8", "--max-length", "32", "--pad-to-max-length",
                 "--no-progress", "--no-export"]) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 6 and all(np.isfinite(losses))


@pytest.mark.slow
def test_train_eval_sts_logs_each_evaluation_and_keeps_the_best(tiny_folder, tmp_path):
    """--eval-sts evaluates at step 0, every --eval-every and at the end (logged with the step, equal to
    evaluate sts on the exported parameters); --keep-best sts exports the best of them to OUTPUT/best."""
    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.cli import main
    from embeddinggemma_jax.eval import sts

    rows = [f'"s{i} alpha beta",s{i} gamma delta,{(i * 7) % 51 / 10}' for i in range(16)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "stsb-aa-train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "d" / "stsb-aa-dev.csv").write_text("\n".join(rows[::-1][:10]) + "\n")
    (tmp_path / "d" / "stsb-bb-dev.csv").write_text("\n".join(rows[:9]) + "\n")
    data = tmp_path / "train.jsonl"
    assert main(["evaluate", "sts-to-jsonl", "--data", str(tmp_path / "d"), "--languages", "aa", "--out",
                 str(data)]) == 0
    base = ["train", "--model", str(tiny_folder), "--train-file", str(data), "--loss", "cosent", "--score-field",
            "score", "--steps", "4", "--lr", "3e-3", "--dtype", "float32", "--matryoshka-dims", "40,32",
            "--batch-size", "8", "--max-length", "32", "--pad-to-max-length", "--no-progress",
            "--query-prompt", "", "--document-prompt", "", "--eval-sts", str(tmp_path / "d"),
            "--eval-sts-prompt", "", "--eval-every", "2"]
    with pytest.raises(ValueError, match="--keep-best sts:zz: language 'zz' is not evaluated"):
        from embeddinggemma_jax.train.cli import run_config
        from embeddinggemma_jax.train.run import Run

        Run(run_config(__import__("embeddinggemma_jax.cli", fromlist=["x"]).build_parser().parse_args(
            base + ["--output-dir", str(tmp_path / "x"), "--keep-best", "sts:zz"])))
    assert main(base + ["--output-dir", str(tmp_path / "r"), "--keep-best", "sts"]) == 0
    evals = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_sts" in e]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(set(e["eval_sts"]) == {"mean", "mean_by_dimension", "aa", "bb"} for e in evals)
    best = json.loads((tmp_path / "r" / "best.json").read_text())
    means = [e["eval_sts"]["mean"] for e in evals]
    assert best["metric"] == "sts" and best["value"] == max(means) and best["step"] == evals[means.index(max(means))][
        "step"]
    # the logged numbers are evaluate sts's on the exported parameters (same prompt, same truncation)
    for folder, step in ((tmp_path / "r" / "final", 4), (tmp_path / "r" / "best", best["step"])):
        model = EmbeddingGemma.from_pretrained(folder)
        res = sts.run_sts(sts.model_embedder(model, None), tmp_path / "d", "dev", "all", (40, 32))
        logged = next(e for e in evals if e["step"] == step)["eval_sts"]
        assert res["mean"] == pytest.approx(logged["mean"], abs=0.05)
