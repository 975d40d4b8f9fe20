"""sentence-transformers safetensors <-> parameter tree: one declarative table, named transforms.

Every parameter of ``EmbeddingGemmaModule`` appears once in ``PARAM_TABLE`` with
- its path in the NNX state, its safetensors file and key (``{i}`` = layer index),
- a named transform that runs both ways (torch Linear is [out, in]; we keep [in, out] and split
  the head axis out of q/k/v/o so einsums can name it).
The loader, the Orbax converter and the exporter all go through this table. (Logical sharding
axes live on the parameters themselves, as NNX metadata: see ``layers.param``.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.errors import ConfigError, FileFormatError, WeightsError
from embeddinggemma_jax.io_utils import read_json
from embeddinggemma_jax.safetensors_io import NAMES, SafeTensorsFile

ENCODER_FILE = "model.safetensors"
DENSE1_FILE = "2_Dense/model.safetensors"
DENSE2_FILE = "3_Dense/model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Stored dtypes a parameter may have (cast to the parameter dtype on load); integer tensors are refused.
FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64))


@dataclass(frozen=True)
class Transform:
    """``to_jax(hf_array, cfg)`` and its inverse ``to_hf(jax_array, cfg)``."""

    name: str
    to_jax: Callable[[np.ndarray, EncoderConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, EncoderConfig], np.ndarray]


IDENTITY = Transform("identity", lambda x, c: x, lambda x, c: x)
TRANSPOSE = Transform("transpose", lambda x, c: x.T, lambda x, c: x.T)
# [n*H, D] -> [D, n, H]: the input projections, heads split out.
Q_HEADS = Transform("split_q_heads", lambda x, c: x.T.reshape(x.shape[1], c.num_heads, c.head_dim),
                    lambda x, c: x.reshape(x.shape[0], -1).T)
KV_HEADS = Transform("split_kv_heads", lambda x, c: x.T.reshape(x.shape[1], c.num_kv_heads, c.head_dim),
                     lambda x, c: x.reshape(x.shape[0], -1).T)
# [D, N*H] -> [N, H, D]: the output projection.
O_HEADS = Transform("split_o_heads", lambda x, c: x.T.reshape(c.num_heads, c.head_dim, x.shape[0]),
                    lambda x, c: x.reshape(-1, x.shape[-1]).T)


@dataclass(frozen=True)
class ParamSpec:
    path: tuple[str, ...]  # NNX state path
    file: str  # safetensors file inside the folder
    key: str  # key in that file; "{i}" = layer index for per-layer parameters
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.key

    def hf_keys(self, num_layers: int) -> list[str]:
        return [self.key.format(i=i) for i in range(num_layers)] if self.per_layer else [self.key]


def _layer(path, key, transform):
    return ParamSpec(("encoder", "layers") + path, ENCODER_FILE, "layers.{i}." + key, transform)


PARAM_TABLE: tuple[ParamSpec, ...] = (
    ParamSpec(("encoder", "embed_tokens"), ENCODER_FILE, "embed_tokens.weight", IDENTITY),
    _layer(("input_layernorm", "scale"), "input_layernorm.weight", IDENTITY),
    _layer(("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", IDENTITY),
    _layer(("pre_feedforward_layernorm", "scale"), "pre_feedforward_layernorm.weight", IDENTITY),
    _layer(("post_feedforward_layernorm", "scale"), "post_feedforward_layernorm.weight", IDENTITY),
    _layer(("self_attn", "q_proj"), "self_attn.q_proj.weight", Q_HEADS),
    _layer(("self_attn", "k_proj"), "self_attn.k_proj.weight", KV_HEADS),
    _layer(("self_attn", "v_proj"), "self_attn.v_proj.weight", KV_HEADS),
    _layer(("self_attn", "o_proj"), "self_attn.o_proj.weight", O_HEADS),
    _layer(("self_attn", "q_norm", "scale"), "self_attn.q_norm.weight", IDENTITY),
    _layer(("self_attn", "k_norm", "scale"), "self_attn.k_norm.weight", IDENTITY),
    _layer(("mlp", "gate_proj"), "mlp.gate_proj.weight", TRANSPOSE),
    _layer(("mlp", "up_proj"), "mlp.up_proj.weight", TRANSPOSE),
    _layer(("mlp", "down_proj"), "mlp.down_proj.weight", TRANSPOSE),
    ParamSpec(("encoder", "norm", "scale"), ENCODER_FILE, "norm.weight", IDENTITY),
    ParamSpec(("head", "dense1"), DENSE1_FILE, "linear.weight", TRANSPOSE),
    ParamSpec(("head", "dense2"), DENSE2_FILE, "linear.weight", TRANSPOSE),
)
ORDER = sorted(PARAM_TABLE, key=lambda s: s.path != ("encoder", "embed_tokens"))  # largest first: lowest peak


def iter_params(state: nnx.State) -> Iterator[tuple[tuple[str, ...], nnx.Variable]]:
    for path, var in nnx.to_flat_state(state):
        yield tuple(str(p) for p in path), var


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(np.dtype(dtype) if not isinstance(dtype, str) else dtype) == "bfloat16" \
        else np.dtype(dtype)


class CheckpointReader:
    """The safetensors files of a sentence-transformers folder; refuses pickled checkpoints."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files: dict[str, SafeTensorsFile] = {}
        needed = sorted({s.file for s in PARAM_TABLE})
        for rel in needed:
            p = self.folder / rel
            if not p.is_file():
                pickled = [q.name for q in p.parent.glob("*") if q.suffix in PICKLED_SUFFIXES] if p.parent.is_dir() else []
                if pickled:
                    raise WeightsError(f"{p.parent} holds only a pickled checkpoint ({', '.join(pickled)}); pickles can run "
                                       "arbitrary code and are refused: convert it to safetensors first")
                raise WeightsError(f"{p} is missing; a sentence-transformers folder of EmbeddingGemma needs "
                                   f"{', '.join(needed)}")
            self.files[rel] = SafeTensorsFile(p)
        # Some exports prefix the encoder keys with "model." (transformers' Gemma3Model naming).
        enc = self.files[ENCODER_FILE]
        self.prefix = "model." if enc.keys() and all(k.startswith("model.") for k in enc.keys()) else ""

    def key(self, spec: ParamSpec, hf_key: str) -> str:
        return (self.prefix + hf_key) if spec.file == ENCODER_FILE else hf_key

    def check(self, expected: dict[tuple[str, ...], tuple[int, ...]], cfg: EncoderConfig) -> None:
        """Raise one error naming every missing, unexpected or mis-shaped tensor."""
        problems = []
        used: dict[str, set[str]] = {f: set() for f in self.files}
        for spec in PARAM_TABLE:
            f = self.files[spec.file]
            want = expected[spec.path]
            for i, hf_key in enumerate(spec.hf_keys(cfg.num_layers)):
                k = self.key(spec, hf_key)
                if k not in f:
                    problems.append(f"missing {spec.file}:{k}")
                    continue
                used[spec.file].add(k)
                if f.dtype(k) not in FLOAT_DTYPES:
                    problems.append(f"{spec.file}:{k} has dtype {NAMES[f.dtype(k)]}, not a float type the model can "
                                    "hold (F32, BF16, F16, F64)")
                    continue
                shape = f.shape(k)
                want_one = want[1:] if spec.per_layer else want
                got = _jax_shape(spec, shape, cfg)
                if got != tuple(want_one):
                    problems.append(f"{spec.file}:{k} has shape {list(shape)}, expected "
                                    f"{list(_hf_shape(spec, want_one, cfg))}")
        for rel, f in self.files.items():
            for k in sorted(set(f.keys()) - used[rel]):
                if not k.endswith("lm_head.weight"):  # a tied LM head is a copy of embed_tokens: harmless
                    problems.append(f"unexpected {rel}:{k}")
        if problems:
            shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
            raise WeightsError(f"checkpoint {self.folder} does not match the config ({len(problems)} problems): {shown}")

    def read(self, spec: ParamSpec, cfg: EncoderConfig, dtype) -> np.ndarray:
        """The parameter as a host array in ``dtype``, per-layer tensors stacked on axis 0."""
        f = self.files[spec.file]
        keys = spec.hf_keys(cfg.num_layers)
        out = None
        for i, hf_key in enumerate(keys):
            a = spec.transform.to_jax(f.get(self.key(spec, hf_key)), cfg)
            if not spec.per_layer:
                return np.asarray(a, dtype=_np_dtype(dtype))
            if out is None:
                out = np.empty((len(keys),) + a.shape, _np_dtype(dtype))
            out[i] = a
        return out


