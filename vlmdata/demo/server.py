"""A web server for the demo corpus on 127.0.0.1, answering each entry as its kind says.

It runs on an event loop of its own in a background thread, so the download stage (which
starts its own loops, in other processes too) talks to it over a real socket, as to the web.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable

from aiohttp import web

from vlmdata.demo.corpus import CorpusEntry
from vlmdata.errors import UserError

_HOST = "127.0.0.1"  # never anything else: the demo serves this machine only
_ERROR_STATUS = {"dead": 404, "gone": 410, "server-error": 500}
_START_TIMEOUT_S = 10.0


class DemoServer:
    """Serve ``entries`` at ``base_url/<name>`` while the ``with`` block runs.

    ``slow`` entries answer after ``slow_s`` seconds, ``stall`` entries after ``stall_s``: far
    past the demo's ``--timeout``, yet bounded, and a stalled answer is dropped as soon as its
    client goes away. ``port`` 0 takes a free port; another (a rerun serving the URLs of its
    URL list again) must be free. Leaving the block stops the server and its thread.
    """

    def __init__(
        self,
        entries: Iterable[CorpusEntry],
        port: int = 0,
        slow_s: float = 1.0,
        stall_s: float = 20.0,
    ) -> None:
        self._entries = {entry.name: entry for entry in entries}
        self._wanted_port = port
        self.slow_s = slow_s
        self.stall_s = stall_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (only while it runs)."""
        if self._port is None:
            raise RuntimeError("the demo server is not running: use it in a with block")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (only while the server runs)."""
        return f"http://{_HOST}:{self.port}"

    def __enter__(self) -> DemoServer:
        app = web.Application()
        app.router.add_get("/{name}", self._answer)
        # handler_cancellation: a stalled answer stops when its client hangs up, not 20 s later.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1, access_log=None)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None

        async def serve() -> None:
            await runner.setup()
            try:
                await web.TCPSite(runner, _HOST, self._wanted_port).start()
                self._port = runner.addresses[0][1]
                ready.set()
                await self._stop.wait()
            finally:
                await runner.cleanup()  # cancels answers still running after shutdown_timeout

        def run() -> None:
            try:
                loop.run_until_complete(serve())
            except BaseException as e:  # raised again by __enter__
                self._failure = e
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
                ready.set()  # unblocks __enter__ when the server could not start

        self._loop = loop
        self._thread = threading.Thread(target=run, name="vlmdata-demo-server", daemon=True)
        self._thread.start()
        ready.wait(_START_TIMEOUT_S)
        if self._port is None:
            self.__exit__()
            if isinstance(self._failure, OSError) and self._wanted_port:
                raise UserError(
                    f"the demo server cannot listen on {_HOST}:{self._wanted_port} "
                    f"({self._failure.strerror}): free that port"
                ) from None
            raise RuntimeError(f"the demo server did not start on {_HOST}") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server never started
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = self._loop = None
        self._port = None

    async def _answer(self, request: web.Request) -> web.Response:
        entry = self._entries.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound()
        if entry.kind in _ERROR_STATUS:
            return web.Response(status=_ERROR_STATUS[entry.kind])
        if entry.kind == "slow":
            await asyncio.sleep(self.slow_s)
        elif entry.kind == "stall":
            await asyncio.sleep(self.stall_s)
        headers = {"X-Robots-Tag": "noai"} if entry.kind == "noai" else None
        return web.Response(body=entry.body, content_type=entry.content_type, headers=headers)
