"""Agent: state behind functions that run in the agent's own process."""

from __future__ import annotations

import os

import pytest

import runtime
from runtime import Agent
from runtime.testing import wait_down


@pytest.fixture
def agent():
    pid = Agent.start_link(lambda: {"n": 0})
    yield pid
    if runtime.is_alive(pid):
        Agent.stop(pid)


def test_get_update_get_and_update_and_cast(agent):
    assert Agent.get(agent, lambda s: s["n"]) == 0
    Agent.update(agent, lambda s: {**s, "n": s["n"] + 1})
    assert Agent.get_and_update(agent, lambda s: (s["n"], {**s, "n": 10})) == 1
    Agent.cast(agent, lambda s: {**s, "n": s["n"] * 2})
    assert Agent.get(agent, lambda s: s["n"]) == 20


def test_functions_run_inside_the_agent_process(agent):
    assert Agent.get(agent, lambda s: os.getpid()) == agent.os_pid != os.getpid()


def test_closures_carry_their_values(agent):
    delta = 41
    Agent.update(agent, lambda s: {**s, "n": s["n"] + delta + 1})
    assert Agent.get(agent, lambda s: s["n"]) == 42


def test_the_initial_state_is_computed_in_the_new_process():
    pid = Agent.start_link(lambda: os.getpid())
    assert Agent.get(pid, lambda s: s) == pid.os_pid
    Agent.stop(pid)


def test_a_raising_function_crashes_the_agent_and_the_caller_gets_the_reason(agent):
    ref = runtime.monitor(agent)
    with pytest.raises(runtime.ExitError) as info:
        Agent.get(agent, lambda s: 1 / 0)
    assert info.value.reason.exc_type == "ZeroDivisionError"
    assert isinstance(wait_down(ref).reason, runtime.Crash)
    runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit) and m.pid == agent)


def test_get_and_update_must_return_a_pair(agent):
    with pytest.raises(runtime.ExitError) as info:
        Agent.get_and_update(agent, lambda s: "not a pair")
    assert "(reply, new_state)" in info.value.reason.message
    runtime.receive(timeout=5, match=lambda m: isinstance(m, runtime.Exit) and m.pid == agent)


def test_start_with_a_failing_initial_function_raises():
    with pytest.raises(runtime.StartError) as info:
        Agent.start_link(lambda: {}["missing"])
    assert info.value.reason.exc_type == "KeyError"


def test_an_agent_is_a_gen_server_with_a_child_spec():
    assert issubclass(Agent, runtime.GenServer)
    spec = Agent.child_spec(dict)
    assert spec["start"][0] == Agent.start_link and spec["restart"] == "permanent"


def test_calls_to_a_stopped_agent_raise_noproc(agent):
    Agent.stop(agent)
    with pytest.raises(runtime.NoProcError):
        Agent.get(agent, lambda s: s)
    Agent.cast(agent, lambda s: s)  # never raises
