"""Fine-tuning: loss and gradients equal sentence-transformers' MatryoshkaLoss(MNRL) under PyTorch
autograd; kill-and-resume equals an uninterrupted run; the FSDP-sharded step on 8 devices equals
the 1-device step; the data stream, metrics, CLI and export behave."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from embeddinggemma_jax.tokenize import TextTokenizer
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.data import BatchEncoder, Fields, PairFile, PairStream, Position, TextBatch
from embeddinggemma_jax.train.eval import gold_ranks, metrics_from_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY_DIMS = (40, 32, 16, 8)  # HeadConfig.tiny's output size is 40


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Runs in this module compile the same step several times: share compilations on disk."""
    old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                           "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def _tokenizer(folder):
    from embeddinggemma_jax.weights import read_folder_configs

    enc, head = read_folder_configs(folder)
    return TextTokenizer(folder / "tokenizer.json", head.max_seq_length, enc.pad_token_id, enc.eos_token_id), head


def _write_pairs(path: Path, n: int, seed: int = 0, negatives: bool = False, fields=("query", "positive", "negative")):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            w = [words[j] for j in rng.choice(len(words), 3, replace=False)]
            rec = {fields[0]: " ".join(w), fields[1]: f"doc {i}: " + " ".join(reversed(w))}
            if negatives:
                rec[fields[2]] = f"unrelated {i} " + words[i % len(words)]
            f.write(json.dumps(rec) + "\n")
    return path


# ----------------------------------------------------------------------------- parity with PyTorch
# Queries and documents longer than the tiny window (8), of different lengths (padding matters).
PARITY_BATCH = TextBatch(
    ["a b c", "hello", "x y z w", "why is the sky blue?"],
    ["doc a", "doc hello there", "xyz", "rayleigh scattering of sunlight by the molecules of the air"],
    ["nope", "no", "n", "the ocean is blue because it reflects the sky"])
PARITY_WEIGHTS = (1.0, 0.5, 0.25, 2.0)


