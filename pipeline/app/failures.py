"""An error the project did not raise itself, said as its cause and what to do, in one line.

A full or read-only disk, a permission, a broker that stopped answering: the CLI prints what
:func:`explain` says instead of a traceback (the traceback is kept in a file, or printed with
``--verbose``). The error may come from a worker thread (the generator's writer, the trainer's
prefetch) that the main thread re-raised, or be a library's own error that only carries the
operating-system error as its context or as text (torch's and safetensors' writers): the whole
cause/context chain is searched. kafka-python's errors are recognised by their module, so that
this layer does not import kafka-python (only the Kafka adapter does).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator

from pipeline.core.topics import FencedError, TransportError

__all__ = ("RERUN", "explain", "os_error_in")

RERUN = "then run the same command again: it resumes exactly"
_ELSEWHERE = "or set storage.root / train.output_dir to another filesystem"
_OS_ADVICE = {
    errno.ENOSPC: ("no space left on device", f"free space, {_ELSEWHERE}"),
    errno.EDQUOT: ("disk quota exceeded", f"free space or raise the quota, {_ELSEWHERE}"),
    errno.EROFS: ("read-only file system", f"remount it read-write, {_ELSEWHERE}"),
    errno.EACCES: ("permission denied", f"fix its permissions or owner, {_ELSEWHERE}"),
    errno.EPERM: ("operation not permitted", f"fix its permissions or owner, {_ELSEWHERE}"),
    errno.EIO: ("input/output error", "check the device (`dmesg`) or the network filesystem"),
}
_WRITES = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS))
# How libraries that swallow the OSError report it: safetensors' "... (os error 28) at path "/x"".
_OS_ERROR_TEXT = re.compile(r"os error (\d+)\)?(?: at path \"([^\"]+)\")?")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def os_error_in(exc: BaseException) -> OSError | None:
    """The operating-system error behind ``exc`` (itself, one in its chain, or one a library
    reported only as text), or None."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno is not None:
            return link
        match = _OS_ERROR_TEXT.search(str(link))
        if match:
            code = int(match[1])
            return OSError(code, os.strerror(code), match[2])
    return None


def _where(exc: BaseException, error: OSError) -> str:
    """The path the error names, else the one a writer noted (``add_note("writing /x")``)."""
    verb = "writing" if error.errno in _WRITES else "on"
    if error.filename:
        return f" {verb} {error.filename}"
    notes = [note for link in _chain(exc) for note in getattr(link, "__notes__", ())]
    return f" {notes[0]}" if notes else ""


def _kafka_error_in(exc: BaseException) -> BaseException | None:
    for link in _chain(exc):
        if isinstance(link, FencedError):
            return None  # another instance took over: its own message says so
        if isinstance(link, TransportError) or type(link).__module__.split(".")[0] == "kafka":
            return link
    return None


def explain(exc: BaseException) -> str | None:
    """Cause and what to do for an error the project did not raise itself; None when it is not
    one this module knows (the caller then names the exception's type and message)."""
    broker = _kafka_error_in(exc)
    if broker is not None:
        text = str(broker) if isinstance(broker, TransportError) else f"{type(broker).__name__}: {broker}"
        return (
            f"the Kafka broker failed ({text}): check that it is up and reachable from here "
            f"(`specstream broker status` for the local one), {RERUN}"
        )
    error = os_error_in(exc)
    if error is None or error.errno not in _OS_ADVICE:
        return None
    cause, advice = _OS_ADVICE[error.errno]
    return f"{cause}{_where(exc, error)}: {advice}, {RERUN}"
