"""Local servers for the network tests: on the host's loopback only, each in a
thread, each recording what reached it, all stopped by their fixture."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RawServer:
    """TCP on 127.0.0.1 whose connections ``handler(conn, server)`` serves,
    each in a thread; ``lines`` records request lines, ``connections``
    counts arrivals.  Closing closes every connection still open."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.lines: list[str] = []
        self.connections = 0
        self._open: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass

    def read_head(self, conn: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.lines.append(head.split(b"\r\n")[0].decode())
        return head, rest

    def close(self) -> None:
        for sock in [self._listener, *self._open]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class LoopbackHttpServer:
    """An HTTP server on 127.0.0.1 in a thread of its own; ``port`` is where."""

    def _serve(self, handler, tls: ssl.SSLContext | None = None) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:  # HTTPS: each accepted connection does the handshake
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class HttpServer(LoopbackHttpServer):
    """A small HTTP server on 127.0.0.1: answers every GET or POST with
    ``body`` (plus the path it saw) and records (method, path, headers)."""

    def __init__(self, body: str, tls: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers.items())))
                data = f"{outer.body} {self.command} {self.path} {len(payload)}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self._serve(Handler, tls)


def self_signed_tls(directory: str, name: str) -> tuple[ssl.SSLContext, str]:
    """A server context with a fresh self-signed certificate for ``name``
    (made by the openssl command), and the certificate's path, which a
    client passes as the one authority it trusts."""
    cert, key = f"{directory}/{name}.pem", f"{directory}/{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


class EchoServer:
    """TCP on 127.0.0.1: each connection gets back what it sent, upper-cased
    after the client's end of file ("half-close" mode, so a test sees that
    the proxy passed the EOF on and kept the way back open), or echoed as
    it comes (the default)."""

    def __init__(self, *, after_eof: bool = False) -> None:
        self.after_eof = after_eof
        self.connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self.port = self._listener.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                if self.after_eof:
                    data = b""
                    while chunk := conn.recv(65536):
                        data += chunk
                    conn.sendall(data.upper())
                else:
                    while chunk := conn.recv(65536):
                        conn.sendall(chunk)
            except OSError:
                pass

    def close(self) -> None:
        self._closing = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)


def resolver_for(names: dict[str, list[str]]):
    """A proxy resolver (Sandbox(resolver=...)) that knows only ``names``,
    test hosts mapped to local addresses; any other name fails like a name
    that does not exist."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"{host}: no such test host")
        return names[host]

    return resolve