def _torch_loss_and_grads(tiny_folder, b, make_loss):
    """sentence-transformers' loss (``make_loss(model)``) and every parameter's gradient under PyTorch
    autograd, on the token batch ``b`` (query, positive and negative columns)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from embeddinggemma_jax.weights import DENSE1_FILE, DENSE2_FILE, ENCODER_FILE

    model = SentenceTransformer(str(tiny_folder), device="cpu")
    B = b.query_ids.shape[1]

    def features(ids, mask):
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}

    cols = [features(b.query_ids[0], b.query_mask[0]), features(b.doc_ids[0, :B], b.doc_mask[0, :B]),
            features(b.doc_ids[0, B:], b.doc_mask[0, B:])]
    torch_loss = make_loss(model)(cols, None)
    torch_loss.backward()
    grads = {}
    for file, mod in ((ENCODER_FILE, model[0].auto_model), (DENSE1_FILE, model[2]), (DENSE2_FILE, model[3])):
        for name, p in mod.named_parameters():
            grads[(file, name)] = p.grad.numpy()
    return torch_loss.item(), grads


def _assert_grads_equal(enc, grads, torch_grads):
    from embeddinggemma_jax.weights import PARAM_TABLE

    compared = 0
    for spec in PARAM_TABLE:
        g = np.asarray(_get(grads, spec.path))
        for i, key in enumerate(spec.hf_keys(enc.num_layers)):
            mine = spec.transform.to_hf(g[i] if spec.per_layer else g, enc)
            ref = torch_grads[(spec.file, key)]
            assert np.abs(ref).max() > 0, key
            # rtol 1e-4 elementwise; entries far below the tensor's scale compare at 1e-4 of that scale
            np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=key)
            compared += 1
    assert compared == len(torch_grads)  # every torch parameter had a JAX gradient compared with it


def _jax_loss_and_grads(tiny_folder, **cfg_kw):
    from embeddinggemma_jax.train.run import load_base

    cfg = st.TrainConfig(matryoshka_dims=TINY_DIMS, matryoshka_weights=PARITY_WEIGHTS, dtype="float32", remat=True,
                         **cfg_kw)
    base, module = load_base(str(tiny_folder), cfg)
    t, params = st.make_trainable(module, cfg)
    tok, head = _tokenizer(tiny_folder)
    b = BatchEncoder(tok, head.prompts, 128, (32, 64, 128)).encode([PARITY_BATCH])
    loss, grads = st.loss_and_grads(t, cfg, params, b, TINY_DIMS, PARITY_WEIGHTS)
    return base.encoder_config, b, loss, grads


def test_loss_and_every_gradient_equal_sentence_transformers(tiny_folder):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    enc, b, loss, grads = _jax_loss_and_grads(tiny_folder)
    torch_loss, torch_grads = _torch_loss_and_grads(tiny_folder, b, lambda m: MatryoshkaLoss(
        m, MultipleNegativesRankingLoss(m), list(TINY_DIMS), list(PARITY_WEIGHTS)))
    np.testing.assert_allclose(float(loss), torch_loss, rtol=1e-4)
    _assert_grads_equal(enc, grads, torch_grads)


def test_cached_loss_equals_uncached_and_sentence_transformers_cached_mnrl(tiny_folder):
    """GradCache with mini-batches of 2 (of 4 queries, 8 documents): the same loss and gradients as the
    uncached loss over the whole batch (fp32, rtol 1e-5), and as sentence-transformers'
    CachedMultipleNegativesRankingLoss inside MatryoshkaLoss with the same mini-batch size."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss, MatryoshkaLoss

    enc, b, loss, grads = _jax_loss_and_grads(tiny_folder, cached_loss=True, mini_batch_size=2)
    _, _, plain_loss, plain_grads = _jax_loss_and_grads(tiny_folder)
    np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(plain_grads):
        mine = np.asarray(_get(grads, [p.key for p in path]))
        g = np.asarray(g)
        assert np.abs(g).max() > 0, path
        # rtol 1e-5 elementwise; entries far below the tensor's scale compare at 1e-5 of that scale
        np.testing.assert_allclose(mine, g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=str(path))
    torch_loss, torch_grads = _torch_loss_and_grads(tiny_folder, b, lambda m: MatryoshkaLoss(
        m, CachedMultipleNegativesRankingLoss(m, mini_batch_size=2), list(TINY_DIMS), list(PARITY_WEIGHTS)))
    np.testing.assert_allclose(float(loss), torch_loss, rtol=1e-4)
    _assert_grads_equal(enc, grads, torch_grads)


def test_cached_loss_settings_are_checked():
    with pytest.raises(ValueError, match="--cached-loss needs --mini-batch-size"):
        st.TrainConfig(cached_loss=True)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_matryoshka_dims_are_checked():
    from embeddinggemma_jax.train.losses import check_matryoshka

    assert check_matryoshka((16, 40), (2.0, 1.0), 40) == ((40, 16), (1.0, 2.0))  # sorted, weights follow
    with pytest.raises(ValueError, match="outside 1..40"):
        check_matryoshka((768, 128), None, 40)
    with pytest.raises(ValueError, match="one weight per dimension"):
        check_matryoshka((40, 16), (1.0,), 40)


# ----------------------------------------------------------------------------- data
def test_stream_is_seeded_resumable_and_covers_each_epoch(tmp_path):
    pairs = PairFile(_write_pairs(tmp_path / "p.jsonl", 10))
    s = PairStream(pairs, 3, seed=7)
    first = [s.next_batch().queries for _ in range(3)]  # 9 of 10 records; the leftover one is dropped
    assert len({q for b in first for q in b}) == 9
    pos = Position.from_dict(s.position.to_dict())
    later = [s.next_batch().queries for _ in range(3)]  # all of epoch 1
    assert s.position.epoch == 1
    resumed = PairStream(pairs, 3, seed=7, position=pos)
    assert [resumed.next_batch().queries for _ in range(3)] == later
    again = PairStream(pairs, 3, seed=7)
    assert [again.next_batch().queries for _ in range(3)] == first
    other = PairStream(pairs, 3, seed=8)
    assert [other.next_batch().queries for _ in range(3)] != first


