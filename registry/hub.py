"""The Hugging Face Hub via huggingface_hub: metadata, file lists, URLs, auth, typed errors."""

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from huggingface_hub import HfApi, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from .errors import PullError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit: sha256 is the LFS oid (None for small git files)."""

    path: str
    size_bytes: int
    sha256: str | None
    blob_id: str


@dataclass(frozen=True)
class RepoSnapshot:
    repo: str
    commit: str
    gated: bool
    files: list[RemoteFile]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of whichever HTTP library huggingface_hub uses."""
    errors: list[type[BaseException]] = []
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                   ("requests", "RequestException")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(__import__(module_name), attribute))
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Hub:
    """A Hub endpoint (HF_ENDPOINT or huggingface.co) and token (HF_TOKEN or the saved login)."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, insecure=False):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        url = urlsplit(self.endpoint)
        if url.scheme not in ("http", "https"):
            raise PullError(f"HF_ENDPOINT {self.endpoint!r} must be an http(s) URL")
        if url.scheme == "http" and not insecure and not _is_loopback(url.hostname):
            raise PullError(
                f"refusing plain-http hub endpoint {self.endpoint}: pass insecure=True to allow it"
            )
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token, library_name="krasis")

    def has_token(self) -> bool:
        return bool(self.token or get_token())

    def snapshot(self, repo: str, revision: str | None) -> RepoSnapshot:
        """Resolve revision (default main) to a commit and list that commit's files."""
        with self.errors(repo, revision):
            info = self.api.model_info(repo, revision=revision or "main")
            if not info.sha:
                raise PullError(f"the hub gave no commit for {repo}@{revision or 'main'}")
            tree = self.api.list_repo_tree(repo, revision=info.sha, recursive=True)
            files = [
                RemoteFile(
                    path=entry.path,
                    size_bytes=int(entry.size),
                    sha256=entry.lfs.sha256 if entry.lfs else None,
                    blob_id=entry.blob_id,
                )
                for entry in tree
                if hasattr(entry, "blob_id") and hasattr(entry, "size")
            ]
        return RepoSnapshot(repo=repo, commit=info.sha, gated=bool(info.gated), files=files)

    def file_url(self, repo: str, commit: str, path: str) -> str:
        return hf_hub_url(repo, path, revision=commit, endpoint=self.endpoint)

    def headers(self) -> dict[str, str]:
        return build_hf_headers(token=self.token, library_name="krasis")

    @contextlib.contextmanager
    def stream(self, url: str, headers: dict[str, str]) -> Iterator:
        """A streaming GET through huggingface_hub's session; its typed errors on failure."""
        with get_session().stream(
            "GET", url, headers=headers, timeout=REQUEST_TIMEOUT_S
        ) as response:
            if response.status_code >= 400 and response.status_code != 416:
                hf_raise_for_status(response)
            yield response

    @contextlib.contextmanager
    def errors(self, repo: str, revision: str | None = None) -> Iterator[None]:
        """Turn huggingface_hub's typed errors into PullError with a message a user can act on."""
        try:
            yield
        except GatedRepoError as exc:
            raise PullError(
                f"{repo} is a gated repo: accept its terms on the Hub, then set HF_TOKEN "
                f"to a token of that account ({_first_line(exc)})"
            ) from exc
        except RevisionNotFoundError as exc:
            raise PullError(f"revision {revision!r} not found in {repo}") from exc
        except RepositoryNotFoundError as exc:
            raise PullError(
                f"model repo {repo} not found on {self.endpoint} "
                "(if it is private, set HF_TOKEN)"
            ) from exc
        except OfflineModeIsEnabled as exc:
            raise PullError(f"cannot pull {repo}: HF_HUB_OFFLINE is set") from exc
        except HfHubHTTPError as exc:
            raise PullError(f"hub error for {repo}: {_first_line(exc)}") from exc
        except TRANSPORT_ERRORS as exc:
            raise PullError(f"connection to {self.endpoint} failed ({repo}): {exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
