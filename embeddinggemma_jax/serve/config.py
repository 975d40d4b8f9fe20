"""The server's settings, declared once: each field is a ``serve`` flag (``options``). No web framework is
imported here, so the command line works without the ``serve`` extra installed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from embeddinggemma_jax.batching import parse_max_batch_tokens
from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.options import check_ranges, option
from embeddinggemma_jax.quant import MODE_NAMES

# The server's cap on a CPU batch (rows x padded length). Every text runs in its bucket's one fixed shape,
# so rows no text fills are computed as padding: small batches waste little when few texts of a bucket
# wait, and idle requests pay for few padding rows (docs/serving.md: 256 against 512).
SERVE_CPU_MAX_BATCH_TOKENS = 256


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _tokens(text: str):
    try:
        return parse_max_batch_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class ServeOptions:
    model: str = option(DEFAULT_MODEL, "model folder, Orbax checkpoint or hub id")
    dtype: str = option("float32", "compute dtype", choices=["float32", "bfloat16"])
    quantize: str | None = option(None, "post-training quantization of the weights (default: none)",
                                  choices=list(MODE_NAMES))
    host: str = option("127.0.0.1", "address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    port: int = option(8000, "TCP port")
    served_model_name: str | None = option(None, "the name clients send as 'model' (default: the hub id, or the "
                                                 "folder's name); the --model value and the part after the last "
                                                 "'/' are aliases")
    batch_size: int = option(32, "most rows in one batch", parse=_positive)
    max_batch_tokens: int | None | str = option("auto", "most rows x padded length in one batch: 'auto' "
                                                        f"({SERVE_CPU_MAX_BATCH_TOKENS} on CPU, no cap on "
                                                        "accelerators), 'none' or N; with --batch-size it fixes "
                                                        "each length bucket's one batch shape", parse=_tokens)
    max_wait_ms: float = option(5.0, "longest a partly filled batch waits for more texts of its length bucket "
                                     "after its first text arrived, in milliseconds")
    max_inputs: int = option(2048, "most inputs in one request (400 above)", parse=_positive)
    max_queue: int = option(8192, "most texts waiting for the device; a request that would pass it gets 429 with "
                                  "Retry-After (at least --max-inputs)", parse=_positive)
    max_body_mb: float = option(32.0, "largest request body in MiB (413 above)")
    max_input_chars: int = option(65536, "most characters of one input the server tokenises: a longer input is "
                                         "taken when its first max-length tokens end at a space within that many "
                                         "characters (truncated exactly as encode does), else refused with 400",
                                  parse=_positive)
    max_request_chars: int = option(4 * 1024 * 1024, "most characters in one request, prompts included, summed "
                                                     "over its inputs (413 above, before any tokenising)",
                                    parse=_positive)
    max_request_tokens: int = option(300_000, "most tokens in one request after truncation, prompts, <bos> and "
                                              "<eos> included (413 above; tokenising stops there)", parse=_positive)
    max_tokens_in_flight: int = option(1_000_000, "most tokens of all requests between their arrival and their "
                                                  "answer (429 with Retry-After above; at least --max-request-tokens)",
                                       parse=_positive)
    max_requests_in_flight: int = option(256, "most embedding requests between their arrival and their answer "
                                              "(429 with Retry-After above)", parse=_positive)
    max_response_mb: float = option(16.0, "largest response in MiB, counted as inputs x dimensions x 4 bytes "
                                          "(413 above, before any work; the JSON text is ~5x that)")
    max_connections: int = option(1024, "most open connections; past it new ones get 503", parse=_positive)
    header_timeout_s: float = option(10.0, "seconds a connection may take to send a request's headers; then it "
                                           "is closed")
    body_timeout_s: float = option(60.0, "seconds a request may take to send its body once its headers arrived "
                                         "(408 after)")
    drain_timeout_s: float = option(30.0, "on SIGTERM, seconds to finish the requests in flight; then the "
                                          "connections still open are cut, named in the log, and the process exits "
                                          "with status 3")
    api_key_file: str | None = option(None, "file with one accepted API key per line ('#' comments); requests then "
                                            "need 'Authorization: Bearer <key>' (/health, /ready, /metrics stay open)")
    warmup: str = option("all", "'all': compile every batch shape before GET /ready answers 200; 'none': ready once "
                                "loaded, each shape compiles on first use", choices=["all", "none"])
    log_level: str = option("info", "log level", choices=["debug", "info", "warning", "error"])

    def __post_init__(self):
        if self.max_queue < self.max_inputs:
            raise ValueError(f"--max-queue {self.max_queue} is below --max-inputs {self.max_inputs}: a request of "
                             f"--max-inputs texts could never be queued; raise --max-queue")
        if self.max_tokens_in_flight < self.max_request_tokens:
            raise ValueError(f"--max-tokens-in-flight {self.max_tokens_in_flight} is below --max-request-tokens "
                             f"{self.max_request_tokens}: a request at the limit could never be admitted")
        # Every number finite and in range, in one line naming the flag (also for values from a JSON config).
        check_ranges(self, {"port": (1, 65535), "max_wait_ms": (0, 60_000), "max_body_mb": (1e-6, 4096),
                            "max_response_mb": (1e-6, 4096), "header_timeout_s": (0.01, 3600),
                            "body_timeout_s": (0.01, 3600), "drain_timeout_s": (0, 3600)})

    @property
    def max_response_bytes(self) -> int:
        return int(self.max_response_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def model_names(self) -> tuple[str, ...]:
        """The served name first, then the aliases a request's ``model`` may also use."""
        name = self.served_model_name or served_name_for(self.model)
        return tuple(dict.fromkeys(n for n in (name, self.model, name.rsplit("/", 1)[-1]) if n))

    def api_keys(self) -> tuple[str, ...]:
        return load_api_keys(self.api_key_file) if self.api_key_file else ()


def served_name_for(model: str) -> str:
    """A hub id serves under its id; a local folder under its folder name."""
    p = Path(model).expanduser()
    return p.resolve().name if p.exists() else model


def load_api_keys(path: str | Path) -> tuple[str, ...]:
    """One key per line; blank lines and ``#`` comments ignored. A file without a key is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--api-key-file {path} does not exist")
    try:  # utf-8-sig: an editor's byte-order mark is not part of the first key
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--api-key-file {path} is not UTF-8 text; put one ASCII key per line") from None
    keys = tuple(k.strip() for k in lines if k.strip() and not k.strip().startswith("#"))
    if not keys:
        raise ValueError(f"{path} holds no API key; put one key per line (or drop --api-key-file)")
    for n, k in enumerate(keys, 1):
        # A header carries bytes that Starlette reads as Latin-1 and clients rarely send non-ASCII at all: such a
        # key could never match, so it is refused here rather than silently.
        if not (k.isascii() and k.isprintable()) or any(c.isspace() for c in k):
            raise ValueError(f"--api-key-file {path}: key {n} holds a non-ASCII, space or control character; "
                             f"API keys must be printable ASCII without spaces")
    return keys