def test_train_file_glob_reads_every_file_in_order_and_hosts_read_their_rows(tmp_path):
    (tmp_path / "d").mkdir()
    a = _write_pairs(tmp_path / "d" / "part-0.jsonl", 5, seed=1)
    b = _write_pairs(tmp_path / "d" / "part-1.jsonl", 4, seed=2)
    pairs = PairFile(str(tmp_path / "d" / "part-*.jsonl"))
    assert pairs.paths == [str(a), str(b)] and len(pairs) == 9
    want = PairFile(a).all_records() + PairFile(b).all_records()
    assert pairs.all_records() == want
    # Two hosts reading rows 0..2 and 2..4 of each batch of 4 see exactly the one-host batches, split.
    whole = PairStream(pairs, 4, seed=3)
    halves = [PairStream(pairs, 4, seed=3), PairStream(pairs, 4, seed=3)]
    for _ in range(3):  # crosses the epoch boundary (9 records: 2 batches per epoch)
        full = whole.next_batch().queries
        assert halves[0].next_batch((0, 2)).queries + halves[1].next_batch((2, 4)).queries == full
    assert halves[0].position == halves[1].position == whole.position
    (tmp_path / "d" / "part-2.jsonl").write_text('{"query": "a"}\n')
    with pytest.raises(ValueError, match="part-2.jsonl line 1 has no field 'positive'"):
        PairFile(str(tmp_path / "d" / "part-*.jsonl"))
    with pytest.raises(FileNotFoundError, match="match nothing"):
        PairFile(str(tmp_path / "nothing-*.jsonl"))


def test_custom_fields_negatives_and_clear_errors(tmp_path):
    p = _write_pairs(tmp_path / "p.jsonl", 4, negatives=True, fields=("q", "d", "hard"))
    recs = PairFile(p, Fields("q", "d", "hard")).all_records()
    assert all(r[2] is not None for r in recs)
    assert all(r[2] is None for r in PairFile(p, Fields("q", "d", None)).all_records())
    # Every record is validated when the file is indexed, before any step: errors name the file and the line.
    with pytest.raises(ValueError, match="p.jsonl line 1 has no field 'query'"):
        PairFile(p)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n\nnot json\n')  # a blank line: line numbers, not records
    with pytest.raises(ValueError, match="bad.jsonl line 3 is not valid JSON"):
        PairFile(bad)
    missing = tmp_path / "missing-positive.jsonl"
    missing.write_text('{"query": "a", "positive": "b"}\n' * 5 + '{"query": "a"}\n')
    with pytest.raises(ValueError, match="line 6 has no field 'positive'"):
        PairFile(missing)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"query": "a", "positive": "b", "negative": "c"}\n{"query": "d", "positive": "e"}\n')
    with pytest.raises(ValueError, match="line 1 has a 'negative' field and line 2 does not"):
        PairFile(mixed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PairFile(tmp_path / "missing.jsonl")


def test_prompts_are_applied_as_at_inference(tiny_folder):
    from embeddinggemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(tiny_folder)
    tok, head = _tokenizer(tiny_folder)
    enc = BatchEncoder(tok, head.prompts, 128, (128,))
    b = enc.encode([TextBatch(["what is x?", "y"], ["x is a letter", "y too"], ["z", "w"])])
    want_q = model.tokenizer.encode(model.apply_prompt(["what is x?", "y"], "query", None))
    want_d = model.tokenizer.encode(model.apply_prompt(["x is a letter", "y too", "z", "w"], "document", None))
    for ids, mask, want in ((b.query_ids[0], b.query_mask[0], want_q), (b.doc_ids[0], b.doc_mask[0], want_d)):
        assert [list(r[m.astype(bool)]) for r, m in zip(ids, mask)] == want
    with pytest.raises(ValueError, match="unknown --query-prompt 'nope'; valid names: document, query"):
        BatchEncoder(tok, head.prompts, 128, (128,), query_prompt="nope")


# ----------------------------------------------------------------------------- metrics
def test_retrieval_metrics_by_hand():
    q = np.eye(3, dtype=np.float32)
    docs = np.asarray([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 0.5, 0]], np.float32)
    ranks = gold_ranks(q, docs, np.asarray([0, 3, 2]))
    assert ranks.tolist() == [1, 1, 1]  # each gold document scores highest
    # q0 ranks d1 (0.9) second; q1's gold d0 (0.0) ties d2 and is below d1, d3; q2's gold d3 (0.0) ties d0, d1
    ranks = gold_ranks(q, docs, np.asarray([1, 0, 3]))
    assert ranks.tolist() == [2, 4, 4]  # ties count against the gold document
    m = metrics_from_ranks(np.asarray([1, 2, 11, 10]))
    assert m["recall@1"] == 0.25 and m["recall@10"] == 0.75
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0.1) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 4)


