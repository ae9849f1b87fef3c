"""Statuses through the real client: a malformed adapter id is INVALID_ARGUMENT in every call; and the
last line of defence, a bug in a handler or in the engine step ends the RPC as INTERNAL with an error id
(logged with its traceback, counted in the metrics) while the server keeps serving."""

from __future__ import annotations

import logging
import re

import pytest

from loraplex import clients
from loraplex.clients import Client
from loraplex.server.api import metrics as metrics_module
from loraplex.server.api import servicer as servicer_module
from loraplex.server.api.config import ServerConfig
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc
from tests.api.helpers import ServerThread, engine_config, scrape, wait_idle

ERROR_ID = re.compile(r"internal server error \(error id ([0-9a-f]{16})\)")


@pytest.fixture(scope="module")
def server(demo_model_dir):
    thread = ServerThread(ServerConfig(engine=engine_config(demo_model_dir), port=0, metrics_port=0)).start()
    yield thread
    thread.stop()


def _internal_errors(server) -> float:
    return scrape(server.server.metrics_url).get("loraplex_request_errors_total{code=INTERNAL}", 0.0)


def _expect_internal(call, caplog) -> str:
    with pytest.raises(clients.Internal) as raised:
        call()
    match = ERROR_ID.search(raised.value.message)
    assert match, raised.value.message
    assert "Boom" not in raised.value.message  # the client learns nothing of the internals
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info and "Boom" in repr(logged[0].exc_info[1])
    return match.group(1)


@pytest.mark.parametrize("adapter_id", ["../x", "a/b", "é"])
def test_a_malformed_adapter_id_is_invalid_argument(server, adapter_id):
    with Client(server.address) as client:
        for call in (lambda: client.generate("hi", adapter=adapter_id),
                     lambda: list(client.stream("hi", adapter=adapter_id)),
                     lambda: client.get_adapter(adapter_id),
                     lambda: client.unregister_adapter(adapter_id)):
            with pytest.raises(clients.InvalidArgument, match="adapter id .* is invalid"):
                call()
        with pytest.raises(clients.NotFound):
            client.generate("hi", adapter="unknown")


class Boom(RuntimeError):
    pass


def _raise(*_args, **_kwargs):
    raise Boom("a bug")


@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_in_a_handler_is_internal_with_an_error_id(server, monkeypatch, caplog, stream):
    caplog.set_level(logging.ERROR)
    before = _internal_errors(server)
    with Client(server.address) as client:
        monkeypatch.setattr(servicer_module, "to_generation_request", _raise)
        call = (lambda: list(client.stream("hi", max_new_tokens=2))) if stream else (lambda: client.generate("hi"))
        _expect_internal(call, caplog)
        monkeypatch.undo()
        assert _internal_errors(server) == before + 1
        assert client.generate("hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_after_the_engine_accepted_the_request(server, monkeypatch, caplog, stream):
    """The request is aborted in the engine (nothing stays in flight) and the status is INTERNAL."""
    caplog.set_level(logging.ERROR)
    with Client(server.address) as client:
        monkeypatch.setattr(metrics_module.RequestTracker, "output", _raise)
        call = (lambda: list(client.stream("hi", max_new_tokens=4))) if stream else (lambda: client.generate("hi"))
        _expect_internal(call, caplog)
        monkeypatch.undo()
        wait_idle(client)
        assert server.server.state.in_flight == 0
        assert client.generate("hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2


def test_a_bug_in_an_adapters_handler(server, monkeypatch, caplog):
    caplog.set_level(logging.ERROR)
    with Client(server.address) as client:
        monkeypatch.setattr(server.server.state.engine, "list_adapters", _raise)
        _expect_internal(client.list_adapters, caplog)
        monkeypatch.undo()
        assert client.list_adapters() == []


def test_a_bug_in_the_engine_step(server, monkeypatch, caplog):
    caplog.set_level(logging.ERROR)
    before = _internal_errors(server)
    with Client(server.address) as client:
        monkeypatch.setattr(server.server.state.engine.engine.runner, "execute", _raise)
        _expect_internal(lambda: client.generate("hi"), caplog)
        monkeypatch.undo()
        assert _internal_errors(server) == before + 1
        assert client.generate("hi", max_new_tokens=2, ignore_eos=True).completion_tokens == 2


def test_every_handler_is_guarded():
    for servicer, base in [(servicer_module.GeneratorServicer, pb_grpc.GeneratorServicer),
                           (servicer_module.AdaptersServicer, pb_grpc.AdaptersServicer)]:
        for name in [n for n in vars(base) if not n.startswith("_")]:
            assert hasattr(getattr(servicer, name), "__wrapped__"), f"{servicer.__name__}.{name} is not @_guarded"
