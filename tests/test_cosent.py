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


def _torch_cosent(folder, b, dims, weights):
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
    loss = MatryoshkaLoss(model, CoSENTLoss(model), list(dims), list(weights))(cols, torch.tensor(b.scores[0]))
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
