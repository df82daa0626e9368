"""An Erlang/OTP-style process runtime in which every process is a real OS process.

Public names only; see the modules for the guides:
``runtime.process`` (spawn, send, receive, exit), ``runtime.monitor``,
``runtime.link``, ``runtime.registry`` (names), ``runtime.gen_server``,
``runtime.agent``, ``runtime.supervisor``, ``runtime.dynamic_supervisor``.
Timeouts are in seconds.
"""

from .agent import Agent
from .aio import acall, areceive, astop
from .dynamic_supervisor import DynamicSupervisor
from .errors import (
    AlreadyRegisteredError,
    CallTimeout,
    Crash,
    ExitError,
    InvalidChildSpec,
    NoProcError,
    ProcessError,
    ReceiveTimeout,
    StartError,
    is_clean_exit,
)
from .gen_server import GenServer, NoReply, Reply, Stop, call, cast, reply, stop
from .messages import Down, Exit
from .pid import Pid, Ref
from .process import (
    DEFAULT_TIMEOUT,
    Config,
    SystemInfo,
    configure,
    demonitor,
    exit,
    info,
    is_alive,
    keep_warm,
    link,
    monitor,
    options,
    processes,
    receive,
    self,
    send,
    shutdown,
    spawn,
    spawn_monitor,
    system_info,
    trap_exit,
    unlink,
)
from .registry import register, unregister, whereis
from .supervisor import Supervisor

__all__ = [
    "Agent",
    "AlreadyRegisteredError",
    "CallTimeout",
    "Config",
    "Crash",
    "DEFAULT_TIMEOUT",
    "Down",
    "DynamicSupervisor",
    "Exit",
    "ExitError",
    "GenServer",
    "InvalidChildSpec",
    "NoProcError",
    "NoReply",
    "Pid",
    "ProcessError",
    "ReceiveTimeout",
    "Ref",
    "Reply",
    "StartError",
    "Stop",
    "Supervisor",
    "SystemInfo",
    "acall",
    "areceive",
    "astop",
    "call",
    "cast",
    "configure",
    "demonitor",
    "exit",
    "info",
    "is_alive",
    "is_clean_exit",
    "keep_warm",
    "link",
    "monitor",
    "options",
    "processes",
    "receive",
    "register",
    "reply",
    "self",
    "send",
    "shutdown",
    "spawn",
    "spawn_monitor",
    "stop",
    "system_info",
    "trap_exit",
    "unlink",
    "unregister",
    "whereis",
]
