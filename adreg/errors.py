"""Errors by type: what went wrong decides the class, the advice and the exit code.

Everything a user or the environment can get wrong raises an ``AdregError`` subclass whose message says
what is wrong and what to do; the CLI prints it on one line (``--verbose`` adds the original cause, kept as
``__cause__``) and exits with ``exit_code``:

=====================  ====  =======================================================================
class                  exit  when
=====================  ====  =======================================================================
``DataError``          2     a folder, image or mask that cannot be used as given
``ConfigError``        2     an option value that makes no sense
``BackboneError``      2     a backbone that cannot be built or loaded offline
``NotFoundError``      2     an unknown category, version or alias (the message lists what exists)
``StoreUnreachable``   2     the tracking / registry store cannot be reached or opened
``ConflictError``      2     the store refused a write that collides with existing state
``PermissionDenied``   1     the acting user lacks a permission (nothing was changed)
``IntegrityError``     1     a model whose files do not match their recorded digest (refused)
``Interrupted``        130   Ctrl-C or SIGTERM stopped a long command (what it finished is kept)
=====================  ====  =======================================================================

A gate refusing a promotion is not an error: it is a result (``PromoteOutcome.promoted`` is False) and
the CLI exits 1.
"""

import contextlib
import signal
import threading

EXIT_DONE, EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def first_line(exc: BaseException) -> str:
    """The first meaningful line of an exception's message, for a one-line error (SQLAlchemy's "[SQL: ...]"
    and "(Background on this error ...)" lines skipped, at most 300 characters); the class name when empty."""
    for line in str(exc).strip().splitlines():
        line = line.strip()
        if line and not line.startswith(("(Background on this error", "[SQL:")):
            return line[:300]
    return type(exc).__name__


class AdregError(Exception):
    """Base class of errors caused by input or environment, not by a bug."""

    exit_code = EXIT_BAD_INPUT


class DataError(AdregError):
    """A folder, image or mask that cannot be used as given."""


class ImageDecodeError(DataError):
    """Bytes or a file that are not a readable image."""


class BackboneError(AdregError):
    """A backbone that cannot be built or loaded (typically: weights not reachable offline)."""


class ConfigError(AdregError):
    """An option value that makes no sense."""


class RegistryError(AdregError):
    """Something about the model registry that cannot be done as asked (e.g. no earlier version)."""


class NotFoundError(RegistryError):
    """An unknown category, alias or version in the model registry."""


class ConflictError(RegistryError):
    """The store refused a write that collides with existing state."""


class StoreUnreachable(AdregError):
    """The tracking / registry store (server or database) cannot be reached or opened."""


class PermissionDenied(AdregError):
    """The acting user lacks the permission an action needs; nothing was changed."""

    exit_code = EXIT_REFUSED  # a refusal, not bad input


class IntegrityError(AdregError):
    """A model whose artifacts do not match the digest recorded when it was logged; it is refused."""

    exit_code = EXIT_REFUSED


class Interrupted(AdregError):
    """Ctrl-C or SIGTERM stopped a long command; the message says what was kept and that nothing was registered."""

    exit_code = EXIT_INTERRUPTED


@contextlib.contextmanager
def deferred_interrupts():
    """Hold Ctrl-C / SIGTERM until the block is done, then do what the signal would have done (Python's
    Ctrl-C handler, and the CLI's for SIGTERM, raise ``KeyboardInterrupt``; an ignored signal stays ignored).

    For short writes that must not be cut in half (a run created but never ended stays RUNNING in the store
    forever). Outside the main thread (where Python delivers no signals) the block simply runs, and a signal
    whose handler was not installed from Python is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}
    for s in previous:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        handler = previous[caught[0]]
        if handler == signal.SIG_IGN:
            return
        if callable(handler):
            handler(caught[0], None)  # what the signal would have done: default_int_handler raises
        elif handler == signal.SIG_DFL and caught[0] == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
        else:
            raise KeyboardInterrupt
