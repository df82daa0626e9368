"""The public surface of ``runtime`` is exactly what the contract names."""

import runtime

PUBLIC = {
    "Agent", "DynamicSupervisor", "Supervisor",
    "AlreadyRegisteredError", "CallTimeout", "Crash", "Down", "Exit", "ExitError",
    "GenServer", "InvalidChildSpec", "NoProcError", "NoReply", "Pid", "ProcessError",
    "ReceiveTimeout", "Ref", "Reply", "StartError", "Stop", "acall", "areceive", "astop",
    "call", "cast", "configure", "demonitor", "exit", "info", "is_alive", "processes",
    "is_clean_exit", "keep_warm", "link", "monitor", "receive",
    "register", "reply", "self", "send", "shutdown", "spawn", "spawn_monitor", "stop",
    "trap_exit", "unlink", "unregister", "whereis", "Config", "DEFAULT_TIMEOUT", "options",
    "system_info", "SystemInfo",
}


def test_all_lists_exactly_the_public_names():
    assert set(runtime.__all__) == PUBLIC
    assert runtime.__all__ == sorted(runtime.__all__, key=lambda n: (n[0].islower(), n))


def test_every_public_name_exists_and_is_documented():
    for name in runtime.__all__:
        obj = getattr(runtime, name)
        assert getattr(obj, "__doc__", None), name


def test_errors_form_one_tree():
    import pickle

    for err in (runtime.NoProcError, runtime.CallTimeout, runtime.ExitError,
                runtime.StartError, runtime.AlreadyRegisteredError, runtime.InvalidChildSpec):
        assert issubclass(err, runtime.ProcessError)
    assert issubclass(runtime.CallTimeout, TimeoutError)
    for exc in (runtime.NoProcError("x", "gone"), runtime.StartError("w", "boom"),
                runtime.InvalidChildSpec("restart", "sometimes", "permanent"),
                runtime.ExitError("p", "killed"), runtime.CallTimeout("p", "r", 1.0),
                runtime.AlreadyRegisteredError("n", "p")):
        clone = pickle.loads(pickle.dumps(exc))
        assert type(clone) is type(exc) and str(clone) == str(exc)
    assert issubclass(runtime.ReceiveTimeout, TimeoutError)
