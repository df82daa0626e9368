"""The README's runtime example, runnable: python examples/quickstart.py"""

import runtime


def worker(parent):
    msg = runtime.receive(timeout=5)              # selective receive: match=...
    runtime.send(parent, ("done", msg))

pid = runtime.spawn(worker, runtime.self())       # a new OS process
runtime.send(pid, "job")
runtime.receive(match=lambda m: m[0] == "done")

ref = runtime.monitor(pid)                        # Down(ref, pid, reason) when it exits
runtime.receive(match=lambda m: isinstance(m, runtime.Down) and m.ref == ref)

class Counter(runtime.GenServer):
    def init(self, start):
        return start
    def handle_call(self, request, from_, state):
        if request == "get":
            return runtime.Reply(state, state)
        return super().handle_call(request, from_, state)
    def handle_cast(self, request, state):
        return runtime.NoReply(state + request)

Counter.start_link(0, name="counter")             # returns once init has run
runtime.cast("counter", 5)
assert runtime.call("counter", "get") == 5        # 5 s default timeout

agent = runtime.Agent.start_link(lambda: {})      # lambdas travel (cloudpickle)
runtime.Agent.update(agent, lambda s: {**s, "k": 1})

sup = runtime.Supervisor.start_link([(Counter, 10)], strategy="one_for_one",
                                    max_restarts=3, max_seconds=5.0)
runtime.shutdown()                                # also done at interpreter exit
