"""http(s):// model folders against a real HTTP server on loopback, through fsspec and aiohttp.

A folder is a directory listing (as `python -m http.server` serves one); a
download cut off halfway must fail with the URI and leave nothing behind that
a later call would take for a complete copy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from zerocopy_runtime._errors import CheckpointError
from zerocopy_runtime._source import local_path
from zerocopy_runtime.config import ModelSource

pytestmark = pytest.mark.unit

pytest.importorskip("aiohttp")

FILES = {
    "model.safetensors": b"S" * 4096,
    "pytorch_model.bin": b"B" * 64,
    "config.json": b"{}",
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b"{}",
    "merges.txt": b"a b\n",
    "chat_template.jinja": b"{{ messages }}",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "onnx/model.onnx": b"O" * 64,
}


class _Handler(SimpleHTTPRequestHandler):
    """Serves the folder; with `cut` set, stops sending model.safetensors halfway through."""

    cut = False

    def do_GET(self) -> None:
        if self.cut and self.path.endswith("model.safetensors"):
            body = FILES["model.safetensors"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[_Handler]]]:
    root = tmp_path / "site" / "tiny"
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    monkeypatch.setenv("ZEROCOPY_CACHE", str(tmp_path / "cache"))
    handler = type("Handler", (_Handler,), {"cut": False})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(tmp_path / "site")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/tiny/", handler
    httpd.shutdown()


def _source(uri: str) -> ModelSource:
    return ModelSource.model_validate({"uri": uri, "architecture": {"factory": "a:b"}})


def test_a_folder_brings_its_weights_tokenizer_template_and_pooling(server: tuple[str, type[_Handler]]) -> None:
    url, _ = server
    path = local_path(_source(url))
    got = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert got == sorted(name for name in FILES if name not in ("pytorch_model.bin", "onnx/model.onnx"))
    assert (path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert (path / "1_Pooling" / "config.json").read_bytes() == FILES["1_Pooling/config.json"]


def test_a_download_cut_off_halfway_fails_and_leaves_nothing_to_reuse(
    server: tuple[str, type[_Handler]], tmp_path: Path
) -> None:
    url, handler = server
    handler.cut = True
    with pytest.raises(CheckpointError, match=r"Cannot download 'http://127\.0\.0\.1:\d+/tiny/'"):
        local_path(_source(url))
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not left, f"a cut-off download left {left} in the cache"
    handler.cut = False
    path = local_path(_source(url))  # the next try downloads afresh, completely
    assert (path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