# ----------------------------------------------------------------------------- resume, CLI, export
@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tiny_folder, tmp_path, compile_cache):
    from embeddinggemma_jax.cli import main
    from embeddinggemma_jax.train.run import Run, RunConfig

    train = _write_pairs(tmp_path / "train.jsonl", 30, seed=1)
    evals = _write_pairs(tmp_path / "eval.jsonl", 12, seed=2)
    tc = st.TrainConfig(matryoshka_dims=(40, 16), total_steps=4, warmup_steps=1, dtype="float32",
                        learning_rate=1e-3, grad_accum=2)

    def rc(out, **kw):
        return RunConfig(model=str(tiny_folder), train_file=str(train), output_dir=str(out), train=tc, batch_size=4,
                         max_length=64, pad_to_max_length=True, save_every=2, keep=2, eval_file=str(evals),
                         progress=False, **kw)

    run = Run(rc(tmp_path / "a"))
    summary = run.fit(say=lambda s: None)
    uninterrupted = run.state
    run.close()
    assert set(summary["eval_before"]) == set(summary["eval_after"]) == {40, 16}

    # "Killed" after step 3 (checkpoint at 2), then resumed by a new process-equivalent through the CLI.
    run = Run(rc(tmp_path / "b", stop_after=3))
    run.fit(say=lambda s: None)
    assert run.step == 3
    run.close()
    argv = ["train", "--model", str(tiny_folder), "--train-file", str(train), "--eval-file", str(evals),
            "--output-dir", str(tmp_path / "b"), "--steps", "4", "--warmup-steps", "1", "--dtype", "float32",
            "--lr", "1e-3", "--grad-accum", "2", "--matryoshka-dims", "40,16", "--batch-size", "4",
            "--max-length", "64", "--pad-to-max-length", "--save-every", "2", "--keep", "2", "--no-progress"]
    assert main(argv) == 0
    resumed = Run(rc(tmp_path / "b"))
    assert resumed.resume() and resumed.step == 4
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 8 micro-batches of 4 pairs: 7 use 28 of epoch 0's 30 records, the 8th starts epoch 1
    assert resumed.position.to_dict() == {"epoch": 1, "index": 4}
    resumed.close()
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]

    # The exported folder loads in sentence-transformers and embeds like the trained parameters.
    from sentence_transformers import SentenceTransformer

    from embeddinggemma_jax import EmbeddingGemma

    ours = EmbeddingGemma.from_pretrained(tmp_path / "b" / "final")
    ref = SentenceTransformer(str(tmp_path / "b" / "final"), device="cpu")
    texts = ["alpha beta gamma", "a longer text than the window of eight tokens"]
    np.testing.assert_allclose(ours.encode(texts), ref.encode(texts), rtol=1e-4, atol=1e-5)
    trained = np.asarray(resumed._forward(resumed.state["params"], *[np.asarray(x) for x in _ids(ours, texts)]))
    np.testing.assert_allclose(ours.encode(texts, normalize=False), trained, rtol=1e-5, atol=1e-6)
    # ... and an earlier checkpoint exports too, with different parameters.
    assert main(["train-export", str(tmp_path / "b"), str(tmp_path / "step2"), "--step", "2"]) == 0
    early = EmbeddingGemma.from_pretrained(tmp_path / "step2").encode(texts)
    assert not np.allclose(early, ours.encode(texts), atol=1e-4)
    metrics = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]


