"""Fetching weights and data from the Hugging Face Hub: one clear error, saying how to mend it, when they cannot be."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from mmfl.quiet import drop_root_messages

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """Weights or data that cannot be fetched (no network, an unknown or gated id) or read (an unreadable file).

    The message names the resource, the reason, and how to mend it; the command line prints it and exits 2.
    """


def _cache_dirs() -> str:
    import datasets.config
    import huggingface_hub.constants

    hub, data = huggingface_hub.constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE
    return f"HF_HUB_CACHE={hub}, HF_DATASETS_CACHE={data}"


def _reason(e: BaseException) -> str:
    """Why a fetch failed, in the user's terms: gated, unknown id, or no network and no cached copy."""
    import huggingface_hub.constants
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    text = str(e)
    if isinstance(e, GatedRepoError) or "gated" in text.lower():
        return (
            "it is gated: accept its terms on huggingface.co with your account, then run `hf auth login` "
            "(or set HF_TOKEN)"
        )
    if isinstance(e, RepositoryNotFoundError) or "not a valid model identifier" in text:
        return "no such repository on the Hub (ids are case-sensitive; a private one needs `hf auth login`)"
    if isinstance(e, OfflineModeIsEnabled) or "offline" in text.lower() or huggingface_hub.constants.HF_HUB_OFFLINE:
        return (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the local cache has no copy "
            f"({_cache_dirs()})"
        )
    return (
        "the Hub cannot be reached from this machine (or the id does not exist) and the local cache has no copy "
        f"({_cache_dirs()}). On a machine with network, the same command fills that cache; copy it here and point "
        "HF_HOME at it (HF_HUB_OFFLINE=1 then uses only the cache)"
    )


def is_fetch_error(e: BaseException) -> bool:
    """True for the errors the Hub clients (huggingface_hub, datasets, transformers, open_clip) raise when
    something cannot be fetched or found: connection errors, missing repositories or files, gated repositories."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, ConnectionError | TimeoutError | EntryNotFoundError | HfHubHTTPError | OfflineModeIsEnabled):
        return True
    if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests", "httpx", "urllib3"):
        return isinstance(e, OSError)
    text = str(e)
    return isinstance(e, RuntimeError | OSError) and any(
        s in text
        for s in (
            "Failed to download",  # open_clip
            "couldn't connect to",  # transformers
            "We couldn't connect",
            "not a valid model identifier",
            "Couldn't reach",  # datasets
            "gated repo",
        )
    )


@contextmanager
def fetching(what: str, mend: str) -> Iterator[None]:
    """Turn a failed fetch of ``what`` inside the block into :class:`Unavailable` (naming ``what``, the reason and
    ``mend``, the local alternative); every other error passes through unchanged."""
    try:
        with drop_root_messages("Failed to download"):  # open_clip logs what the error below repeats
            yield
    except Unavailable:
        raise
    except Exception as e:
        if not is_fetch_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unavailable(f"cannot fetch {what}: {_reason(e)}; or {mend}. ({type(e).__name__}: {first:.200})") from e


@contextmanager
def held_back(logger: str) -> Iterator[list[str]]:
    """Within the block, the records of ``logger`` (and its children) are collected into the yielded list instead
    of being shown: a library's own error line that mmfl's one message repeats (and may quote)."""
    collected: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            collected.append(record.getMessage())

    target, handler = logging.getLogger(logger), Collect()
    propagate = target.propagate
    target.addHandler(handler)
    target.propagate = False
    try:
        yield collected
    finally:
        target.removeHandler(handler)
        target.propagate = propagate
