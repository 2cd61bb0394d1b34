"""An upstream that answers with exactly the bytes a test scripts, in the TCP writes it scripts.

tests/fakes/upstream.py builds well-formed answers with Python's HTTP server, which decides the status line,
folds nothing and writes when it likes. A hostile or broken upstream is not so polite: a key in a reason
phrase or a header name, a key cut in the middle by two TCP writes, a 1xx before the answer, trailers. Here
an answer is a list of byte strings; each is written with its own `sendall`, a short pause between (so the
gateway reads them as separate chunks), then the connection is closed.

Which answer: the request's `x-wire-case` header names it (the table is the test's, so a secret in an
answer never travels in the request); a request without one (the gateway rewrote it: a translated request)
gets the next name `queue` holds. `{{name}}` in an answer is replaced by the value of the request's header of that
(lower-case) name: an upstream that echoes what it received, a secret the test cannot know beforehand (a token the
gateway fetched). Every request is kept (`requests`: the raw heads) for the test to
check. Binds 127.0.0.1 only; `stop()` closes the listener and every connection.
"""

from __future__ import annotations

import socket
import threading
import time

CASE_HEADER = b"x-wire-case"


class WireUpstream:
    def __init__(self, answers: dict[str, list[bytes]], pause: float = 0.05) -> None:
        self.answers = answers
        self.pause = pause  # seconds between two writes of one answer
        self.requests: list[bytes] = []
        self.queue: list[str] = []  # case names for requests without the header, in order
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "WireUpstream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._sock.close()
        for conn in list(self._open):
            conn.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = self._read_request(conn)
            self.requests.append(head)
            case = b""
            received = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                received[b"{{" + name.strip().lower() + b"}}"] = value.strip()
                if name.strip().lower() == CASE_HEADER:
                    case = value.strip()
            if not case:
                with self._lock:
                    case = self.queue.pop(0).encode() if self.queue else b""
            pieces = self.answers.get(case.decode(), [b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"])
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(self.pause)
                if b"{{" in piece:
                    for template, value in received.items():
                        piece = piece.replace(template, value)
                conn.sendall(piece)
            time.sleep(self.pause)
        except OSError:
            pass
        finally:
            self._open.discard(conn)
            conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        """The request head; its body (by content-length or chunked) is read and dropped."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while not rest.endswith(b"0\r\n\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
        else:
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
        return head
