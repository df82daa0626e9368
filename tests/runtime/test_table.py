"""The node's process table (runtime._table): slots, and the ring that keeps exit
reasons without files piling up."""

from __future__ import annotations

import os

from runtime import Crash, _table


def table_in(tmp_path):
    return _table.Table(os.path.join(tmp_path, "table"), create=True)


def dead_with(table, reason):
    serial, slot = table.allocate()
    table.set_os_pid(slot, os.getpid())
    assert table.begin_exit(serial, slot, reason) == reason
    return serial, slot


def test_a_stored_reason_is_read_back_whole(tmp_path):
    table = table_in(tmp_path)
    try:
        reason = Crash("builtins.ValueError", "x" * 100_000, "Traceback ...")
        serial, slot = dead_with(table, reason)
        assert table.reason(serial, slot, os.getpid()) == reason
        assert os.listdir(tmp_path) == ["table"]  # no file per reason
    finally:
        table.close()


def test_a_reason_written_over_by_later_ones_reads_as_lost(tmp_path):
    table = table_in(tmp_path)
    try:
        first = dead_with(table, ("custom", 0))
        filler = "y" * (1 << 20)
        for _ in range(_table.RING // len(filler) + 2):
            dead_with(table, ("custom", filler))
        assert table.reason(*first, os.getpid()) == _table.LOST
        last = dead_with(table, ("custom", "last"))
        assert table.reason(*last, os.getpid()) == ("custom", "last")
    finally:
        table.close()


def test_a_crash_too_big_for_the_ring_keeps_its_start_and_end(tmp_path):
    table = table_in(tmp_path)
    try:
        message = "start" + "z" * _table.RING + "end"
        serial, slot = dead_with(table, Crash("builtins.MemoryError", message, "tb"))
        got = table.reason(serial, slot, os.getpid())
        assert got.exc_type == "builtins.MemoryError" and got.traceback == "tb"
        assert got.message.startswith("start") and got.message.endswith("end")
        assert "characters cut" in got.message and len(got.message) < _table.RING // 4
    finally:
        table.close()


def test_common_reasons_take_no_room_in_the_ring(tmp_path):
    table = table_in(tmp_path)
    try:
        for reason in ("normal", "shutdown", "killed", "noproc", "SIGTERM", ("exit_code", 3)):
            serial, slot = dead_with(table, reason)
            assert table.reason(serial, slot, os.getpid()) == reason
        assert _table._RESERVED.unpack_from(table.mm, _table._RESERVED_OFF)[0] == 0
    finally:
        table.close()