def _ids(model, texts):
    ids = model.tokenizer.encode(texts)
    L = max(map(len, ids))
    out = np.zeros((len(ids), L), np.int32)
    mask = np.zeros_like(out)
    for i, x in enumerate(ids):
        out[i, :len(x)], mask[i, :len(x)] = x, 1
    return out, mask


def test_resume_refuses_changed_settings(tiny_folder, tmp_path, compile_cache):
    from embeddinggemma_jax.train.checkpointing import TrainCheckpoints
    from embeddinggemma_jax.train.run import Run, RunConfig

    train = _write_pairs(tmp_path / "train.jsonl", 8)
    ck = TrainCheckpoints(tmp_path / "run" / "checkpoints")
    ck.save(1, {"x": np.zeros(2)}, {"train_config": st.TrainConfig(learning_rate=1.0).to_dict(),
                                    "batch_size": 4, "max_length": 64, "pad_to_max_length": True, "position": {}})
    ck.close()
    run = Run(RunConfig(model=str(tiny_folder), train_file=str(train), output_dir=str(tmp_path / "run"),
                        train=st.TrainConfig(matryoshka_dims=(40,)), batch_size=4, max_length=64,
                        pad_to_max_length=True, progress=False))
    with pytest.raises(ValueError, match="was written with other settings") as e:
        run.resume()
    run.close()
    msg = str(e.value)
    # Only what differs, by flag name, with both values: not both whole configurations.
    assert "lr: 1.0 -> 2e-05" in msg and "matryoshka_dims: [768, 512, 256, 128] -> [40]" in msg, msg
    assert "weight_decay" not in msg and "batch_size" not in msg and len(msg) < 400, msg


# ----------------------------------------------------------------------------- sharding
@pytest.mark.slow
def test_fsdp_step_on_8_devices_matches_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "train_sharded_check.py"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    single, fsdp = out["single"], out["fsdp"]
    # Parameters and their Adam moments really are split over the fsdp axis (sizes chosen divisible by 4).
    assert all("fsdp" in v for v in fsdp["specs"].values()), fsdp["specs"]
    assert not any("fsdp" in v for v in single["specs"].values())
    # Step 2's loss depends on step 1's update: equal losses mean equal steps.
    np.testing.assert_allclose(fsdp["losses"], single["losses"], rtol=1e-5)
    lr = 1e-3  # Adam moves a parameter by at most ~lr per step; the sharded update agrees to 5% of that
    worst = max(float(np.abs(np.asarray(fsdp["params"][k]) - np.asarray(v)).max()) for k, v in single["params"].items())
    print(f"fsdp vs single-device parameters after 2 steps: max abs diff {worst:.2e} (lr {lr})")
    for k, v in single["params"].items():
        np.testing.assert_allclose(np.asarray(fsdp["params"][k]), np.asarray(v), rtol=0, atol=0.05 * lr, err_msg=k)


