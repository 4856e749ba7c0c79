"""The Hugging Face Hub: uploading a folder written by ``smallm-export`` to a model repository.

Everything that can be checked without the network is checked first (the folder, the repository id,
``HF_HUB_OFFLINE``, a token), so a mistake costs no upload; the Hub's refusals come back as
:class:`~smallm.hf.HFError` with what to do about them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from smallm.hf import HFError

__all__ = ["EXPORT_FILES", "check_repo_id", "push_to_hub"]

PathLike = Union[str, "os.PathLike[str]"]
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
"""What a folder needs to be pushed: a model transformers can load, and its tokenizer."""
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")


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
