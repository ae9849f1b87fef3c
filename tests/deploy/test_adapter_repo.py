"""`--adapter-repo`: an unregistered adapter id is registered on first use from REPO/<id>/, once even
under concurrent first requests, off the event loop; ids that escape the repository are refused."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from loraplex import clients
from loraplex.clients import AsyncClient
from loraplex.server.config import AdapterConfig, CacheConfig, EngineConfig, ModelConfig
from loraplex.server.engine.engine import AsyncEngine, GenerationRequest, LLMEngine
from loraplex.server.model.sampling import SamplingParams
from tests.deploy.conftest import ADMIN_TOKEN
from tests.engine_support import PROMPTS, run_until_done, submit

pytestmark = pytest.mark.timeout(300)


def repo_config(model_dir, repo) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=model_dir, quantization="none", dtype="float32", device="cpu"),
        cache=CacheConfig(num_tokens=1024),
        adapters=AdapterConfig(max_rank=16, max_device_adapters=2, max_host_adapters=4, adapter_repo=repo),
    )


@contextlib.contextmanager
def slow_reads(store, seconds: float):
    """Make the store's file reads slow (widening any race); yields the thread name of each read."""
    threads: list[str] = []
    read = store._read

    def slow(path):
        threads.append(threading.current_thread().name)
        time.sleep(seconds)
        return read(path)

    store._read = slow
    try:
        yield threads
    finally:
        store._read = read


@pytest.fixture(scope="module")
def engine(demo_model_dir, repo_layout):
    engine = LLMEngine(repo_config(demo_model_dir, repo_layout))
    yield engine
    engine.close()


# ---------------------------------------------------------------------- in process
def test_engine_registers_a_repo_adapter_once_under_concurrent_first_requests(engine, repo_layout):
    with slow_reads(engine.store, 0.3) as reads:
        keys: list[str] = []
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def first_use() -> None:
            start.wait()
            try:
                keys.append(engine.store.acquire("alpha"))
            except BaseException as error:  # collected: the assertion below names it
                errors.append(error)

        workers = [threading.Thread(target=first_use) for _ in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert not errors and len(keys) == 6 and len(set(keys)) == 1, errors
        assert len(reads) == 1, "concurrent first requests read the adapter more than once"
        (info,) = engine.list_adapters()
        assert (info.adapter_id, info.source) == ("alpha", str(repo_layout / "alpha"))
        for key in keys:
            engine.store.release(key)

    # the synchronous engine API serves repo adapters too, and they change the output
    with_adapter = submit(engine, "a", PROMPTS[0], adapter="beta", max_new_tokens=8)
    base = submit(engine, "b", PROMPTS[0], max_new_tokens=8)
    run_until_done(engine)
    assert with_adapter.final.finish_reason == "length" and with_adapter.token_ids != base.token_ids


def test_async_engine_reads_repo_adapters_off_the_event_loop(demo_model_dir, repo_layout):
    engine = AsyncEngine(repo_config(demo_model_dir, repo_layout)).start()
    try:
        async def main() -> tuple[list[int], int]:
            ticks = 0

            async def tick() -> None:  # counts while the loop is free
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.ensure_future(tick())
            request = GenerationRequest("r", prompt=PROMPTS[1], adapter_id="gamma",
                                        sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))
            async with contextlib.aclosing(engine.generate(request)) as outputs:
                tokens = [t async for output in outputs for t in output.token_ids]
            ticker.cancel()
            return tokens, ticks

        with slow_reads(engine.engine.store, 0.2) as reads:
            tokens, ticks = asyncio.run(main())
        assert len(tokens) == 3
        assert reads and "MainThread" not in reads, f"the adapter was read on the event loop's thread: {reads}"
        assert ticks >= 5, "the event loop was blocked while the adapter was read"
    finally:
        engine.shutdown()


