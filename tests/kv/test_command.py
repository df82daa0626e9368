"""kv.command: the guide's seven parse examples, the protocol's edges, and run()."""

from __future__ import annotations

import doctest

import pytest

import kv.command
import runtime
from kv import bucket, registry
from kv.command import (
    NOT_FOUND,
    OK,
    Create,
    Delete,
    Get,
    Put,
    UnknownCommand,
    decode,
    encode,
    parse,
    run,
)

# ------------------------------------------------------------------ parse (pure)

# The guide's doctests of KVServer.Command.parse/1, one test each.
GUIDE_PARSES = [
    ("CREATE shopping\r\n", Create("shopping")),
    ("CREATE  shopping  \r\n", Create("shopping")),
    ("PUT shopping milk 1\r\n", Put("shopping", "milk", "1")),
    ("GET shopping milk\r\n", Get("shopping", "milk")),
    ("DELETE shopping eggs\r\n", Delete("shopping", "eggs")),
]
GUIDE_UNKNOWN = ["UNKNOWN shopping eggs\r\n", "GET shopping\r\n"]


@pytest.mark.parametrize(("line", "command"), GUIDE_PARSES)
def test_the_guides_parse_examples(line, command):
    assert parse(line) == command


@pytest.mark.parametrize("line", GUIDE_UNKNOWN)
def test_the_guides_unknown_command_examples(line):
    with pytest.raises(UnknownCommand):
        parse(line)


def test_the_module_doc_examples_hold():
    failures, tried = doctest.testmod(kv.command)
    assert tried >= 3 and failures == 0


@pytest.mark.parametrize("line", [
    "", "\r\n", "   \t ", "create shopping", "Get shopping milk", "PUT shopping milk",
    "PUT shopping milk 1 2", "DELETE shopping", "CREATE", "CREATE a b", "NOT FOUND",
])
def test_anything_else_is_an_unknown_command(line):
    with pytest.raises(UnknownCommand):
        parse(line)


def test_words_split_on_any_run_of_whitespace():
    assert parse("\tPUT  shopping\t\tmilk \x0b 3 \r\n") == Put("shopping", "milk", "3")
    assert parse("GET\u3000shopping milk") == Get("shopping", "milk")  # Unicode space


def test_bytes_are_decoded_and_anything_that_is_not_utf8_is_kept():
    raw = b"PUT \xff\xfe k\x00ey caf\xc3\xa9\r\n"
    command = parse(raw)
    assert command == Put(decode(b"\xff\xfe"), "k\x00ey", "café")
    assert encode(command.bucket) == b"\xff\xfe"


def test_replies_are_the_guides_bytes():
    assert kv.command.reply(Get("b", "k"), "3") == b"3\r\nOK\r\n"
    assert kv.command.reply(Get("b", "k"), None) == b"\r\nOK\r\n"
    assert kv.command.reply(Get("b", "k"), 3) == b"3\r\nOK\r\n"
    assert kv.command.reply(Put("b", "k", "v"), None) == OK
    assert kv.command.reply(Delete("b", "k"), "v") == OK


# ------------------------------------------------------------------ run (the registry)


def test_run_against_the_registry(app):
    assert run(Get("shopping", "eggs")) == NOT_FOUND
    assert run(Create("shopping")) == OK
    assert run(Put("shopping", "eggs", "3")) == OK
    assert run(Get("shopping", "eggs")) == b"3\r\nOK\r\n"
    assert run(Delete("shopping", "eggs")) == OK
    assert run(Get("shopping", "eggs")) == b"\r\nOK\r\n"
    assert run(Delete("shopping", "eggs")) == OK
    assert bucket.get(registry.lookup("kv.registry", "shopping"), "eggs") is None


def test_run_on_a_dead_bucket_is_not_found(app):
    run(Create("shopping"))
    b = registry.lookup("kv.registry", "shopping")
    runtime.Agent.stop(b, "shutdown")
    assert run(Put("shopping", "eggs", "3")) == NOT_FOUND


def test_run_without_the_registry_raises():
    with pytest.raises(runtime.NoProcError):
        run(Get("shopping", "eggs"))
