"""The Hugging Face Hub: uploading a folder written by ``smallm-export`` to a model repository, and opening
a model by its repository id.

Everything that can be checked without the network is checked first (the folder, the repository id,
``HF_HUB_OFFLINE``, a token), so a mistake costs no upload; the Hub's refusals come back as
:class:`~smallm.interop.hf_export.HFError` with what to do about them.

:func:`resolve_model` is how every command that opens a model takes ``NAMESPACE/NAME`` (and
``--revision``) where a local path is missing: ``huggingface_hub`` brings the repository's model files
into its cache (or finds them there: offline with ``HF_HUB_OFFLINE=1``), and a ``transformers`` folder
(what ``smallm-push`` uploads, or anyone's LLaMA, Qwen or Mistral model) is imported once into a smallm
run under ``~/.cache/smallm/hub`` (``SMALLM_CACHE`` moves it), keyed by the snapshot's commit.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Union

from smallm.data.builtin import cache_dir
from smallm.interop.hf_export import HF_CONFIG, HF_WEIGHTS, HFError
from smallm.interop.hf_import import import_hf
from smallm.run.layout import CHECKPOINTS_DIR, CONFIG_FILE, is_run_config, read_json
from smallm.text.tokenizer import TOKENIZER_FILE

__all__ = ["EXPORT_FILES", "check_repo_id", "download", "push_to_hub", "resolve_model"]

PathLike = Union[str, "os.PathLike[str]"]
EXPORT_FILES = (HF_CONFIG, HF_WEIGHTS, TOKENIZER_FILE)
"""What a folder needs to be pushed: a model transformers can load, and its tokenizer."""
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.tiktoken", "*.txt", "*.md")
"""What is fetched of a repository: configs, weights, tokenizer files, templates (no .bin, .gguf, .onnx)."""


def push_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload a smallm export",
) -> str:
    """Uploads an exported folder to the Hub model repository ``repo_id`` (NAMESPACE/NAME), creating it
    (``private`` when asked) if needed; returns the repository URL. Everything that can be checked
    locally is checked before the network: the folder, the repository id, ``HF_HUB_OFFLINE`` and a token
    (``token``, else the one from ``huggingface-cli login`` or ``HF_TOKEN``)."""
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise HFError(f"{folder} is not an exported model folder (no {', '.join(missing)}): make it with smallm-export")
    check_repo_id(repo_id)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise HFError("offline (HF_HUB_OFFLINE=1): cannot reach the Hugging Face Hub")
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as e:
        raise HFError("pushing needs huggingface_hub: pip install 'smallm[hf]'") from e
    token = token or huggingface_hub.get_token()
    if not token:
        raise HFError(
            "not logged in to the Hugging Face Hub: run `hf auth login` (`huggingface-cli login` with older "
            "huggingface_hub) or set HF_TOKEN"
        )
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = "; check that the token is valid and may write to that namespace" if status in (401, 403) else ""
        raise HFError(f"the Hugging Face Hub refused the upload to {repo_id}: {e}{hint}") from e
    except Exception as e:  # connection, DNS, TLS, timeouts: whatever the HTTP client raises
        raise HFError(f"could not upload to the Hugging Face Hub ({type(e).__name__}: {e})") from e
    return str(url)


def check_repo_id(repo_id: str) -> None:
    """Raises :class:`HFError` unless ``repo_id`` is NAMESPACE/NAME as the Hub accepts it: letters, digits,
    ``-``, ``_`` and ``.``, not starting or ending with ``-`` or ``.``, no ``--`` or ``..``, at most 96
    characters."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    valid = (
        len(parts) == 2
        and all(_REPO_PART.fullmatch(part) for part in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and len(repo_id) <= 96
    )
    if not valid:
        raise HFError(
            f"bad repository id {repo_id!r}: expected NAMESPACE/NAME (letters, digits, '-', '_', '.'; "
            "no '--' or '..'; at most 96 characters), e.g. my-org/my-model"
        )


def resolve_model(spec: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local folder a command opens for ``spec``: a path that exists, as is; otherwise a Hub repository id
    (NAMESPACE/NAME), downloaded (or found in the cache) at ``revision`` by :func:`download`, and when it
    holds a ``transformers`` model rather than a smallm run, imported into smallm's cache once
    (:func:`smallm.interop.hf_import.import_hf`). Raises :class:`HFError` saying both what was looked for
    locally and on the Hub."""
    folder = local_or_download(spec, revision)
    if folder == Path(spec) or (folder / CHECKPOINTS_DIR).is_dir() or is_run_config(read_json(folder / CONFIG_FILE)):
        return folder
    imported = cache_dir() / "hub" / os.fspath(spec).replace("/", "--") / folder.name
    if not (imported / CONFIG_FILE).is_file():
        print(f"importing {os.fspath(spec)} ({folder}) into {imported}", file=sys.stderr)
        import_hf(folder, imported, force=True)
    return imported


def local_or_download(spec: str | os.PathLike[str], revision: str | None = None) -> Path:
    """``spec`` itself when it exists locally or cannot be a Hub repository id (the caller's own check then
    says it is missing), else the snapshot of the Hub repository it names (:func:`download`)."""
    path = Path(spec)
    text = os.fspath(spec)
    if path.exists() or not _looks_like_repo_id(text):
        if revision is not None:
            raise HFError(f"--revision {revision} is for a Hub repository id NAMESPACE/NAME, not the path {text}")
        return path
    return download(text, revision, missing_locally=True)


def download(repo_id: str, revision: str | None = None, *, missing_locally: bool = False) -> Path:
    """The snapshot folder of model repository ``repo_id`` at ``revision`` (default: the main branch) in
    ``huggingface_hub``'s cache, fetching its :data:`MODEL_FILES` when the network is on and they are not
    there yet. Raises :class:`HFError` for an id that is not in the cache while offline, a repository or
    revision the Hub does not have, or one that needs a login."""
    check_repo_id(repo_id)
    try:
        import huggingface_hub
        import huggingface_hub.constants
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise HFError("opening a model by its Hub id needs huggingface_hub: pip install 'smallm[hf]'") from e
    local = f"{repo_id}: no such local file or directory, and " if missing_locally else ""
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES)))
    except GatedRepoError as e:
        raise HFError(f"{local}the Hub repository {repo_id} is gated: accept its terms on the Hub, then log in "
                      "(`hf auth login`) or set HF_TOKEN") from e  # fmt: skip
    except RepositoryNotFoundError as e:
        raise HFError(f"{local}the Hub has no model repository {repo_id} (or it is private: log in)") from e
    except RevisionNotFoundError as e:
        raise HFError(f"{local}the Hub repository {repo_id} has no revision {revision}") from e
    except LocalEntryNotFoundError as e:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        why = "the network is off (HF_HUB_OFFLINE=1)" if offline else "the Hub cannot be reached"
        raise HFError(
            f"{local}{repo_id}{at} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
            f"and {why}: download it once where the network is on (`hf download {repo_id}`), or give a local folder"
        ) from e
    except Exception as e:  # connection, DNS, TLS, timeouts: whatever the HTTP client raises
        raise HFError(
            f"{local}could not fetch {repo_id}{at} from the Hugging Face Hub ({type(e).__name__}: {e})"
        ) from e


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(_REPO_PART.fullmatch(part) for part in parts)
