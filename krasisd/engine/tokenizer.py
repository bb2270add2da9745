"""A model's tokenizer: tokenizer.json through the `tokenizers` library, plus the settings
Hugging Face keeps beside it (tokenizer_config.json, generation_config.json, chat_template.jinja).

Encoding follows `transformers`' fast tokenizers: special tokens named in the config that the
vocabulary lacks are added, and tokenizer.json's post-processor decides which special tokens
``encode`` adds. Only when tokenizer.json has no post-processor do ``add_bos_token`` and
``add_eos_token`` build one (``[bos] $A [eos]``, as ``update_post_processor`` does); transformers
5 ignores them then, and would encode such a model's prompts without the BOS it was trained with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

try:  # the engine's error hierarchy, when present
    from krasisd.engine.errors import ModelLoadError

    _ERROR_BASES: tuple[type, ...] = (ModelLoadError, ValueError)
except ImportError:  # pragma: no cover - only while the errors module does not exist
    _ERROR_BASES = (ValueError,)

log = logging.getLogger(__name__)

# Named special tokens that transformers passes to chat templates (its special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)


class TokenizerError(*_ERROR_BASES):
    """A tokenizer folder is missing files or holds files that cannot be read."""


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path.name} not found in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any, name: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"tokenizer_config.json: {name} must be a string or an AddedToken dict")


def _added_token(spec: dict[str, Any], special: bool) -> AddedToken:
    return AddedToken(
        spec["content"],
        single_word=bool(spec.get("single_word", False)),
        lstrip=bool(spec.get("lstrip", False)),
        rstrip=bool(spec.get("rstrip", False)),
        normalized=bool(spec.get("normalized", not special)),
        special=special,
    )


def _chat_templates(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates: a string is "default"; a list holds {"name", "template"} items."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():  # the newer transformers layout wins, as it does there
        try:
            return {"default": jinja_file.read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read {jinja_file}: {exc}") from exc
    raw = config.get("chat_template")
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in raw
    ):
        return {t["name"]: t["template"] for t in raw}
    raise TokenizerError(
        "tokenizer_config.json: chat_template must be a string or a list of {name, template}"
    )


def _generation_eos_ids(model_dir: Path) -> set[int]:
    raw = _read_json(model_dir / "generation_config.json", required=False).get("eos_token_id")
    if raw is None:
        return set()
    ids = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError("generation_config.json: eos_token_id must be an int or a list of ints")
    return set(ids)


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat templates."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_templates: dict[str, str] | None = None,
        extra_eos_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self.special_tokens_map = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates = dict(chat_templates or {})
        self._extra_eos_ids = set(extra_eos_ids)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json and the optional config files beside it."""
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            hint = " (SentencePiece tokenizer.model alone is not supported)" if (
                model_dir / "tokenizer.model").is_file() else ""
            raise TokenizerError(f"tokenizer.json not found in {model_dir}{hint}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception on a bad file
            raise TokenizerError(f"cannot parse {tok_file}: {exc}") from exc
        config = _read_json(model_dir / "tokenizer_config.json", required=False)
        special = {name: _token_content(config.get(name), name) for name in SPECIAL_TOKEN_NAMES}
        _add_missing_tokens(backend, config, special)
        if backend.post_processor is None:
            _set_bos_eos_processor(backend, config, special)
        tok = cls(backend, special, _chat_templates(model_dir, config), _generation_eos_ids(model_dir))
        log.debug("tokenizer loaded", extra={"model_dir": str(model_dir), "vocab": tok.vocab_size})
        return tok

    # --- special tokens -------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def eos_token_ids(self) -> set[int]:
        """The tokenizer's eos token plus generation_config.json's eos ids."""
        ids = set(self._extra_eos_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return ids

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the model has none."""
        return self.chat_templates.get("default")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def adds_bos_token(self) -> bool:
        """True when ``encode(..., add_special_tokens=True)`` starts with the BOS token."""
        bos = self.bos_token_id
        return bos is not None and self.backend.encode("a").ids[:1] == [bos]

    # --- conversion -----------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half a character) decodes to U+FFFD, and ids
        past the vocabulary (a model's padding rows) decode to nothing, as in `tokenizers`."""
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 0]
        if bad:
            raise ValueError(f"token ids must be non-negative ints, got {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _add_missing_tokens(
    backend: tokenizers.Tokenizer, config: dict[str, Any], special: dict[str, str | None]
) -> None:
    """Add the config's added_tokens_decoder and named special tokens the vocabulary lacks."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError("tokenizer_config.json: added_tokens_decoder must be an object")
    for key, spec in sorted(decoder.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1):
        if not key.isdigit() or not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
            raise TokenizerError(f"tokenizer_config.json: bad added_tokens_decoder entry {key!r}")
        if backend.token_to_id(spec["content"]) is not None:
            continue
        is_special = bool(spec.get("special", False))
        add = backend.add_special_tokens if is_special else backend.add_tokens
        add([_added_token(spec, is_special)])
        got = backend.token_to_id(spec["content"])
        if got != int(key):
            log.warning("added token %r got id %s, config says %s", spec["content"], got, key)
    for name, content in special.items():
        if content is not None and backend.token_to_id(content) is None:
            backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            log.info("added special token %s=%r missing from the vocabulary", name, content)


def _set_bos_eos_processor(
    backend: tokenizers.Tokenizer, config: dict[str, Any], special: dict[str, str | None]
) -> None:
    """``[bos] $A [eos]`` per add_bos_token/add_eos_token (defaults False), like transformers."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = bool(config.get("add_bos_token", False)) and bos is not None
    add_eos = bool(config.get("add_eos_token", False)) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=tokens
    )
