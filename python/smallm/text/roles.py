"""Which special tokens play smallm's parts, for tokenizers smallm trained and for those it imported.

smallm needs three things of a vocabulary besides its merges: the token that starts every document in
the shards (and, when the tokenizer adds it, every prompt), the tokens that end a generation, and how
a conversation becomes text. Its own tokenizers use ``<|endoftext|>`` for the first two and ChatML for
the third. A tokenizer trained elsewhere says it in the files beside its ``tokenizer.json``, read as
``transformers`` reads them:

* ``tokenizer.json``'s ``TemplateProcessing`` post-processor: the special token it puts before every
  text (Llama 3's ``<|begin_of_text|>``) is the document start, and prompts get it (``add_bos``);
* ``tokenizer_config.json``: ``bos_token``, ``eos_token`` and ``chat_template`` (a string, or a list
  of named templates of which ``default`` is used), or a ``chat_template.jinja`` file;
* ``generation_config.json``: ``eos_token_id`` (one id or several, as Llama 3.1 Instruct's end of
  turn and end of text), which also stop generation.

A tokenizer that adds nothing (GPT-2, Qwen, SmolLM) still needs a document boundary for packing:
``<|endoftext|>`` when it has one, else its ``bos_token``, else its ``eos_token``.
:meth:`TokenRoles.write` stores the resolved roles as ``tokenizer_config.json`` fields, so a run
directory keeps what the imported folder said.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smallm.errors import SmallmError

__all__ = [
    "CHAT_TEMPLATE_FILE", "EOT", "GENERATION_CONFIG_FILE", "TOKENIZER_CONFIG_FILE", "TokenRoles", "read_roles",
]  # fmt: skip

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""Where a Hugging Face tokenizer folder keeps its special tokens' roles and chat template (smallm too,
for a tokenizer trained elsewhere)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

EOT = "<|endoftext|>"
SMALLM_STOPS = (EOT, "<|im_end|>")
"""The tokens that end a generation with smallm's own tokenizers: end of text, end of a ChatML turn."""


class RolesError(SmallmError, ValueError):
    """A tokenizer's configuration names tokens it does not have, or is malformed; the message names the file."""


