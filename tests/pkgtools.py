"""Tiny wheels and a local package index for the environment tests: nothing
is fetched from anywhere but the test's own loopback server."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import tempfile
import zipfile
from http.server import SimpleHTTPRequestHandler

from netservers import LoopbackHttpServer


@contextlib.contextmanager
def shared_wheels(*packages: tuple[str, str, str]):
    """A find_links directory in /var/tmp, readable by every uid (the
    sandbox's is not root's), with a tiny wheel for each (name, version,
    source); removed afterwards."""
    directory = tempfile.mkdtemp(prefix="heel-wheels-", dir="/var/tmp")
    try:
        os.chmod(directory, 0o755)
        for name, version, source in packages:
            build_wheel(directory, name, version, source)
        for name in os.listdir(directory):
            os.chmod(os.path.join(directory, name), 0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_wheel(directory: str, name: str, version: str, source: str, *, requires: tuple[str, ...] = ()) -> str:
    """A pure-Python wheel whose one module, ``name``, holds ``source``;
    returns its path."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{module}/__init__.py": source,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: heel-tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(directory, f"{module}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


class SimpleIndex(LoopbackHttpServer):
    """A PEP 503 "simple" index of the wheels in ``directory``, served on
    127.0.0.1; ``requests`` records every path asked for."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.requests: list[str] = []
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=directory, **kwargs)

            def do_GET(self):
                outer.requests.append(self.path)
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 2 and parts[0] == "simple":
                    project = parts[1].lower().replace("_", "-")
                    links = [f'<a href="/{f}">{f}</a>' for f in sorted(os.listdir(directory))
                             if f.endswith(".whl") and f.split("-")[0].lower().replace("_", "-") == project]
                    if not links:
                        self.send_error(404)
                        return
                    body = ("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>").encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self._serve(Handler)