@pytest.mark.slow
def test_global_batch_loss_on_8_devices_equals_one_device(tmp_path):
    """The contrastive batch is the global batch: 16 queries against all 32 documents, sharded over 8
    devices (2 rows each), give the loss and gradients of the same batch on one device; so does the
    cached loss with one row per device per mini-batch (a per-device loss would differ: 2 negatives)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "train_global_batch_check.py"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    single = out["single"]
    assert single["devices"] == 1 and out["data8"]["devices"] == 8
    for name in ("data8", "data8_cached"):
        np.testing.assert_allclose(out[name]["loss"], single["loss"], rtol=1e-5, err_msg=name)
        for k, g in single["grads"].items():
            g, mine = np.asarray(g), np.asarray(out[name]["grads"][k])
            assert np.abs(g).max() > 0, k
            np.testing.assert_allclose(mine, g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=f"{name} {k}")


def test_tpu_training_configs_parse(tmp_path):
    from embeddinggemma_jax.cli import build_parser
    from embeddinggemma_jax.train.cli import run_config

    configs = sorted((ROOT / "tpu" / "train").glob("v5litepod-*.json"))  # base.json holds their shared keys
    assert configs
    from embeddinggemma_jax.options import resolve_config

    shared = {k: v for k, v in resolve_config(ROOT / "tpu" / "train" / "base.json").items() if not k.startswith("_")}
    for path in configs:
        own = json.loads(path.read_text())
        assert own["base"] == "base.json" and not set(own) & set(shared), path  # each shared key said once
        assert shared.items() <= resolve_config(path).items(), path
        args = build_parser().parse_args(["train", "--config", str(path), "--train-file", "t.jsonl",
                                          "--output-dir", str(tmp_path), "--steps", "307"])
        rc = run_config(args)
        assert rc.train.total_steps == 307  # the command line wins over the file
        assert rc.train.dtype == "bfloat16" and rc.pad_to_max_length
        d = rc.train.mesh_shape
        assert d is None or rc.batch_size % (d[0] * d[1]) == 0
        if rc.train.cached_loss:  # mini-batches divide the batch and split evenly over the chips
            M = rc.train.mini_batch_size
            assert rc.batch_size % M == 0 and M % (d[0] * d[1] if d else 1) == 0, path
        assert rc.distributed.multihost == (d is not None and d[0] * d[1] > 8), path  # > 8 chips: several hosts
    bad = tmp_path / "bad.json"
    bad.write_text('{"batchsize": 3}')
    args = build_parser().parse_args(["train", "--config", str(bad)])
    with pytest.raises(ValueError, match="unknown keys"):
        run_config(args)


def test_url_folder_is_refused_by_train_export_in_one_line(tmp_path):
    """``Path("gs://b/run")`` is the local folder ``gs:/b/run``: train-export, which writes through the local
    filesystem, refuses a URL before anything is read or written (``train --output-dir gs://`` works:
    tests/test_gcs.py)."""
    from embeddinggemma_jax.errors import InputError
    from embeddinggemma_jax.train.run import export_checkpoint

    for run_dir, out_dir in (("gs://bucket/run", tmp_path / "final"), (tmp_path, "s3://bucket/final")):
        with pytest.raises(InputError, match="://"):
            export_checkpoint(run_dir, out_dir)
    assert list(tmp_path.iterdir()) == []  # no local gs: or s3: folder


def _small_run(tiny_folder, train, out, **kw):
    from embeddinggemma_jax.train.run import RunConfig

    tc = st.TrainConfig(matryoshka_dims=(40, 16), total_steps=kw.pop("steps", 4), warmup_steps=1, dtype="float32",
                        learning_rate=1e-3)
    return RunConfig(model=str(tiny_folder), train_file=str(train), output_dir=str(out), train=tc, batch_size=4,
                     max_length=64, pad_to_max_length=True, save_every=2, progress=False, export=False, **kw)


def test_resume_refuses_changed_data_model_prompts_and_fields(tiny_folder, tmp_path, compile_cache):
    """Issue 26 #4: a run with a checkpoint, resumed with another pair file, the same file rewritten, another
    base model, another prompt or other field names: refused before any step, naming what changed."""
    from embeddinggemma_jax.testing import make_tiny_folder
    from embeddinggemma_jax.train.data import Fields
    from embeddinggemma_jax.train.run import Run

    train = _write_pairs(tmp_path / "train.jsonl", 12, seed=1)
    recs = [json.loads(x) for x in train.read_text().splitlines()]
    train.write_text("".join(json.dumps(dict(r, q=r["query"])) + "\n" for r in recs))  # a second query field
    out = tmp_path / "run"
    run = Run(_small_run(tiny_folder, train, out, stop_after=2))
    run.fit(say=lambda s: None)
    run.close()
    other = _write_pairs(tmp_path / "other.jsonl", 12, seed=2)
    other_model = make_tiny_folder(tmp_path / "tiny2", seed=1)
    changes = [
        (dict(train_file=other), "train_files"),
        (dict(query_prompt=""), "query_prompt"),
        (dict(fields=Fields(query="q")), "fields"),
        (dict(model=str(other_model)), "model"),
    ]
    for change, name in changes:
        rc = dataclasses.replace(_small_run(tiny_folder, train, out), **{k: str(v) if isinstance(v, Path) else v
                                                                        for k, v in change.items()})
        run = Run(rc)
        with pytest.raises(ValueError, match=rf"was written with other settings \(.*\b{name}: "):
            run.fit(say=lambda s: None)
        assert run.step == 0
        run.close()
    train.write_text("".join(json.dumps(dict(r, q=r["query"], positive=r["positive"] + "!")) + "\n" for r in recs))
    run = Run(_small_run(tiny_folder, train, out))
    with pytest.raises(ValueError, match=r"train_sha256: .*the pair files' content changed since"):
        run.fit(say=lambda s: None)
    run.close()


def test_resume_keeps_a_users_metrics_lines_and_refuses_a_foreign_final_before_training(tiny_folder, tmp_path,
                                                                                          compile_cache):
    """Issue 26 #4: a resume drops only the lines the run wrote after its checkpoint, never a user's own
    lines already in metrics.jsonl; an existing final/ that this package did not write is refused before
    the first step, not after the last."""
    from embeddinggemma_jax.train.run import Run

    train = _write_pairs(tmp_path / "train.jsonl", 12, seed=1)
    out = tmp_path / "run"
    out.mkdir()
    mine = ['{"step": 100, "note": "my own line"}', '{"step": 3, "note": "mine too"}', "not json at all"]
    (out / "metrics.jsonl").write_text("".join(x + "\n" for x in mine))
    run = Run(_small_run(tiny_folder, train, out, stop_after=3))  # checkpoint at 2, step 3 logged after it
    run.fit(say=lambda s: None)
    run.close()
    run = Run(_small_run(tiny_folder, train, out))
    run.fit(say=lambda s: None)
    run.close()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[:3] == mine
    assert [json.loads(x)["step"] for x in lines[3:]] == [1, 2, 3, 4]

    (out / "final").mkdir()
    (out / "final" / "notes.txt").write_text("not a model")
    fresh = tmp_path / "fresh"
    run = Run(dataclasses.replace(_small_run(tiny_folder, train, out), output_dir=str(fresh), export=True))
    (fresh / "final").mkdir(parents=True)
    (fresh / "final" / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="final exists and is not a model folder written by embeddinggemma-jax"):
        run.fit(say=lambda s: None)
    ck = fresh / "checkpoints"
    assert run.step == 0 and not (ck.exists() and any(p.name.isdigit() for p in ck.iterdir()))
    run.close()

    # --keep-best: a best.json that is not this run's record is refused before step 1, never replaced
    other = tmp_path / "other"
    run = Run(dataclasses.replace(_small_run(tiny_folder, train, out), output_dir=str(other), eval_file=str(train),
                                  keep_best="mrr@10"))
    other.mkdir(exist_ok=True)
    (other / "best.json").write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="best.json exists and is not the --keep-best record of this run"):
        run.fit(say=lambda s: None)
    assert (other / "best.json").read_text() == '{"my": "notes"}' and run.step == 0
    run.close()


def test_max_length_at_or_below_the_prompt_is_refused(tiny_folder):
    """Issue 26 #7: a --max-length that leaves no token after the prompt trained on the prompt alone."""
    from embeddinggemma_jax.train.data import BatchEncoder

    tok, head = _tokenizer(tiny_folder)
    n = len(tok.encode([head.prompts["query"]])[0])
    with pytest.raises(ValueError, match=rf"--max-length {n} leaves no token for the text: the query prompt "
                                         rf"'query' .* is {n} tokens"):
        BatchEncoder(tok, head.prompts, n, (n,))
    BatchEncoder(tok, head.prompts, n + 1, (n + 1,), document_prompt="")