@dataclass(frozen=True)
class TokenRoles:
    """The special tokens (as strings) that play smallm's parts, and the chat template."""

    document: str | None
    """Starts every packed document and every evaluated text: the boundary the model learns."""
    add_bos: bool
    """Whether prompts start with ``document`` too (what the tokenizer adds by default)."""
    eos: str | None
    """The end of text (``eos_token``)."""
    stops: tuple[str, ...] = ()
    """Every token that ends a generation (``eos`` first)."""
    chat_template: str | None = None
    """The model's Jinja chat template; None means smallm's ChatML."""
    source: str = "smallm"
    """Where the roles were read: ``smallm`` (its defaults) or the files they came from."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Other named tokens the template may use (``pad_token``, ``unk_token``)."""
    added: tuple[str, ...] = ()
    """Special tokens smallm added to the model's vocabulary (ChatML's markers, for a base without a
    chat template), whose embedding rows are new."""

    @classmethod
    def smallm(cls, specials: Mapping[str, int]) -> TokenRoles:
        """smallm's own: ``<|endoftext|>`` starts documents and prompts; it and ``<|im_end|>`` stop."""
        eot = EOT if EOT in specials else None
        return cls(eot, eot is not None, eot, tuple(s for s in SMALLM_STOPS if s in specials))

    def check(self, specials: Mapping[str, int], where: str) -> TokenRoles:
        """Raises :class:`RolesError` when a role names a token the vocabulary does not have as a special."""
        for name, token in (("the document start", self.document), ("eos_token", self.eos)):
            if token is not None and token not in specials:
                raise RolesError(f"{where}: {name} {token!r} is not a special token of the tokenizer")
        return replace(self, stops=tuple(dict.fromkeys(s for s in self.stops if s in specials)))

    def to_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` fields that give these roles back (:func:`read_roles`)."""
        config: dict[str, Any] = {
            "bos_token": self.document if self.add_bos else None,
            "eos_token": self.eos,
            "add_bos_token": self.add_bos,
            "smallm_document_token": self.document,
            "smallm_stop_tokens": list(self.stops),
            "smallm_added_tokens": list(self.added),
            "smallm_roles_source": self.source,
            **self.extra,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


def read_roles(folder: Path | None, specials: Mapping[str, int], document: Mapping[str, Any]) -> TokenRoles:
    """The roles of the tokenizer whose ``tokenizer.json`` (parsed: ``document``) lies in ``folder``, from
    its post-processor and the folder's ``tokenizer_config.json``, ``chat_template.jinja`` and
    ``generation_config.json`` when present (``folder`` None: the post-processor alone). Raises
    :class:`RolesError` naming the file."""
    present = {
        name: folder / name
        for name in (TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE)
        if folder is not None and (folder / name).is_file()
    }
    config_file = present.get(TOKENIZER_CONFIG_FILE)
    config = _json_object(config_file) if config_file else {}
    added = _added_by_post_processor(document.get("post_processor"))
    bos, eos = _token(config, "bos_token", config_file), _token(config, "eos_token", config_file)
    stored = config.get("smallm_document_token")
    if isinstance(stored, str):  # written by TokenRoles.to_config
        doc_token = stored
        add_bos = bool(config.get("add_bos_token"))
    else:
        if added is None and config.get("add_bos_token") is True and bos is not None:
            added = bos  # LLaMA tokenizer classes add their BOS by this flag
        doc_token = added or (EOT if EOT in specials else None) or bos or eos
        add_bos = added is not None
    if eos is None and EOT in specials:
        eos = EOT
    generation = present.get(GENERATION_CONFIG_FILE)
    stops = [eos, *_stored_stops(config), *(_generation_stops(generation, specials) if generation else [])]
    roles = TokenRoles(
        document=doc_token,
        add_bos=add_bos,
        eos=eos,
        stops=tuple(s for s in stops if s is not None),
        chat_template=_chat_template(present.get(CHAT_TEMPLATE_FILE), config, config_file),
        source=config.get("smallm_roles_source") or ", ".join(present) or "tokenizer.json",
        extra={key: value for key in ("pad_token", "unk_token") if (value := _token(config, key, config_file))},
        added=tuple(t for t in config.get("smallm_added_tokens") or () if isinstance(t, str)),
    )
    return roles.check(specials, str(config_file or "tokenizer.json"))


def _added_by_post_processor(processor: Any) -> str | None:
    """The special token a ``TemplateProcessing`` post-processor (alone or in a ``Sequence``) puts first."""
    if not isinstance(processor, Mapping):
        return None
    if processor.get("type") == "Sequence":
        for inner in processor.get("processors") or []:
            if (found := _added_by_post_processor(inner)) is not None:
                return found
        return None
    if processor.get("type") != "TemplateProcessing":
        return None
    single = processor.get("single") or []
    first = single[0] if single else None
    if isinstance(first, Mapping) and isinstance(first.get("SpecialToken"), Mapping):
        token = first["SpecialToken"].get("id")
        return token if isinstance(token, str) else None
    return None


def _token(config: Mapping[str, Any], key: str, file: Path | None) -> str | None:
    value = config.get(key)
    if isinstance(value, Mapping):  # older files store an AddedToken object
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise RolesError(f"{file}: {key} must be a token string or null, not {json.dumps(value)}")


def _stored_stops(config: Mapping[str, Any]) -> list[str]:
    stops = config.get("smallm_stop_tokens")
    return [s for s in stops if isinstance(s, str)] if isinstance(stops, list) else []


def _generation_stops(file: Path, specials: Mapping[str, int]) -> list[str]:
    ids = _json_object(file).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    by_id = {i: s for s, i in specials.items()}
    return [by_id[i] for i in ids if isinstance(i, int) and i in by_id]


def _chat_template(jinja: Path | None, config: Mapping[str, Any], file: Path | None) -> str | None:
    if jinja is not None:
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RolesError(f"{jinja}: cannot read: {e}") from e
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: the default one is the chat template
        for entry in template:
            if isinstance(entry, Mapping) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
        return None
    raise RolesError(f"{file}: chat_template must be a string or a list of named templates")


def _json_object(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RolesError(f"{file}: cannot read it as JSON: {e}") from e
    if not isinstance(value, dict):
        raise RolesError(f"{file}: expected a JSON object")
    return value
