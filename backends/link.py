"""A shaped network link on loopback, in user space: a TCP proxy that delivers what
passes through it at a Link's bandwidth, delay, jitter and loss, and injects faults.

These machines' kernel has no `netem` qdisc, so the link between an edge runtime and
its server is emulated here instead: the client connects to the proxy, the proxy to
the server, and each direction is a FIFO link of its own. A chunk read from one side
leaves the link's queue after its serialization time (bytes / bandwidth, behind the
chunks queued before it) and arrives half an RTT later, plus a uniform jitter in
[0, jitter] (never overtaking the chunk before it: TCP delivers in order) and, with
probability `loss`, a retransmission timeout `rto` (TCP recovers a lost segment late,
not never). The shape can change while connections are open (a bandwidth trace).

Faults, for the runtime's fallback tests:
    blackhole()   accept and read, deliver nothing (a server that stopped answering)
    drop()        close every open connection now (a server killed mid-request)
    heal()        back to normal delivery for new data

    with ShapingProxy(("127.0.0.1", server_port), Link.mbit("wifi", 20, rtt_ms=30)) as px:
        client.connect(px.address)

Runs an asyncio loop in a daemon thread; torch-free.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

from pared.ir.target import Link

#: bytes read from a socket at a time (a segment's worth of work for the scheduler)
CHUNK = 16384


class ShapingProxy:
    """A TCP proxy from `address` to `upstream` that shapes both directions as `link`.

    Args:
        upstream: (host, port) of the server.
        link: the Link to emulate (each direction gets its bandwidth; the delay is rtt / 2).
        listen: (host, port) to accept on; port 0 picks a free one (see `address`).
        seed: the jitter and loss draws.
    """

    def __init__(self, upstream: tuple[str, int], link: Link, listen: tuple[str, int] = ("127.0.0.1", 0),
                 seed: int = 0):
        if not isinstance(link, Link):
            raise TypeError(f"ShapingProxy: link must be a pared Link, got {type(link).__name__}")
        self.upstream = upstream
        self.link = link
        self._listen = listen
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set = set()
        self._blackhole = False
        self.address: tuple[str, int] | None = None
        #: bytes delivered per direction ("up": client -> server, "down": server -> client)
        self.delivered = {"up": 0, "down": 0}
        self.connections = 0

    # -- control ------------------------------------------------------------------------------
    def start(self) -> "ShapingProxy":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._accept, *self._listen))
                self.address = self._server.sockets[0].getsockname()[:2]
            except BaseException as e:            # reported to start()'s caller
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="pared-link", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise OSError(f"link proxy: cannot listen on {self._listen}: {failure[0]}") from failure[0]
        return self

    def stop(self) -> None:
        """Close every connection and the listener; join the thread."""
        if self._loop is None:
            return
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()
            self._close_all()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> "ShapingProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def set_link(self, link: Link) -> None:
        """Shape data read from now on as `link` (a bandwidth trace changes it mid-run)."""
        if not isinstance(link, Link):
            raise TypeError(f"ShapingProxy: link must be a pared Link, got {type(link).__name__}")
        self.link = link

    def blackhole(self) -> None:
        """Keep connections open and read from them, but deliver nothing."""
        self._blackhole = True

    def heal(self) -> None:
        self._blackhole = False

    @property
    def blackholed(self) -> bool:
        return self._blackhole

    def drop(self) -> None:
        """Close every open connection now (both sides see the connection end)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result(timeout=10)

    async def _drop(self) -> None:
        self._close_all()

    def _close_all(self) -> None:
        for w in list(self._writers):
            try:
                w.transport.abort()
            except Exception:
                pass
        self._writers.clear()

    # -- the link -----------------------------------------------------------------------------
    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()            # as a refused connection looks through a real link
            return
        self.connections += 1
        self._writers.update((client_w, server_w))
        up = asyncio.ensure_future(self._pipe(client_r, server_w, "up"))
        down = asyncio.ensure_future(self._pipe(server_r, client_w, "down"))
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(up, down, return_exceptions=True)
        for w in (client_w, server_w):
            self._writers.discard(w)
            w.transport.abort() if w.transport and not w.is_closing() else None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """One direction: a queue of (arrival time, bytes) filled as chunks are read, and a
        writer that delivers each at its arrival time."""
        queue: asyncio.Queue = asyncio.Queue()
        state = {"free_at": 0.0, "last_arrival": 0.0}

        async def deliver() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    break
                arrival, data = item
                wait = arrival - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._blackhole:
                    continue
                self.delivered[direction] += len(data)     # counted before the peer can see them
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self._blackhole:
                    continue
                queue.put_nowait((self._arrival(len(data), state), data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            try:
                await sender
            except (ConnectionError, OSError):
                pass

    def _arrival(self, nbytes: int, state: dict) -> float:
        link, now = self.link, time.monotonic()
        start = max(now, state["free_at"])
        state["free_at"] = start + (nbytes / link.bandwidth if link.bandwidth else 0.0)
        arrival = state["free_at"] + link.rtt / 2
        if link.jitter:
            arrival += self._rng.uniform(0.0, link.jitter)
        if link.loss and self._rng.random() < link.loss:
            arrival += link.rto
        arrival = max(arrival, state["last_arrival"])       # in order, as TCP delivers
        state["last_arrival"] = arrival
        return arrival


def wait(seconds: float) -> None:
    """Block for `seconds`, precisely: time.sleep overshoots by ~0.1 ms here, which at the
    sub-millisecond transfers and device slowdowns emulated in process is a large error; so
    sleep until 0.3 ms before the deadline, then spin."""
    end = time.perf_counter() + seconds
    if seconds > 3e-4:
        time.sleep(seconds - 3e-4)
    while time.perf_counter() < end:
        pass


class EmulatedLink:
    """A link inside one process: a Transfer over it takes the time `link` says (the
    runtime sleeps it: RTT/2 + bytes / bandwidth, plus jitter), and it measures what it
    delivers, as a runtime over a real link would: each transfer of at least `min_bytes`
    gives an estimate bytes / (elapsed - RTT/2); `signal()` is [the latest estimate, how
    many it has made], what the Plan's `bandwidth` selector reads as ``link:NAME``.

    `set_link` changes the shape (a bandwidth trace). `probe()` measures the link without
    sending a payload on the control path (an asynchronous probe: the runtime calls it when
    a call sent nothing, so the estimate does not go stale while everything runs on the
    edge); its bytes are counted (`probe_bytes_sent`, apart from the payload's `bytes_sent`),
    its time is not spent. `send_many` sends several values as one message (one RTT/2).

    The ShapingProxy above shapes real sockets; this is for measuring a partitioned plan's
    latency on one host without a server (the devices then share this host's CPU).
    """

    def __init__(self, link: Link, *, sleep: bool = True, min_bytes: int = 1024, probe_bytes: int = 16384,
                 seed: int = 0):
        self.link = link
        self.sleep = sleep
        self.min_bytes = min_bytes
        self.probe_bytes = probe_bytes
        self._rng = random.Random(seed)
        self.estimate = float("nan")
        self.count = 0
        self.bytes_sent = 0        # payload (the Transfers')
        self.probe_bytes_sent = 0  # the probes'
        self.transfers = 0
        self.busy_s = 0.0          # time spent in transfers

    @property
    def name(self) -> str:
        return self.link.name

    def set_link(self, link: Link) -> None:
        if link.name != self.link.name:
            raise ValueError(f"set_link: link {link.name!r} is not {self.link.name!r} (the plan reads it by name)")
        self.link = link

    def _duration(self, nbytes: int) -> float:
        t = self.link.transfer_s(nbytes)
        if self.link.jitter:
            t += self._rng.uniform(0, self.link.jitter)
        return t

    def _measure(self, nbytes: int, elapsed: float) -> None:
        if nbytes >= self.min_bytes:
            self.estimate = nbytes / max(elapsed - self.link.rtt / 2, 1e-9)
            self.count += 1

    def send(self, value: Any) -> Any:
        return self.send_many([value])[0]

    def send_many(self, values: list) -> list:
        """Several values as one message: one RTT/2 for all, their bytes together."""
        nbytes = sum(int(getattr(v, "nbytes", 0)) for v in values)
        t = self._duration(nbytes)
        t0 = time.perf_counter()
        if self.sleep and t > 0:
            wait(t)
        elapsed = time.perf_counter() - t0 if self.sleep else t
        self._measure(nbytes, max(elapsed, t))
        self.bytes_sent += nbytes
        self.transfers += 1
        self.busy_s += elapsed
        return list(values)

    def probe(self) -> None:
        self._measure(self.probe_bytes, self._duration(self.probe_bytes))
        self.probe_bytes_sent += self.probe_bytes

    def signal(self):
        import numpy as np
        return np.array([self.estimate, float(self.count)])
