"""A real Kubernetes control plane on 127.0.0.1 for tests, envtest style: etcd and kube-apiserver as two local
processes, plus kube-controller-manager (garbage collection, namespace deletion) where its binary is present.

The binaries come from `$KUBEBUILDER_ASSETS` (the envtest convention: `setup-envtest use 1.28 -p path` prints
such a folder) or, where that is unset, from the packed copy in `../shared/envtest/`, unpacked once into a
cache folder. Nothing listens beyond loopback; certificates are made here, for the run.

`python -m tests.kube.envtest` starts one and prints a kubeconfig, for poking at it by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ASSETS_ENV",
    "PACKED_DIR",
    "Binaries",
    "ControlPlane",
    "dying_with_this_process",
    "find_binaries",
    "running_control_plane",
]

ASSETS_ENV = "KUBEBUILDER_ASSETS"
PACKED_DIR = Path(__file__).resolve().parents[3] / "shared" / "envtest"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zerocopy-envtest"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Binaries:
    """Where the control plane's programs are; `controller_manager` is None where it is absent (envtest's release)."""

    etcd: Path
    apiserver: Path
    controller_manager: Path | None


def find_binaries() -> Binaries | str:
    """The binaries to run, or why none can be found (a skip reason naming both places looked in)."""
    assets = os.environ.get(ASSETS_ENV)
    if assets:
        folder = Path(assets).expanduser()
    elif archives := sorted(PACKED_DIR.glob("k8s-*-linux-amd64.tar.xz")):
        folder = _unpacked(archives[-1])
    else:
        return (
            f"no Kubernetes control-plane binaries: ${ASSETS_ENV} is unset (on a machine that reaches the envtest "
            f"release bucket, `export {ASSETS_ENV}=$(setup-envtest use 1.28 -p path)`) and {PACKED_DIR} holds no "
            "k8s-*-linux-amd64.tar.xz; or run these tests against a cluster with --kubeconfig"
        )
    etcd, apiserver, manager = (folder / name for name in ("etcd", "kube-apiserver", "kube-controller-manager"))
    if not (etcd.is_file() and apiserver.is_file()):
        where = f"${ASSETS_ENV}={folder}" if assets else f"{folder} (unpacked from {PACKED_DIR})"
        return (
            f"{where} holds no etcd and kube-apiserver: point ${ASSETS_ENV} at the folder `setup-envtest use 1.28 "
            f"-p path` prints, or unset it to use the archive in {PACKED_DIR}"
        )
    return Binaries(etcd, apiserver, manager if manager.is_file() else None)


def _unpacked(archive: Path) -> Path:
    """The archive's folder of binaries, unpacked once into CACHE_DIR (the packed copy is read-only) and checked
    against its SHA256SUMS."""
    version = archive.name.removesuffix("-linux-amd64.tar.xz")
    folder = CACHE_DIR / version
    if (folder / ".complete").is_file():
        return folder
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".unpack-"))
    try:
        with tarfile.open(archive) as packed:
            packed.extractall(staging, filter="data")
        (unpacked,) = [path for path in staging.iterdir() if path.is_dir()]
        sums = unpacked / "SHA256SUMS"
        if not sums.is_file():
            raise RuntimeError(f"{archive} holds no SHA256SUMS: its binaries cannot be checked")
        for line in sums.read_text().splitlines():
            digest, name = line.split()
            actual = hashlib.sha256((unpacked / name.lstrip("*")).read_bytes()).hexdigest()
            if actual != digest:
                raise RuntimeError(f"{archive}: {name} does not match its SHA256SUMS; the archive is damaged")
        (unpacked / ".complete").touch()
        with contextlib.suppress(OSError):  # another session may have put its identical copy there first
            unpacked.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (folder / ".complete").is_file():
        raise RuntimeError(f"could not unpack {archive} into {folder}")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --- certificates ------------------------------------------------------------------------------------------


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class _Authority:
    """A throwaway certificate authority: the apiserver's serving certificate and the clients' certificates."""

    key: rsa.RSAPrivateKey = field(default_factory=_key)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zerocopy-envtest-ca")])
        self.cert = (
            self._builder(name, self.key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def _builder(self, subject: x509.Name, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if key is self.key else self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, common_name: str, *, groups: tuple[str, ...] = (), server: bool = False) -> tuple[bytes, bytes]:
        """(certificate, key) in PEM: a client certificate for user `common_name` in `groups`, or the server's."""
        key = _key()
        subject = x509.Name(
            [
                *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(subject, key).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            names = [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _pem_cert(builder.sign(self.key, hashes.SHA256())), _pem_key(key)


# --- the control plane -------------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """etcd, kube-apiserver and (where present) kube-controller-manager, started in `folder`; `kubeconfig` is
    an admin's (group system:masters)."""

    binaries: Binaries
    folder: Path
    url: str = ""
    kubeconfig: Path = field(init=False)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _authority: _Authority = field(default_factory=_Authority)

    @property
    def garbage_collected(self) -> bool:
        """Whether owner references and namespace deletion are acted on (the controller manager runs)."""
        return self.binaries.controller_manager is not None

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"

    def start(self, timeout: float = 60) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write("ca.crt", _pem_cert(self._authority.cert))
        cert, key = self._authority.issue("kube-apiserver", server=True)
        self._write("apiserver.crt", cert)
        self._write("apiserver.key", key)
        account_key = _key()
        self._write("sa.key", _pem_key(account_key))
        self._write(
            "sa.pub",
            account_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        secure = free_port()
        self.url = f"https://{LOOPBACK}:{secure}"
        self.kubeconfig = self.user_kubeconfig("admin", groups=("system:masters",))
        try:
            self._start_etcd_and_apiserver(secure, timeout)
            if self.binaries.controller_manager is not None:
                self._start_controller_manager(timeout)
        except BaseException:
            self.stop()
            raise

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                dying_with_this_process(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._processes.append(process)
        return process

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.folder / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def _start_etcd_and_apiserver(self, secure: int, timeout: float) -> None:
        client, peer = free_port(), free_port()
        etcd_url = f"http://{LOOPBACK}:{client}"
        peer_url = f"http://{LOOPBACK}:{peer}"
        etcd = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd), "--data-dir", str(self.folder / "etcd"),
                "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"default={peer_url}", "--log-level", "error",
                "--unsafe-no-fsync",  # a throwaway store: durability costs seconds on a slow disk
            ],
        )  # fmt: skip
        self._wait(lambda: _plain_get(f"{etcd_url}/health"), etcd, "etcd", timeout)
        folder = self.folder
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.apiserver), "--etcd-servers", etcd_url,
                "--bind-address", LOOPBACK, "--advertise-address", LOOPBACK, "--secure-port", str(secure),
                "--endpoint-reconciler-type", "none",
                "--tls-cert-file", str(folder / "apiserver.crt"),
                "--tls-private-key-file", str(folder / "apiserver.key"),
                "--client-ca-file", str(self.ca_file),
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", str(folder / "sa.pub"),
                "--service-account-signing-key-file", str(folder / "sa.key"),
                "--service-cluster-ip-range", "10.96.0.0/16",
                "--authorization-mode", "RBAC",
                "--enable-admission-plugins", "OwnerReferencesPermissionEnforcement",
            ],
        )  # fmt: skip
        self._wait(lambda: self.get("/readyz") == "ok", apiserver, "kube-apiserver", timeout)

    def _start_controller_manager(self, timeout: float) -> None:
        assert self.binaries.controller_manager is not None  # checked by the caller
        kubeconfig = self.user_kubeconfig("system:kube-controller-manager")
        manager = self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries.controller_manager),
                "--controllers", "garbagecollector,namespace,serviceaccount-token,serviceaccount",
                "--use-service-account-credentials=true",
                "--service-account-private-key-file", str(self.folder / "sa.key"),
                "--root-ca-file", str(self.ca_file), "--leader-elect=false",
                "--kubeconfig", str(kubeconfig), "--authentication-kubeconfig", str(kubeconfig),
                "--authorization-kubeconfig", str(kubeconfig),
                "--bind-address", LOOPBACK, "--secure-port", str(free_port()),
            ],
        )  # fmt: skip
        self._wait(
            lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            manager,
            "kube-controller-manager",
            timeout,
        )

    def _wait(self, ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, timeout: float) -> None:
        """Poll `ready()` until true; fail with the process's log if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {process.returncode}"
                    if process.poll() is not None
                    else f"not ready in {timeout:.0f} s"
                )
                raise RuntimeError(f"{name} {state}; its log ends:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def get(self, path: str) -> str | None:
        """The body of a GET as the admin, or None where it fails (not found, not up yet)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(self.folder / "admin.crt", self.folder / "admin.key")
        try:
            with urllib.request.urlopen(self.url + path, context=context, timeout=5) as response:
                return str(response.read().decode())
        except (OSError, urllib.error.HTTPError):
            return None

    def user_kubeconfig(self, user: str, *, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig authenticating as `user` (in `groups`) by a client certificate of this control plane."""
        stem = user.replace(":", "-")
        cert, key = self._authority.issue(user, groups=groups)
        return self.write_kubeconfig(
            self.folder / f"{stem}.kubeconfig",
            {
                "client-certificate": str(self._write(f"{stem}.crt", cert)),
                "client-key": str(self._write(f"{stem}.key", key)),
            },
        )

    def write_kubeconfig(self, path: Path, credentials: dict[str, str]) -> Path:
        """A kubeconfig for this control plane with `credentials` (kubeconfig `user` fields, e.g. a token)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "envtest", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": "user", "user": credentials}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "user"}}],
            "current-context": "envtest",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self._processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()


def dying_with_this_process(command: list[str]) -> list[str]:
    """`command`, made to get SIGTERM when this (test) process dies, even killed (a CI timeout, a Ctrl-C), so that
    nothing it started outlives the session: util-linux's `setpriv --pdeathsig` where there is one."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


def _plain_get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running_control_plane(binaries: Binaries, folder: Path | None = None) -> Iterator[ControlPlane]:
    """A started control plane for the block; its processes are stopped and its folder removed afterwards."""
    own = folder is None
    where = Path(tempfile.mkdtemp(prefix="zerocopy-envtest-")) if folder is None else folder
    plane = ControlPlane(binaries, where)
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
        if own:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    found = find_binaries()
    if isinstance(found, str):
        raise SystemExit(found)
    with running_control_plane(found) as plane:
        print(f"export KUBECONFIG={plane.kubeconfig}  # Ctrl-C stops the control plane")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