class _ShapeOnly:
    """Stands in for an array in shape checks, so large tensors are never read to check them."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    @property
    def T(self):
        return _ShapeOnly(self.shape[::-1])

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        total = int(np.prod(self.shape))
        known = int(np.prod([s for s in shape if s != -1]))
        if total % max(known, 1):
            raise ValueError("bad reshape")
        return _ShapeOnly(tuple(total // known if s == -1 else s for s in shape))


def _jax_shape(spec: ParamSpec, hf_shape, cfg: EncoderConfig) -> tuple[int, ...] | None:
    try:
        return spec.transform.to_jax(_ShapeOnly(hf_shape), cfg).shape
    except (ValueError, IndexError):
        return None


def _hf_shape(spec: ParamSpec, jax_shape, cfg):
    return spec.transform.to_hf(_ShapeOnly(jax_shape), cfg).shape


def load_state(folder: str | Path, abstract_state: nnx.State, cfg: EncoderConfig, param_dtype,
               shardings: dict[tuple[str, ...], jax.sharding.Sharding] | None = None,
               specs: Iterable[ParamSpec] = ORDER) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape``) from a sentence-transformers folder.

    Each parameter is read from the memory map, transformed, cast, and placed on its devices one at
    a time (the embedding table first), so the host never holds a second copy of the checkpoint.
    """
    reader = CheckpointReader(folder)
    flat = dict(iter_params(abstract_state))
    expected = {p: tuple(v.get_value().shape) for p, v in flat.items()}
    missing = sorted(set(expected) - {s.path for s in PARAM_TABLE})
    if missing:
        raise WeightsError(f"model parameters without a table entry: {missing}")
    reader.check(expected, cfg)
    for spec in specs:
        host = reader.read(spec, cfg, param_dtype)
        sharding = (shardings or {}).get(spec.path)
        value = jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)
        del host
        reader.files[spec.file].release_pages()  # the file's pages no longer count as resident
        flat[spec.path].set_value(value)
    return abstract_state


