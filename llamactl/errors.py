"""The one error hierarchy of llamactl and the exit codes it maps to.

The CLI turns a LlamactlError into one line on stderr and `exit_code`; the
proxy turns it into an OpenAI-shaped error body. Nothing else catches them.
"""

from __future__ import annotations

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

    exit_code: ExitCode = ExitCode.FAILURE

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

    exit_code = ExitCode.USAGE


class NameTaken(UsageError):
    """An instance of that name is live (started by another llamactl, perhaps a moment ago)."""


class GGUFError(UsageError):
    """A file that is not a readable GGUF model (names the file and the fault)."""


class UnsupportedModelError(UsageError):
    """A valid GGUF whose architecture or settings llamactl cannot estimate."""


class NoFitError(LlamactlError):
    """The model does not fit the inventory."""

    exit_code = ExitCode.NO_FIT


class ServerBinaryError(LlamactlError):
    """llama-server is missing, does not run, or lacks a flag llamactl needs."""

    exit_code = ExitCode.SERVER_BINARY


class NoRoomYet(LlamactlError):
    """The model would fit better than it can now: memory it needs is held by instances that may free it
    (busy, starting or stopping). The proxy waits for them (bounded); `holders` names them."""

    exit_code = ExitCode.NO_FIT

    def __init__(self, message: str, holders: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.holders = holders


class LaunchError(LlamactlError):
    """llama-server did not become ready; carries the log's tail. The subclass says why (the proxy and the
    exit code go by the type, never by the message)."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class ExitedEarly(LaunchError):
    """llama-server exited before it was ready (a bad flag, a bad file, a port taken meanwhile...)."""


class OutOfMemoryAtLoad(ExitedEarly):
    """llama-server exited while allocating its buffers: the plan asked for more than the device had."""

    exit_code = ExitCode.NO_FIT


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


class ProxyError(LlamactlError):
    """An error the proxy answers with OpenAI's envelope: {"error": {"message", "type", "code"}}."""

    http_status = 500
    kind = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownModelError(ProxyError):
    http_status, kind, code = 404, "invalid_request_error", "model_not_found"


class QueueFullError(ProxyError):
    http_status, kind, code = 429, "rate_limit_error", "queue_full"


class ModelUnavailableError(ProxyError):
    """No fit, or every instance slot is busy."""

    http_status, kind, code = 503, "server_error", "model_unavailable"


class RequestTimeoutError(ProxyError):
    """The client did not send its request body in time."""

    http_status, kind, code = 408, "invalid_request_error", "request_timeout"


class LoadTimeoutError(ProxyError):
    http_status, kind, code = 504, "server_error", "load_timeout"


class UpstreamError(ProxyError):
    http_status, kind, code = 502, "server_error", "upstream_error"


class AuthError(ProxyError):
    http_status, kind, code = 401, "invalid_request_error", "invalid_api_key"


class ForbiddenError(ProxyError):
    """A browser's request from a page the proxy does not serve (Host or Origin not allowed)."""

    http_status, kind, code = 403, "invalid_request_error", "forbidden"


class UnsupportedMediaError(ProxyError):
    """A state-changing request whose body is not declared JSON (a page's "simple" cross-site request)."""

    http_status, kind, code = 415, "invalid_request_error", "unsupported_media_type"


class StateError(LlamactlError):
    """The state dir cannot be used (permissions, not a directory)."""


class PlantedFileError(StateError):
    """A path in the state dir is not a regular file of ours (a FIFO, a symlink, a directory, a device)."""

    def __init__(self, path: object, what: str) -> None:
        super().__init__(f"{path}: {what}, not a regular file; remove it (llamactl never reads through it)")
        self.path, self.what = path, what


class RemoteError(LlamactlError):
    """A remote proxy (`top --url`) could not be read: refused, timed out, not JSON, the wrong shape."""


class BodyTooLargeError(ProxyError):
    """A request body over a bound: of bytes (max_body) or of JSON values."""

    http_status, kind, code = 413, "invalid_request_error", "request_too_large"
