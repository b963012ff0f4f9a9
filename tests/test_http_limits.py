"""Slow and idle clients cannot hold the server: headers and bodies have deadlines, and once every connection
place is taken new requests get a fast 503 until the deadlines free the places. Raw sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.server_process import ServerProcess

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1.0, 1.0, 6
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--header-timeout", str(HEADER_TIMEOUT),
            "--body-timeout", str(BODY_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)]
    with ServerProcess(args) as running:
        yield running


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def test_half_sent_headers_are_dropped_after_the_header_timeout(server):
    with connect(server) as sock:
        sock.sendall(HEAD)  # no blank line: the headers never end
        received, seconds = read_until_closed(sock, 10)
    assert received == b"" and seconds < HEADER_TIMEOUT + 3


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (uvicorn may write its head and body in separate segments)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_the_next_request_on_a_kept_alive_connection_has_the_header_deadline_too(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(HEAD)  # the second request's headers never end
        received, seconds = read_until_closed(sock, 10)
    assert received == b"" and seconds < HEADER_TIMEOUT + 3


def test_headers_over_16_kib_get_400_at_once(server):
    """The headers' size is bounded as well as their time: a client cannot fill memory within the deadline."""
    with connect(server) as sock:
        sock.sendall(HEAD + b"X-Filler: " + b"a" * 20_000 + b"\r\n")  # no blank line: the headers never end
        received, seconds = read_until_closed(sock, 10)
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]
    assert seconds < HEADER_TIMEOUT


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_headers_sent_a_byte_at_a_time_do_not_reset_the_deadline(server):
    with connect(server) as sock:
        started = time.monotonic()
        for byte in HEAD * 10:  # 0.1 s a byte: about 70 s of headers
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            if closed_by_server(sock) or time.monotonic() - started > HEADER_TIMEOUT + 5:
                break
        seconds = time.monotonic() - started
    assert seconds < HEADER_TIMEOUT + 3


def test_a_body_slower_than_the_body_timeout_gets_408(server):
    with connect(server) as sock:
        sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model": ')
        received, seconds = read_until_closed(sock, 10)
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert b'"code":"request_timeout"' in received
    assert seconds < BODY_TIMEOUT + 3


def test_connections_over_the_limit_get_503_until_the_idle_ones_are_dropped(server):
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        refused = httpx.get(server.base_url + "/health", timeout=10)
        assert refused.status_code == 503
        time.sleep(HEADER_TIMEOUT + 1)  # the idle connections never sent headers: closed by now
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        body = {"model": "tiny", "prompt": "ok", "max_tokens": 2}
        assert httpx.post(server.v1 + "/completions", json=body, timeout=30).status_code == 200
    finally:
        for sock in idle:
            sock.close()
