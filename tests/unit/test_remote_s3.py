"""s3:// model folders and files against moto's S3 server on loopback, through fsspec and s3fs.

The client is the real one (s3fs on aiobotocore) speaking HTTP to a real
server; only the store behind it is moto's. The endpoint comes from
`AWS_ENDPOINT_URL`, as it would for MinIO or any S3-compatible store. A
forwarding proxy in front of moto cuts a download off halfway.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.unit.test_remote_http import FILES
from zerocopy_runtime._errors import CheckpointError
from zerocopy_runtime._source import local_path, verify
from zerocopy_runtime.config import ModelSource

pytestmark = pytest.mark.unit

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "models"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    s3.create_bucket(Bucket=BUCKET)
    for name, data in FILES.items():
        s3.put_object(Bucket=BUCKET, Key=f"tiny/{name}", Body=data)
    yield url
    server.stop()


class _CuttingProxy(BaseHTTPRequestHandler):
    """Forwards every request to moto; with `cut` set, sends only half of each model.safetensors body."""

    upstream = ""
    cut = False

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = urlsplit(self.upstream)
        connection = http.client.HTTPConnection(upstream.hostname or "", upstream.port, timeout=30)
        connection.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = connection.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.cut and self.command == "GET" and "model.safetensors" in self.path:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def proxy(endpoint: str) -> Iterator[tuple[str, type[_CuttingProxy]]]:
    handler = type("Proxy", (_CuttingProxy,), {"upstream": endpoint, "cut": False})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()


@pytest.fixture
def s3_env(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "us-east-1", "ZEROCOPY_CACHE": str(tmp_path / "cache"),
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # a fresh client reads this test's environment
    return tmp_path / "cache"


def _source(uri: str, sha256: str | None = None) -> ModelSource:
    return ModelSource.model_validate({"uri": uri, "sha256": sha256, "architecture": {"factory": "a:b"}})


def test_an_s3_folder_brings_its_weights_tokenizer_template_and_pooling(s3_env: Path) -> None:
    path = local_path(_source(f"s3://{BUCKET}/tiny/"))
    got = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert got == sorted(name for name in FILES if name not in ("pytorch_model.bin", "onnx/model.onnx"))
    assert (path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert (path / "chat_template.jinja").read_bytes() == FILES["chat_template.jinja"]
    assert path.parent.parent == s3_env  # in the cache, under one complete entry


def test_an_s3_file_is_checked_against_its_sha256(s3_env: Path) -> None:
    uri = f"s3://{BUCKET}/tiny/model.safetensors"
    good = hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    path = local_path(_source(uri, good))
    verify(path, _source(uri, good))
    with pytest.raises(CheckpointError, match="Checksum mismatch"):
        verify(path, _source(uri, "0" * 64))


def test_a_missing_s3_object_is_a_clear_error_that_leaves_nothing_behind(s3_env: Path) -> None:
    with pytest.raises(CheckpointError, match=r"Cannot download 's3://models/nothing-here\.pt'.*credentials"):
        local_path(_source(f"s3://{BUCKET}/nothing-here.pt"))
    assert not [p for p in s3_env.rglob("*") if p.is_file()]


def test_an_s3_download_cut_off_halfway_fails_and_leaves_nothing_to_reuse(
    s3_env: Path, proxy: tuple[str, type[_CuttingProxy]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, handler = proxy
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    handler.cut = True
    with pytest.raises(CheckpointError, match=r"Cannot download 's3://models/tiny/'"):
        local_path(_source(f"s3://{BUCKET}/tiny/"))
    assert not [p for p in s3_env.rglob("*") if p.is_file()], "a cut-off download left files in the cache"
    handler.cut = False
    path = local_path(_source(f"s3://{BUCKET}/tiny/"))  # the next try downloads afresh, completely
    assert (path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
