"""Request validation for the server's two request shapes, and the error object every route answers with.

``/v1/embeddings`` takes OpenAI's body plus this server's extra fields; ``/embed`` takes Text Embeddings
Inference's. Both become one ``EmbedRequest``. Every rejection is an ``ApiError`` that names the field
and says what to send instead; unknown fields are refused rather than ignored, so a misspelt option
never silently changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from embeddinggemma_jax.head import check_dimensions
from embeddinggemma_jax.prompts import prompt_text
from embeddinggemma_jax.tokenize import check_texts

TIERS = ("priority", "default")  # the order in which the worker takes them
ENCODING_FORMATS = ("float", "base64")


class ApiError(Exception):
    """An HTTP error answered as OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    dimensions: int | None = None
    normalize: bool | None = None  # None: the model's own choice (EmbeddingGemma: normalised)
    truncate: bool = True
    prompt_name: str | None = None
    custom_instruction: str | None = None  # prepended verbatim; None or "" means none
    encoding_format: str = "float"
    service_tier: str = "default"


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request("the request body nests JSON arrays or objects too deeply; send a flat JSON object",
                          code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4,300 digits
        raise bad_request(f"the request body is not valid JSON ({str(e)[:200]}); send a JSON object",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {_json_type(body)}",
                          code="invalid_json")
    return body


def _json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__)


def _check_known(body: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise bad_request(f"unrecognized request field(s): {', '.join(unknown)}; the accepted fields are "
                          f"{', '.join(known)}", param=unknown[0], code="unknown_parameter")


def _utf8(texts: list, field: str, indexed: bool = True) -> list[str]:
    try:  # JSON can carry lone surrogates ("\ud800"), which no tokenizer takes
        return check_texts(texts, lambda i: f"'{field}[{i}]'" if indexed else f"'{field}'")
    except ValueError as e:
        raise bad_request(str(e), param=field) from None


def _texts(value, field: str, max_inputs: int) -> list[str]:
    if isinstance(value, str):
        return _utf8([value], field, indexed=False)
    if not isinstance(value, list):
        raise bad_request(f"'{field}' must be a string or a list of strings, got a JSON {_json_type(value)}",
                          param=field, code="invalid_type")
    if not value:
        raise bad_request(f"'{field}' is an empty list; send at least one string", param=field,
                          code="empty_input")
    if len(value) > max_inputs:
        raise bad_request(f"'{field}' has {len(value)} inputs, more than this server's limit of {max_inputs}; "
                          f"split them over several requests", param=field, code="too_many_inputs")
    for i, t in enumerate(value):
        if isinstance(t, str):
            continue
        if isinstance(t, int) or (isinstance(t, list) and all(isinstance(x, int) for x in t)):
            raise bad_request(f"'{field}' holds token ids (item {i}); this server takes text only: send "
                              f"strings", param=field, code="token_ids_unsupported")
        raise bad_request(f"'{field}[{i}]' is a JSON {_json_type(t)}; every input must be a string",
                          param=field, code="invalid_type")
    return _utf8(value, field)


def _typed(body: dict, field: str, kind: type, default, kind_name: str):
    v = body.get(field)
    if v is None:
        return default
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise bad_request(f"'{field}' must be {kind_name}, got a JSON {_json_type(v)}", param=field,
                          code="invalid_type")
    return v


def _options(body: dict, prompts: dict[str, str], full_dimensions: int) -> dict:
    dims = body.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise bad_request(f"'dimensions' must be an integer, got a JSON {_json_type(dims)}", param="dimensions",
                              code="invalid_type")
        try:
            check_dimensions(dims, full_dimensions)
        except ValueError as e:
            raise bad_request(str(e), param="dimensions")
    prompt_name = _typed(body, "prompt_name", str, None, "a string")
    try:
        prompt_text(prompts, prompt_name)
    except ValueError as e:
        raise bad_request(str(e), param="prompt_name", code="unknown_prompt_name") from None
    return {"dimensions": dims, "prompt_name": prompt_name,
            "normalize": _typed(body, "normalize", bool, None, "true or false"),
            "truncate": _typed(body, "truncate", bool, True, "true or false")}


OPENAI_FIELDS = ("input", "model", "dimensions", "encoding_format", "user", "normalize", "custom_instruction",
                 "prompt_name", "truncate", "service_tier")
TEI_FIELDS = ("inputs", "normalize", "truncate", "prompt_name", "dimensions")


def parse_openai(body: dict, *, model_names: tuple[str, ...], prompts: dict[str, str], full_dimensions: int,
                 max_inputs: int) -> EmbedRequest:
    """OpenAI's ``/v1/embeddings`` body (with this server's extra fields) -> ``EmbedRequest``."""
    _check_known(body, OPENAI_FIELDS)
    if "input" not in body:
        raise bad_request("'input' is required: a string or a list of strings", param="input",
                          code="missing_required_parameter")
    texts = _texts(body["input"], "input", max_inputs)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request(f"'model' is required and must be a string (this server serves {model_names[0]!r})",
                          param="model", code="missing_required_parameter" if model is None else "invalid_type")
    if model not in model_names:
        # Only the served name: the aliases include the --model value, a local path clients need not see.
        raise ApiError(404, f"the model {model!r} does not exist on this server; it serves {model_names[0]!r}",
                       param="model", code="model_not_found")
    opts = _options(body, prompts, full_dimensions)
    instruction = _typed(body, "custom_instruction", str, None, "a string")
    if instruction:
        _utf8([instruction], "custom_instruction", indexed=False)
    if instruction and opts["prompt_name"] is not None:
        raise bad_request("pass either 'prompt_name' or 'custom_instruction', not both", param="custom_instruction")
    fmt = _typed(body, "encoding_format", str, "float", "a string")
    if fmt not in ENCODING_FORMATS:
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    tier = _typed(body, "service_tier", str, "default", "a string")
    if tier not in TIERS:
        raise bad_request(f"'service_tier' must be 'default' or 'priority', got {tier!r}", param="service_tier")
    _typed(body, "user", str, None, "a string")  # accepted for compatibility, not used
    return EmbedRequest(texts, custom_instruction=instruction or None, encoding_format=fmt, service_tier=tier,
                        **opts)


def parse_tei(body: dict, *, prompts: dict[str, str], full_dimensions: int, max_inputs: int) -> EmbedRequest:
    """Text Embeddings Inference's ``/embed`` body -> ``EmbedRequest`` (default tier, float vectors)."""
    _check_known(body, TEI_FIELDS)
    if "inputs" not in body:
        raise bad_request("'inputs' is required: a string or a list of strings", param="inputs",
                          code="missing_required_parameter")
    return EmbedRequest(_texts(body["inputs"], "inputs", max_inputs), **_options(body, prompts, full_dimensions))