def test_repo_adapter_errors_have_their_status(engine, repo_layout):
    from loraplex.server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

    store = engine.store
    outside = repo_layout.parent / "x"  # a valid adapter, outside the repository
    for bad in ("../x", str(outside), "alpha/../../x", ".."):
        with pytest.raises(InvalidArgument, match="adapter id"):
            store.acquire(bad)
    with pytest.raises(PermissionDenied, match="resolves outside"):
        store.acquire("escape")  # a symlink to `outside`
    with pytest.raises(NotFound, match=f"adapter repository {repo_layout} has no directory 'ghost'"):
        store.acquire("ghost")
    with pytest.raises(FailedPrecondition, match="not valid JSON"):
        store.acquire("broken")
    assert not {"escape", "ghost", "broken", "x"} & {a.adapter_id for a in engine.list_adapters()}


# ---------------------------------------------------------------------- through the server
def test_server_serves_an_unregistered_repo_adapter(repo_server, repo_layout):
    with repo_server.client(admin_token=ADMIN_TOKEN) as admin:
        assert "alpha" not in {a.adapter_id for a in admin.list_adapters()}
    with repo_server.client() as client:
        result = client.generate(PROMPTS[0], adapter="alpha", max_new_tokens=8, ignore_eos=True)
        base = client.generate(PROMPTS[0], max_new_tokens=8, ignore_eos=True)
    assert result.finish_reason == "length" and len(result.token_ids) == 8
    assert result.token_ids != base.token_ids, "the repository adapter did not change the output"
    with repo_server.client(admin_token=ADMIN_TOKEN) as admin:
        info = admin.get_adapter("alpha")
    assert info.source == str(repo_layout / "alpha")


def test_server_refuses_ids_that_escape_the_repository(repo_server, repo_layout):
    outside = repo_layout.parent / "x"
    with repo_server.client() as client:
        for bad in ("../x", str(outside)):
            with pytest.raises(clients.InvalidArgument, match="adapter id"):
                client.generate("hi", adapter=bad, max_new_tokens=2)
        with pytest.raises(clients.PermissionDenied, match="resolves outside"):
            client.generate("hi", adapter="escape", max_new_tokens=2)
        with pytest.raises(clients.NotFound, match="adapter repository"):
            client.generate("hi", adapter="ghost", max_new_tokens=2)
        with pytest.raises(clients.FailedPrecondition):
            client.generate("hi", adapter="broken", max_new_tokens=2)


def test_server_concurrent_first_requests_all_succeed(repo_server):
    async def burst():
        async with AsyncClient(repo_server.address, timeout=60) as client:
            return await asyncio.gather(*(client.generate(PROMPTS[1], adapter="beta", max_new_tokens=3,
                                                          ignore_eos=True) for _ in range(6)))

    results = asyncio.run(burst())
    assert all(r.finish_reason == "length" for r in results)
    assert len({tuple(r.token_ids) for r in results}) == 1
    with repo_server.client(admin_token=ADMIN_TOKEN) as admin:
        assert [a.adapter_id for a in admin.list_adapters()].count("beta") == 1


def test_explicit_register_and_unregister_keep_working(repo_server, repo_layout):
    with repo_server.client(admin_token=ADMIN_TOKEN) as admin, repo_server.client() as client:
        want = client.generate(PROMPTS[2], adapter="alpha", max_new_tokens=6, ignore_eos=True).token_ids
        # an explicit registration wins over the repository directory of the same name
        admin.register_adapter("gamma", "alpha")  # relative to --adapter-root
        assert admin.get_adapter("gamma").source == str(repo_layout / "alpha")
        assert client.generate(PROMPTS[2], adapter="gamma", max_new_tokens=6, ignore_eos=True).token_ids == want
        with pytest.raises(clients.AlreadyExists):
            admin.register_adapter("alpha", "beta")
        # unregistered, a repository adapter comes back from the repository on its next use
        admin.unregister_adapter("alpha")
        assert "alpha" not in {a.adapter_id for a in admin.list_adapters()}
        assert client.generate(PROMPTS[2], adapter="alpha", max_new_tokens=6, ignore_eos=True).token_ids == want
        assert admin.get_adapter("alpha").source == str(repo_layout / "alpha")
