"""Type stubs of the llmvisor package."""

import os
import pathlib
from types import TracebackType
from typing import Any, AsyncContextManager, Callable, Dict, List, Optional, Type, Union, final

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

_Path = Union[str, "os.PathLike[str]"]

class LlmvisorError(Exception):
    """Base class of llmvisor's errors (UnknownModelError and StartTimeoutError excepted)."""

class ConfigError(LlmvisorError):
    """The config is invalid: the text `llmvisor check` prints (file:line:col: error: ...)."""

class UnknownModelError(KeyError):
    """No model has this id or alias; the message names the known models."""
    model: str
    known: List[str]

class StartError(LlmvisorError):
    """The server could not be started (or the model is unavailable)."""
    model: str
    reason: Optional[str]
    log_tail: List[str]

class StartTimeoutError(TimeoutError):
    """The model did not become ready in time."""
    model: str
    log_tail: List[str]

class ClosedError(LlmvisorError):
    """The Supervisor was closed."""

@final
class Lease:
    """While it lives, its model's server is not stopped."""
    @property
    def url(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def active(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> "Lease": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Supervisor:
    def __init__(
        self,
        path: Optional[_Path] = None,
        *,
        config_text: Optional[str] = None,
        state_dir: Optional[_Path] = None,
    ) -> None: ...
    def ensure_server_running(
        self,
        model: str,
        log_callback: Optional[Callable[[str], Any]] = None,
        timeout: Optional[float] = None,
    ) -> str: ...
    def shutdown_server(
        self, model: str, force: bool = False, timeout: Optional[float] = None
    ) -> None: ...
    def lease(self, model: str, timeout: Optional[float] = 120) -> Lease: ...
    async def acquire(self, model: str, timeout: Optional[float] = 120) -> Lease: ...
    def lease_async(
        self, model: str, timeout: Optional[float] = 120
    ) -> AsyncContextManager[Lease]: ...
    def status(self) -> List[Dict[str, Any]]: ...
    def logs(self, model: str) -> List[str]: ...
    def models(self) -> List[str]: ...
    @property
    def state_dir(self) -> pathlib.Path: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Supervisor": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

def get_global_server_manager(
    path: Optional[_Path] = None,
    *,
    config_text: Optional[str] = None,
    state_dir: Optional[_Path] = None,
) -> Supervisor: ...