@pytest.mark.real
def test_max_length_refusal_names_the_real_prompt_lengths(real_folder):
    """The real prompts are 10 (query) and 9 (document) tokens with <bos> and <eos>."""
    from embeddinggemma_jax.train.data import BatchEncoder

    tok, head = _tokenizer(real_folder)
    with pytest.raises(ValueError, match="the query prompt 'query' .* is 10 tokens"):
        BatchEncoder(tok, head.prompts, 10, (10,))
    with pytest.raises(ValueError, match="the document prompt 'document' .* is 9 tokens"):
        BatchEncoder(tok, head.prompts, 9, (9,), query_prompt="")
    BatchEncoder(tok, head.prompts, 11, (11,))


def test_pair_file_checks_surrogates_folders_and_reads_parquet(tmp_path):
    """Issue 26 #6 (train): a lone surrogate is found when the file is validated, naming file and line; a
    folder is "a folder", not "does not exist"; a parquet pair file gives the same records as the JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embeddinggemma_jax.train.data import PairFile

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a\\ud800b", "positive": "c"}\n')
    with pytest.raises(ValueError, match=rf"{bad} line 2: field 'query' holds a lone surrogate"):
        PairFile(bad)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        PairFile(tmp_path)
    j = _write_pairs(tmp_path / "p.jsonl", 9, negatives=True)
    recs = [json.loads(x) for x in j.read_text().splitlines()]
    q = tmp_path / "p.parquet"
    pq.write_table(pa.table({k: [r[k] for r in recs] for k in ("query", "positive", "negative")}), q,
                   row_group_size=4)
    a, b = PairFile(j), PairFile(q)
    assert b.all_records() == a.all_records() and len(b) == 9
    assert [r[2] for r in PairFile(q, Fields(negative="")).all_records()] == [None] * 9


# ----------------------------------------------------------------------------- multi-host
def _train_cmd(tiny_folder, train, out, *extra):
    return [sys.executable, "-m", "embeddinggemma_jax.cli", "train", "--model", str(tiny_folder), "--train-file",
            str(train), "--output-dir", str(out), "--steps", "4", "--dtype", "float32", "--lr", "1e-3",
            "--matryoshka-dims", "40,16", "--batch-size", "8", "--max-length", "64", "--save-every", "2",
            "--no-progress", "--no-export", "--adam-eps", "1e-6", *map(str, extra)]


def _env(devices: int, cache: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _two_processes(cmd, cache, until=None):
    """Run ``cmd`` as processes 0 and 1 of a gloo job (one CPU device each); with ``until`` (a path),
    kill -9 both as soon as it exists. Returns the processes' stderr."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                                     str(i)], env=_env(1, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        if until is not None:
            deadline = time.time() + 600
            while not until.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
                time.sleep(0.05)
            assert until.exists(), procs[0].communicate()[1][-3000:]
            for p in procs:
                p.kill()  # SIGKILL
            return [p.communicate()[1] for p in procs]
        errs = [p.communicate(timeout=600)[1] for p in procs]
        for p, e in zip(procs, errs):
            assert p.returncode == 0, e[-3000:]
        return errs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _losses(out: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


@pytest.mark.slow
def test_two_processes_equal_one_and_survive_kill_9_and_restore_on_another_mesh(tiny_folder, tmp_path):
    """Two gloo processes (one device each) train the global batch of the one-process run (two devices):
    same loss and gradient norm at every step; both killed with SIGKILL after their first checkpoint and
    rerun, they finish with each step logged once and the same numbers; a checkpoint the two processes
    wrote together resumes in one process on one device (another host count and mesh)."""
    cache = tmp_path / "cache"
    train = _write_pairs(tmp_path / "train.jsonl", 40, seed=4, negatives=True)
    one = tmp_path / "one"
    r = subprocess.run(_train_cmd(tiny_folder, train, one), env=_env(2, cache), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _losses(one)
    assert [s for s, _, _ in ref] == [1, 2, 3, 4]

    two = tmp_path / "two"
    _two_processes(_train_cmd(tiny_folder, train, two), cache, until=two / "checkpoints" / "2")
    # the killed run's folder, as the two processes left it, also resumes in one process (below)
    moved = tmp_path / "moved"
    shutil.copytree(two, moved)
    _two_processes(_train_cmd(tiny_folder, train, two), cache)
    got = _losses(two)
    assert [s for s, _, _ in got] == [1, 2, 3, 4]  # each step once, though steps after 2 may have run twice
    np.testing.assert_allclose(np.asarray(got)[:, 1:], np.asarray(ref)[:, 1:], rtol=1e-5)

    assert (moved / "checkpoints" / "2").is_dir()
    r = subprocess.run(_train_cmd(tiny_folder, train, moved), env=_env(1, cache), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(moved)
    assert [s for s, _, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.asarray(got)[:, 1:], np.asarray(ref)[:, 1:], rtol=1e-5)
