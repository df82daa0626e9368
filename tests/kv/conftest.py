import pytest

import kv
import runtime
from runtime.testing import wait_down


@pytest.fixture
def app():
    """The whole kv tree, stopped after the test."""
    sup = kv.start()
    yield sup
    if runtime.is_alive(sup):
        ref = runtime.monitor(sup)
        kv.stop()
        wait_down(ref)
