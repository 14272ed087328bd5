"""The user-space shaped link (backends/link.py) delivers the configured bandwidth and delay on
loopback, keeps the bytes and their order, and injects the faults the edge runtime must survive.
Delays and sizes are chosen so that scheduler noise (milliseconds) is small beside them."""
import os
import socket
import threading
import time

import pytest

from pared.backends.link import ShapingProxy
from pared.ir.errors import TargetError
from pared.ir.target import Link


class Echo:
    """A TCP server echoing every byte back (threads, plain sockets: independent of the proxy's loop)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.received += len(data)
                conn.sendall(data)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def _roundtrip(address, payload: bytes, timeout: float = 30.0) -> tuple[bytes, float]:
    with socket.create_connection(address, timeout=timeout) as s:
        t0 = time.perf_counter()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join()
        return bytes(got), time.perf_counter() - t0


def test_link_data_is_validated_and_spelled_in_mbit():
    link = Link.mbit("wifi", 20, rtt_ms=30)
    assert link.bandwidth == 2.5e6 and link.rtt == 0.03
    assert link.transfer_s(1_000_000) == pytest.approx(0.015 + 0.4)
    assert Link.from_json(link.to_json()) == link
    with pytest.raises(TargetError, match="link 'x': loss must be a probability in \\[0, 1\\], got 2"):
        Link("x", loss=2)
    with pytest.raises(TargetError, match="link 'x': bandwidth must be bytes/s > 0"):
        Link("x", bandwidth=0)
    with pytest.raises(TargetError, match="link 'x': rtt must be a number of seconds >= 0"):
        Link("x", rtt=-1)
    with pytest.raises(TargetError, match="unknown field 'bandwith'; did you mean 'bandwidth'"):
        Link.from_json({"name": "x", "bandwith": 1e6})


def test_delay_is_the_rtt_and_bytes_arrive_intact_in_order(echo):
    payload = os.urandom(200_000)
    with ShapingProxy(echo.address, Link("lan", rtt=0.2, jitter=0.02)) as px:
        small, t_small = _roundtrip(px.address, b"ping")
        big, _ = _roundtrip(px.address, payload)
    assert small == b"ping" and big == payload
    # through the proxy and back: two one-way delays of rtt / 2 each (plus up to 2 x jitter)
    assert 0.2 <= t_small < 0.2 + 0.04 + 0.15, t_small


def test_bandwidth_paces_a_transfer(echo):
    payload = os.urandom(500_000)
    link = Link("slow", bandwidth=1_000_000)          # 1 MB/s each way, no delay
    with ShapingProxy(echo.address, link) as px:
        got, took = _roundtrip(px.address, payload)
        assert px.delivered == {"up": len(payload), "down": len(payload)}
    assert got == payload
    # up and down pipeline: about len / bandwidth (0.5 s), not 2x, never faster
    assert 0.5 <= took < 0.5 * 1.6, took
    with ShapingProxy(echo.address, Link("fast")) as px:
        _, unshaped = _roundtrip(px.address, payload)
    assert unshaped < 0.25, unshaped


def test_loss_costs_a_retransmission_timeout(echo):
    with ShapingProxy(echo.address, Link("lossy", loss=1.0, rto=0.15)) as px:
        got, took = _roundtrip(px.address, b"x" * 100)
    assert got == b"x" * 100
    assert 0.3 <= took < 0.3 + 0.15, took            # lost once each way, recovered after rto


def test_the_shape_changes_on_an_open_connection(echo):
    with ShapingProxy(echo.address, Link("a", rtt=0.3)) as px:
        with socket.create_connection(px.address, timeout=10) as s:
            t0 = time.perf_counter()
            s.sendall(b"1")
            assert s.recv(10) == b"1"
            first = time.perf_counter() - t0
            px.set_link(Link("b", rtt=0.0))
            t0 = time.perf_counter()
            s.sendall(b"2")
            assert s.recv(10) == b"2"
            second = time.perf_counter() - t0
    assert first >= 0.3 and second < 0.1, (first, second)


def test_blackhole_times_out_and_heal_restores(echo):
    with ShapingProxy(echo.address, Link("l")) as px:
        px.blackhole()
        with socket.create_connection(px.address, timeout=0.3) as s:
            s.sendall(b"lost")
            with pytest.raises(socket.timeout):
                s.recv(10)
        px.heal()
        got, _ = _roundtrip(px.address, b"back")
        assert got == b"back"


def test_drop_ends_open_connections_and_new_ones_work(echo):
    with ShapingProxy(echo.address, Link("l", rtt=0.4)) as px:
        s = socket.create_connection(px.address, timeout=5)
        s.sendall(b"in flight")
        time.sleep(0.05)
        px.drop()
        try:
            data = s.recv(10)
        except ConnectionError:
            data = b""
        assert data == b""                             # the request in flight is gone, visibly
        s.close()
        got, _ = _roundtrip(px.address, b"again")
        assert got == b"again"


def test_a_dead_server_is_a_refused_connection_not_a_hang(echo):
    echo.close()
    with ShapingProxy(echo.address, Link("l")) as px:
        with socket.create_connection(px.address, timeout=5) as s:
            try:
                data = s.recv(10)
            except ConnectionError:
                data = b""
    assert data == b""


def test_a_taken_port_is_a_clear_error(echo):
    with ShapingProxy(echo.address, Link("l")) as px:
        with pytest.raises(OSError, match="link proxy: cannot listen on"):
            ShapingProxy(echo.address, Link("l"), listen=px.address).start()


def test_emulated_link_charges_one_message_per_send_many_and_keeps_probes_apart():
    """An EmulatedLink (no sleeping): send_many is one message (one RTT/2 + all the bytes), each
    send its own; measurements estimate the bandwidth; probes' bytes are not payload."""
    import numpy as np
    from pared.backends.link import EmulatedLink
    lk = EmulatedLink(Link.mbit("wifi", 8, rtt_ms=10), sleep=False)
    a, b = np.zeros(1000, np.float32), np.zeros(500, np.float32)
    got = lk.send_many([a, b])
    assert got[0] is a and got[1] is b
    assert lk.transfers == 1 and lk.bytes_sent == 6000
    assert lk.busy_s == pytest.approx(0.005 + 6000 / 1e6)
    assert lk.estimate == pytest.approx(1e6) and lk.count == 1
    lk.send(a)
    lk.send(b)
    assert lk.transfers == 3 and lk.busy_s == pytest.approx(3 * 0.005 + 12000 / 1e6)
    lk.probe()
    assert lk.bytes_sent == 12000 and lk.probe_bytes_sent == lk.probe_bytes and lk.count == 4
    assert list(lk.signal()) == [pytest.approx(1e6), 4.0]