def to_hf_tensors(state: nnx.State, cfg: EncoderConfig, dtype="float32") -> dict[str, dict[str, np.ndarray]]:
    """The inverse of ``load_state``: {file: {key: array}} in torch layout, ready to save."""
    flat = dict(iter_params(state))
    out: dict[str, dict[str, np.ndarray]] = {}
    np_dtype = _np_dtype(dtype)
    for spec in PARAM_TABLE:
        value = np.asarray(jax.device_get(flat[spec.path].get_value()))
        tensors = out.setdefault(spec.file, {})
        for i, hf_key in enumerate(spec.hf_keys(cfg.num_layers)):
            a = value[i] if spec.per_layer else value
            tensors[hf_key] = np.ascontiguousarray(spec.transform.to_hf(a, cfg)).astype(np_dtype, copy=False)
    return out


def read_folder_configs(folder: Path) -> tuple[EncoderConfig, HeadConfig]:
    """(encoder config, head config) of a sentence-transformers folder, checked against each other.
    Every problem is one line naming the file."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{cfg_path} is missing; pass a sentence-transformers folder of EmbeddingGemma")
    try:
        enc = EncoderConfig.from_hf_config(read_json(cfg_path, expect=dict))
    except FileFormatError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{cfg_path} lacks {e.args[0]!r}; it is not a complete Gemma-3 config.json") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{cfg_path} holds a value of the wrong type ({e}); fix or replace the file") from None
    head = head_config_from_folder(folder)
    if head.in_features != enc.hidden_size:
        raise WeightsError(f"{folder / '2_Dense' / 'config.json'} expects {head.in_features} inputs but the encoder "
                           f"in {cfg_path} is {enc.hidden_size} wide")
    return enc, head


def _optional_json(path: Path, expect: type, default):
    return read_json(path, expect=expect) if path.is_file() else default


def head_config_from_folder(folder: Path, base: HeadConfig | None = None) -> HeadConfig:
    """Read the Dense configs and sentence-transformers settings of a folder into a HeadConfig."""
    base = base or HeadConfig()
    dense = []
    for name in ("2_Dense", "3_Dense"):
        path = folder / name / "config.json"
        if not path.is_file():
            raise WeightsError(f"{path} is missing; a sentence-transformers folder of EmbeddingGemma has 2_Dense/ "
                               "and 3_Dense/ (re-download or re-export the model)")
        d = read_json(path, expect=dict)
        act = d.get("activation_function", "torch.nn.modules.linear.Identity")
        if d.get("bias", False) or not str(act).endswith("Identity"):
            raise WeightsError(f"{path} describes a Dense layer with bias or activation {act}; "
                               "EmbeddingGemma's are bias-free and linear")
        missing = [k for k in ("in_features", "out_features") if not isinstance(d.get(k), int)]
        if missing:
            raise WeightsError(f"{path} lacks an integer {missing[0]!r}; fix or replace the file")
        dense.append(d)
    st = _optional_json(folder / "config_sentence_transformers.json", dict, {})
    sb = _optional_json(folder / "sentence_bert_config.json", dict, {})
    modules = _optional_json(folder / "modules.json", list, [])
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not read_json(pooling, expect=dict).get("pooling_mode_mean_tokens", False):
        raise WeightsError(f"{pooling} does not use mean pooling; EmbeddingGemma uses mean pooling")
    return dataclasses.replace(
        base,
        in_features=dense[0]["in_features"], hidden_features=dense[0]["out_features"],
        out_features=dense[1]["out_features"],
        normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict))
        if modules else True,
        max_seq_length=sb.get("max_seq_length", base.max_seq_length),
        prompts=dict(st.get("prompts") or {}),
        default_prompt_name=st.get("default_prompt_name"),
    )
