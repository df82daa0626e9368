"""The public surface of ``runtime`` is exactly what the contract names."""

import runtime

PUBLIC = {
    "AlreadyRegisteredError", "CallTimeout", "Crash", "Down", "Exit", "ExitError",
    "GenServer", "InvalidChildSpec", "NoProcError", "NoReply", "Pid", "ProcessError",
    "ReceiveTimeout", "Ref", "Reply", "StartError", "Stop", "call", "cast", "configure",
    "demonitor", "exit", "is_alive", "is_clean_exit", "link", "monitor", "receive",
    "register", "reply", "self", "send", "shutdown", "spawn", "spawn_monitor", "stop",
    "trap_exit", "unlink", "unregister", "whereis",
}


def test_all_lists_exactly_the_public_names():
    assert set(runtime.__all__) == PUBLIC
    assert runtime.__all__ == sorted(runtime.__all__, key=lambda n: (n[0].islower(), n))


def test_every_public_name_exists_and_is_documented():
    for name in runtime.__all__:
        obj = getattr(runtime, name)
        assert getattr(obj, "__doc__", None), name


def test_errors_form_one_tree():
    for err in (runtime.NoProcError, runtime.CallTimeout, runtime.ExitError,
                runtime.StartError, runtime.AlreadyRegisteredError, runtime.InvalidChildSpec):
        assert issubclass(err, runtime.ProcessError)
    assert issubclass(runtime.CallTimeout, TimeoutError)
    assert issubclass(runtime.ReceiveTimeout, TimeoutError)
