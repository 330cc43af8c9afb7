"""llmvisor in-process: one server per model, started once, shared, and never left behind.

    import llmvisor

    sup = llmvisor.Supervisor("llmvisor.toml")
    url = sup.ensure_server_running("gemma", log_callback=print)
    ...
    sup.close()

The supervision itself is the Rust core (``llmvisor._native``); this module adds the context
managers, the asyncio face, the per-process global manager and the exit hook.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import threading
import weakref

from . import _native
from ._native import (
    ClosedError,
    ConfigError,
    Lease,
    LlmvisorError,
    StartError,
    StartTimeoutError,
    UnknownModelError,
)

__all__ = [
    "Supervisor",
    "Lease",
    "get_global_server_manager",
    "LlmvisorError",
    "ConfigError",
    "UnknownModelError",
    "StartError",
    "StartTimeoutError",
    "ClosedError",
]

# Every open Supervisor of this process, closed at interpreter exit.
_open: "weakref.WeakSet[Supervisor]" = weakref.WeakSet()
_open_lock = threading.Lock()


class Supervisor:
    """The supervisor of one config, running inside this process.

    ``Supervisor(path)`` reads a config file; ``Supervisor(config_text=..., state_dir=...)``
    takes the config as text. ``state_dir`` overrides the config's. Raises ``ConfigError``
    (the text ``llmvisor check`` prints) for an invalid config.
    """

    def __init__(self, path=None, *, config_text=None, state_dir=None):
        if path is not None:
            path = os.fspath(path)
        if state_dir is not None:
            state_dir = os.fspath(state_dir)
        self._native = _native.Supervisor(path, config_text=config_text, state_dir=state_dir)
        self._pid = os.getpid()
        with _open_lock:
            _open.add(self)

    def ensure_server_running(self, model, log_callback=None, timeout=None):
        """Starts ``model`` if needed, waits until it is ready, returns its base URL.

        The server is kept up until ``shutdown_server(model)`` or ``close()``. While it loads,
        ``log_callback(line)`` gets each line of its output (on this thread, never after the
        call returns; joining a start under way, its lines so far first). ``timeout``
        (seconds) bounds the wait; the start goes on regardless.
        """
        return self._native.ensure_server_running(model, log_callback, timeout)

    def shutdown_server(self, model, force=False, timeout=None):
        """Stops ``model``'s server: once its leases end, or at once with ``force=True``."""
        self._native.shutdown_server(model, force, timeout)

    def lease(self, model, timeout=120):
        """A lease on ``model`` (started if needed): ``with sup.lease("m") as lease: lease.url``."""
        return self._native.lease(model, timeout)

    async def acquire(self, model, timeout=120):
        """``await sup.acquire(model)``: a ``Lease``, waited for on a worker thread."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, functools.partial(self._native.lease, model, timeout))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker thread cannot be interrupted: release what it obtains.
            future.add_done_callback(_release_result)
            raise

    @contextlib.asynccontextmanager
    async def lease_async(self, model, timeout=120):
        """``async with sup.lease_async(model) as lease: ...``"""
        lease = await self.acquire(model, timeout)
        try:
            yield lease
        finally:
            lease.release()

    def status(self):
        """Every model's status, as ``GET /api/models`` answers it (a list of dicts)."""
        return self._native.status()

    def logs(self, model):
        """The model's recent server output, a list of lines (oldest first)."""
        return self._native.logs(model)

    def models(self):
        """The configured model ids."""
        return self._native.models()

    @property
    def state_dir(self):
        return self._native.state_dir

    @property
    def instance_id(self):
        return self._native.instance_id

    @property
    def closed(self):
        return self._native.closed

    def close(self):
        """Stops every server this Supervisor started and waits for them (idempotent)."""
        if os.getpid() != self._pid:
            return  # a forked child: the servers are the parent's
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        native = getattr(self, "_native", None)
        return repr(native) if native is not None else "<llmvisor.Supervisor (not created)>"


def _release_result(future):
    if not future.cancelled() and future.exception() is None:
        future.result().release()


_global = None
_global_lock = threading.Lock()


def get_global_server_manager(path=None, *, config_text=None, state_dir=None):
    """The process-wide Supervisor, made from these arguments by the first call.

    Thread-safe. Later calls return the same object; a call naming another config raises
    ``ValueError``. After ``close()`` the next call makes a new one.
    """
    global _global
    key = (None if path is None else os.path.abspath(os.fspath(path)), config_text,
           None if state_dir is None else os.fspath(state_dir))
    with _global_lock:
        if _global is not None:
            sup, made_with, pid = _global
            if pid == os.getpid() and not sup.closed:
                if key != made_with and key != (None, None, None):
                    raise ValueError(
                        "the global llmvisor manager was made from another config "
                        f"({made_with[0] or 'config_text'}); close() it first"
                    )
                return sup
        sup = Supervisor(path, config_text=config_text, state_dir=state_dir)
        _global = (sup, key, os.getpid())
        return sup


@atexit.register
def _close_all():
    with _open_lock:
        sups = list(_open)
    for sup in sups:
        with contextlib.suppress(Exception):
            sup.close()
