"""A TCP relay in front of a Kafka SASL listener that loses the broker's answer to a login request.

A Kafka broker refuses credentials (or a mechanism it lacks) by answering, then closing the
connection; under load its close can overtake the answer and the client sees only a disconnect
(Kafka 4.3 on a busy 2-core machine: a wrong password about 1 run in 4). The relay makes that loss
certain: it passes every byte both ways until the client has sent the chosen request
(``SaslAuthenticate`` by default, or ``SaslHandshake``), then closes both sides when the broker's
answer arrives, without passing it on. The broker really judges the login; only its answer is cut.
"""

from __future__ import annotations

import socket
import struct
import threading

SASL_HANDSHAKE = 17  # the Kafka API key of the request that names the SASL mechanism
SASL_AUTHENTICATE = 36  # the Kafka API key of the request that carries the credentials


class LoginAnswerCut:
    """``with LoginAnswerCut("127.0.0.1:PORT") as address:`` a client pointed at ``address``
    reaches the broker, but never reads what it answers to a login (to ``request``, an API key)."""

    def __init__(self, upstream: str, request: int = SASL_AUTHENTICATE) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._request = request
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        self.cut = 0  # connections whose login answer was dropped

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self._accept, name="login-cut-accept", daemon=True).start()
        return self.address

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                broker = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                return  # the listener was closed: the relay is done
            broker.settimeout(None)
            with self._lock:
                self._sockets += [client, broker]
            login_sent = threading.Event()
            threading.Thread(target=self._requests, args=(client, broker, login_sent), daemon=True).start()
            threading.Thread(target=self._answers, args=(broker, client, login_sent), daemon=True).start()

    def _requests(self, client: socket.socket, broker: socket.socket, login_sent: threading.Event) -> None:
        """Client to broker, one framed request at a time: the chosen one is noted before it is passed on."""
        try:
            while True:
                size = _read_exactly(client, 4)
                body = _read_exactly(client, struct.unpack(">i", size)[0])
                if struct.unpack(">h", body[:2])[0] == self._request:
                    login_sent.set()
                broker.sendall(size + body)
        except OSError:
            _close(client)
            _close(broker)

    def _answers(self, broker: socket.socket, client: socket.socket, login_sent: threading.Event) -> None:
        """Broker to client, until the first bytes after the chosen request: those are dropped, both
        sides closed."""
        try:
            while chunk := broker.recv(65536):
                if login_sent.is_set():
                    self.cut += 1
                    break
                client.sendall(chunk)
        except OSError:
            pass
        _close(client)
        _close(broker)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
