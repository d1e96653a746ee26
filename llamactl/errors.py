"""The one error hierarchy of llamactl, and the one table (FAILURES) of what each failure becomes.

Every error class is here. The CLI turns a LlamactlError into one line on stderr
and its exit code; the proxy turns it into an OpenAI-shaped error body with its
HTTP status. Both read FAILURES (documented in docs/usage.md, "Error types"):
an HTTP status is 4xx only where the client's request is at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes (docs/usage.md)."""

    OK = 0
    FAILURE = 1  # a runtime failure or an internal error
    USAGE = 2  # bad usage or input: flags, sizes, files that are not GGUF
    PARTIAL_FIT = 3  # plan: runs only partially offloaded or on the CPU
    NO_FIT = 4  # the model does not fit the inventory at all
    SERVER_BINARY = 5  # no usable llama-server, or it lacks a flag llamactl needs
    INTERRUPTED = 130


class LlamactlError(Exception):
    """Base of every error llamactl reports to a user: one line, whatever text from its input it quotes."""

    @property
    def exit_code(self) -> ExitCode:
        return failure_of(self).exit_code

    def __str__(self) -> str:
        return one_line(super().__str__())


def one_line(text: str, limit: int = 2000) -> str:
    """Control characters escaped (a newline in a key, a name or a path cannot start a second line), long
    text cut in the middle."""
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in text):
        text = "".join(c if not (ord(c) < 32 or 0x7F <= ord(c) < 0xA0) else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        text = f"{text[:limit // 2]}...({len(text) - limit} characters)...{text[-limit // 2:]}"
    return text


class UsageError(LlamactlError):
    """Bad flags or values given by the user."""


class NameTaken(UsageError):
    """An instance of that name is live (started by another llamactl, perhaps a moment ago)."""


class GGUFError(UsageError):
    """A file that is not a readable GGUF model (names the file and the fault)."""


class UnsupportedModelError(UsageError):
    """A valid GGUF whose architecture or settings llamactl cannot estimate."""


class NoFitError(LlamactlError):
    """The model does not fit the inventory."""


class SpillRefused(NoFitError):
    """The model has `spill = false` and would run partially or wholly on the CPU: refused, with the reasons."""


class ServerBinaryError(LlamactlError):
    """llama-server is missing, does not run, or lacks a flag llamactl needs."""


class NoRoomYet(LlamactlError):
    """The model would fit better than it can now: memory it needs is held by instances that may free it
    (busy, starting or stopping). The proxy waits for them (bounded); `holders` names them."""

    def __init__(self, message: str, holders: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.holders = holders


class ConfigError(UsageError):
    """A config file that cannot be read or holds a bad key or value (names the file and the key)."""


class LaunchError(LlamactlError):
    """llama-server did not become ready. The subclass says why (the proxy and the exit code go by the type,
    never by the message). `log_tail`: the log's last lines, for the user; `log_text`: the whole log of this
    load where the launcher read it (learning reads the buffer sizes and the failed allocation from it)."""

    def __init__(self, message: str, log_tail: str = "", *, log_text: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail
        self.log_text = log_text or log_tail


class ExitedEarly(LaunchError):
    """llama-server exited before it was ready (a bad flag, a bad file, a port taken meanwhile...)."""


class OutOfMemoryAtLoad(ExitedEarly):
    """llama-server exited while allocating its buffers: the plan asked for more than the device had."""


class KilledWhileLoading(OutOfMemoryAtLoad):
    """llama-server was killed by SIGKILL while loading, by nobody of ours: most likely the kernel's
    out-of-memory killer. `event` says what happened without that guess (the launcher drops the guess
    when the host had memory to spare)."""

    def __init__(self, after_s: float, log_tail: str = "", *, log_text: str = "") -> None:
        self.event = f"llama-server was killed by SIGKILL after {after_s:.1f} s while loading"
        super().__init__(f"{self.event} (the kernel's out-of-memory killer, most likely)", log_tail, log_text=log_text)


class NotReadyInTime(LaunchError):
    """llama-server still ran, but missed its readiness deadline (it was stopped)."""


# what llama.cpp logs when a buffer cannot be allocated (ggml-backend, CUDA, the host)
OOM_MARKERS = ("out of memory", "failed to allocate", "unable to allocate", "cudamalloc failed",
               "failed to create context", "cannot allocate memory")


def exited_early(message: str, log_tail: str) -> ExitedEarly:
    """The right ExitedEarly for a log tail: out of memory when llama.cpp said so."""
    lowered = log_tail.lower()
    if any(marker in lowered for marker in OOM_MARKERS):
        return OutOfMemoryAtLoad(message + " (out of memory while loading)", log_tail)
    return ExitedEarly(message, log_tail)


class PlanOvertaken(LlamactlError):
    """Another launch recorded its claim on the memory this launch planned for, between the plan and the
    record: the launcher plans again (and gives up with this error after many tries)."""


class LaunchInterrupted(LlamactlError):
    """Ctrl-C while starting an instance: what was started has been stopped."""


class StateError(LlamactlError):
    """The state dir cannot be used (permissions, not a directory, a newer schema)."""


class PlantedFileError(StateError):
    """A path in the state dir is not a regular file of ours (a FIFO, a symlink, a directory, a device)."""

    def __init__(self, path: object, what: str) -> None:
        super().__init__(f"{path}: {what}, not a regular file; remove it (llamactl never reads through it)")
        self.path, self.what = path, what


class CalibrationError(LlamactlError):
    """The calibration store cannot be used (a link, damaged, a newer schema)."""


class RemoteError(LlamactlError):
    """A remote proxy (`top --url`) could not be read: refused, timed out, not JSON, the wrong shape."""


class ProxyError(LlamactlError):
    """An error only the proxy raises, answered with OpenAI's envelope: {"error": {"message", "type", "code"}}."""

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadRequestError(ProxyError):
    """A request body that is not JSON, or names no model."""


class AuthError(ProxyError):
    """No valid API key."""


class ForbiddenError(ProxyError):
    """A browser's request from a page the proxy does not serve (Host or Origin not allowed)."""


class UnknownModelError(ProxyError):
    """A model no config names."""


class RequestTimeoutError(ProxyError):
    """The client did not send its request body in time."""


class BodyTooLargeError(ProxyError):
    """A request body over a bound: of bytes (max_body) or of JSON values."""


class UnsupportedMediaError(ProxyError):
    """A state-changing request whose body is not declared JSON (a page's "simple" cross-site request)."""


class QueueFullError(ProxyError):
    """More requests wait for a model than max_queue allows."""


class UpstreamError(ProxyError):
    """The instance exited while starting, or cannot be reached."""


class ModelUnavailableError(ProxyError):
    """No fit, out of memory at load, no seat, or memory that did not come free in time."""


class LoadTimeoutError(ProxyError):
    """The instance was not ready within load_timeout."""


class NotRunningError(ProxyError):
    """A read-only route (`/props`, `/slots`) for a model that is not running: it is not started for a look."""


class IllegalTransition(Exception):
    """A status or slot-phase change the lifecycle does not allow: a bug in llamactl, never the user's (not a
    LlamactlError: reported as an internal error)."""


@dataclass(frozen=True)
class Failure:
    """What a failure becomes: the CLI's exit code, the proxy's HTTP status and OpenAI error code."""

    exit_code: ExitCode
    http_status: int  # 4xx: the client's request is at fault; 5xx: the proxy's side (config, state, llama-server)
    code: str


_INTERNAL = Failure(ExitCode.FAILURE, 500, "internal_error")
_UNAVAILABLE = "model_unavailable"

# every error class, its own row (a subclass defined elsewhere, as in tests, takes its nearest parent's)
FAILURES: dict[type[BaseException], Failure] = {
    LlamactlError: _INTERNAL,
    UsageError: Failure(ExitCode.USAGE, 500, "internal_error"),
    ConfigError: Failure(ExitCode.USAGE, 500, "internal_error"),
    NameTaken: Failure(ExitCode.USAGE, 503, _UNAVAILABLE),
    GGUFError: Failure(ExitCode.USAGE, 503, _UNAVAILABLE),
    UnsupportedModelError: Failure(ExitCode.USAGE, 503, _UNAVAILABLE),
    NoFitError: Failure(ExitCode.NO_FIT, 503, _UNAVAILABLE),
    SpillRefused: Failure(ExitCode.NO_FIT, 503, _UNAVAILABLE),
    NoRoomYet: Failure(ExitCode.NO_FIT, 503, _UNAVAILABLE),
    ServerBinaryError: Failure(ExitCode.SERVER_BINARY, 503, _UNAVAILABLE),
    LaunchError: Failure(ExitCode.FAILURE, 502, "upstream_error"),
    ExitedEarly: Failure(ExitCode.FAILURE, 502, "upstream_error"),
    OutOfMemoryAtLoad: Failure(ExitCode.NO_FIT, 503, _UNAVAILABLE),
    KilledWhileLoading: Failure(ExitCode.NO_FIT, 503, _UNAVAILABLE),
    NotReadyInTime: Failure(ExitCode.FAILURE, 504, "load_timeout"),
    PlanOvertaken: Failure(ExitCode.FAILURE, 503, _UNAVAILABLE),
    LaunchInterrupted: Failure(ExitCode.INTERRUPTED, 503, _UNAVAILABLE),
    StateError: _INTERNAL,
    PlantedFileError: _INTERNAL,
    CalibrationError: _INTERNAL,
    RemoteError: Failure(ExitCode.FAILURE, 502, "upstream_error"),
    ProxyError: _INTERNAL,
    BadRequestError: Failure(ExitCode.FAILURE, 400, "bad_request"),
    AuthError: Failure(ExitCode.FAILURE, 401, "invalid_api_key"),
    ForbiddenError: Failure(ExitCode.FAILURE, 403, "forbidden"),
    UnknownModelError: Failure(ExitCode.FAILURE, 404, "model_not_found"),
    RequestTimeoutError: Failure(ExitCode.FAILURE, 408, "request_timeout"),
    BodyTooLargeError: Failure(ExitCode.FAILURE, 413, "request_too_large"),
    UnsupportedMediaError: Failure(ExitCode.FAILURE, 415, "unsupported_media_type"),
    QueueFullError: Failure(ExitCode.FAILURE, 429, "queue_full"),
    NotRunningError: Failure(ExitCode.FAILURE, 503, "model_not_running"),
    UpstreamError: Failure(ExitCode.FAILURE, 502, "upstream_error"),
    ModelUnavailableError: Failure(ExitCode.FAILURE, 503, _UNAVAILABLE),
    LoadTimeoutError: Failure(ExitCode.FAILURE, 504, "load_timeout"),
    IllegalTransition: _INTERNAL,
}


def failure_of(exc: BaseException | type[BaseException]) -> Failure:
    """The row of an error (or error class): its own, else its nearest parent's; an exception llamactl does not
    know is an internal error (a bug)."""
    cls = exc if isinstance(exc, type) else type(exc)
    return next((FAILURES[c] for c in cls.__mro__ if c in FAILURES), _INTERNAL)


def http_status(exc: BaseException) -> int:
    """The proxy's HTTP status for a failure: 4xx only where the client's request is at fault."""
    return failure_of(exc).http_status


def openai_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def type_name(exc: BaseException | type[BaseException]) -> str:
    """The error's `type` in `--json` output and docs/usage.md: its class name in snake case without "Error"
    (UsageError → usage, GGUFError → gguf); `internal` for an exception llamactl does not know (a bug)."""
    cls = exc if isinstance(exc, type) else type(exc)
    if not issubclass(cls, LlamactlError):
        return "internal"
    name = cls.__name__.removesuffix("Error") or cls.__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
