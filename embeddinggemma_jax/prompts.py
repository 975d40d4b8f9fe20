"""One helper for choosing the prompt prepended to a text: a prompt name checked against the model's
prompts (config_sentence_transformers.json), a custom prompt, or the document title template.

The API (``EmbeddingGemma.encode``), the batch job and its ``--plan-only``, the server's request
parser, training's ``BatchEncoder`` and the evaluation commands all choose their prompt here, so the
rules and the error text are the same everywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

# EmbeddingGemma's document prompt with a title ("none" without one), as its model card writes it.
DOCUMENT_TEMPLATE = "title: {title} | text: "


def prompt_text(prompts: Mapping[str, str], prompt_name: str | None = None, prompt: str | None = None, *,
                what: str = "prompt_name", error: type[Exception] = ValueError) -> str | None:
    """The text to prepend: ``prompts[prompt_name]``, or the custom ``prompt``, or None (neither).
    An unknown name raises ``error`` in one line naming ``what`` (the caller's spelling: a keyword, a flag
    or a JSON field) and the model's prompt names."""
    if prompt_name is not None and prompt is not None:
        raise ValueError("pass either prompt_name or prompt, not both")
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise error(f"unknown {what} {prompt_name!r}; valid names: {', '.join(sorted(prompts))}")
        return prompts[prompt_name]
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


def with_prompt(texts: Sequence[str], prefix: str | None) -> list[str]:
    """``texts`` with ``prefix`` prepended to each (unchanged when there is none)."""
    return [prefix + t for t in texts] if prefix else list(texts)


def document_prefix(title: str | None) -> str:
    """The document prompt for ``title`` (``None``: the template's "none")."""
    return DOCUMENT_TEMPLATE.format(title=title if title is not None else "none")


__all__ = ["DOCUMENT_TEMPLATE", "prompt_text", "with_prompt", "document_prefix"]
