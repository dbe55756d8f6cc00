"""A loopback TCP forwarder in front of a real server, which a test can cut and open again.

To a client, a cut gate is the server going down: new connections are refused and open ones reset. A real server
takes seconds of CPU to start again (an ``mlflow server`` about 7 s on this machine); the gate reopens at once, so
an outage lasts exactly as long as the test wants and the server behind it keeps its state.
"""

from __future__ import annotations

import socket
import threading


class TcpGate:
    def __init__(self, target_port: int, port: int):
        self.port, self._target = port, target_port
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        """Accept connections again (on the same port)."""
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: no wait for TIME_WAIT
        self._acceptor = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones; returns once both hold."""
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept that waits on it (Linux)
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            _end(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                server = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction until either side ends, then end both (the other direction's pump wakes and stops)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _end(source)
    _end(sink)


def _end(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
