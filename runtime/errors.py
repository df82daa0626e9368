"""Exit reasons and the exception tree of the runtime.

Exit reasons are plain picklable values, as in OTP:

- ``"normal"``: the process returned, or stopped on purpose;
- ``"shutdown"`` and ``("shutdown", detail)``: a supervisor or the node stopped it;
- ``"killed"``: SIGKILL ended it (``exit(pid, "kill")``, or a kill from outside);
- ``"SIGTERM"``, ``"SIGSEGV"``, ...: another signal ended it (the signal's name);
- ``"noproc"``: the process did not exist when it was monitored or called;
- ``("exit_code", n)``: the OS process ended with status ``n`` without going
  through the runtime (``os._exit(n)`` in user code);
- :class:`Crash`: an exception escaped the process's code;
- any other picklable value given to ``exit`` or ``Stop``.

:func:`is_clean_exit` is the single rule for "not logged, and a transient child
is not restarted".

Exceptions are for callers. They form one tree under :class:`ProcessError`;
receive timeouts raise :class:`ReceiveTimeout`, a :class:`TimeoutError`.
"""

from __future__ import annotations

import reprlib as _reprlib
import traceback as _traceback
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AlreadyRegisteredError",
    "CallTimeout",
    "Crash",
    "ExitError",
    "InvalidChildSpec",
    "NoProcError",
    "ProcessError",
    "ReceiveTimeout",
    "RemoteTraceback",
    "StartError",
    "is_clean_exit",
]


@dataclass(frozen=True)
class Crash:
    """Exit reason of a process whose code raised an exception.

    Attributes:
        exc_type: the exception class, e.g. ``"KeyError"`` for a built-in one,
            ``"json.decoder.JSONDecodeError"`` for any other.
        message: ``str()`` of the exception.
        traceback: the formatted traceback, as text, from the process that crashed.
    """

    exc_type: str
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> Crash:
        """Build the reason for ``exc``, with its traceback formatted in this process."""
        kind = type(exc)
        name = kind.__qualname__
        if kind.__module__ not in ("builtins", "__main__"):
            name = f"{kind.__module__}.{name}"
        text = "".join(_traceback.format_exception(kind, exc, exc.__traceback__))
        return cls(name, str(exc), text)

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type

    def __repr__(self) -> str:
        return f"Crash({self.exc_type}: {self.message!r})"


def is_clean_exit(reason: Any) -> bool:
    """True for ``"normal"``, ``"shutdown"`` and ``("shutdown", detail)``.

    Clean exits are not logged, and a transient child that exits cleanly is not
    restarted (the Elixir rule).
    """
    if reason == "normal" or reason == "shutdown":
        return True
    return isinstance(reason, tuple) and len(reason) == 2 and reason[0] == "shutdown"


class RemoteTraceback(Exception):
    """Carries the formatted traceback of another process as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text.rstrip() + "\n"


def _with_remote_cause(exc: ProcessError, reason: Any) -> ProcessError:
    if isinstance(reason, Crash):
        exc.__cause__ = RemoteTraceback(reason.traceback)
    return exc


# What an error message shows of a value (a request can be megabytes): its repr, cut.
_short = _reprlib.Repr()
_short.maxstring = _short.maxother = 200
_short.maxlong = 60


class ProcessError(Exception):
    """Base of every error the runtime raises to a caller."""

    _init_args: tuple[Any, ...] | None = None

    def __reduce__(self) -> Any:
        # Errors travel between processes (a supervisor's reply): rebuild them with the
        # arguments they were made with, not with their message.
        if self._init_args is None:
            return super().__reduce__()
        return (type(self), self._init_args)


class NoProcError(ProcessError):
    """The target does not exist: it is dead, never existed, or the name is unregistered.

    What to do: look the process up again (``whereis``), or start it.
    """

    def __init__(self, target: Any, detail: str = "") -> None:
        self._init_args = (target, detail)
        self.target = target
        text = f"no process: {target!r}"
        super().__init__(f"{text} ({detail})" if detail else text)


class CallTimeout(ProcessError, TimeoutError):
    """No reply arrived within the timeout; the server may still be working.

    A reply that arrives later is discarded: it never reaches a later call.
    """

    def __init__(self, target: Any, request: Any, timeout: float) -> None:
        self._init_args = (target, request, timeout)
        self.target = target
        self.request = request
        self.timeout = timeout
        super().__init__(f"call to {target!r} timed out after {timeout}s (request "
                         f"{_short.repr(request)})")


class ExitError(ProcessError):
    """The target exited before it replied. ``reason`` is its true exit reason.

    For a :class:`Crash`, ``__cause__`` holds the remote traceback.
    """

    def __init__(self, target: Any, reason: Any, action: str = "call") -> None:
        self._init_args = (target, reason, action)
        self.target = target
        self.reason = reason
        super().__init__(f"{target!r} exited during {action}: {reason!s}")
        _with_remote_cause(self, reason)


class StartError(ProcessError):
    """A process failed to start: its ``init`` raised, returned a stop, or timed out.

    ``reason`` is the exit reason; for a :class:`Crash`, ``__cause__`` holds the
    remote traceback.
    """

    def __init__(self, what: Any, reason: Any) -> None:
        self._init_args = (what, reason)
        self.reason = reason
        super().__init__(f"{what} failed to start: {reason!s}")
        _with_remote_cause(self, reason)


class AlreadyRegisteredError(ProcessError):
    """The name is taken by a live process (``pid``)."""

    def __init__(self, name: str, pid: Any) -> None:
        self._init_args = (name, pid)
        self.name = name
        self.pid = pid
        super().__init__(f"name {name!r} is already registered to {pid!r}")


class InvalidChildSpec(ProcessError, ValueError):
    """A child spec or a supervisor option is invalid; ``field`` names which one."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self._init_args = (field, value, expected)
        self.field = field
        self.value = value
        super().__init__(f"invalid {field}: {value!r} (expected {expected})")


class ReceiveTimeout(TimeoutError):
    """``receive`` found no matching message within its timeout."""
