"""Remote checkpoint sources (upstreams/fetch.py), offline: cache hits, downloads from a local HTTP server, checksums,
interrupted and stalled downloads, offline mode, HF hub ids in a fake HF cache and from a fake hub.

Every test runs behind ``loopback_only``: a connection or name lookup for any host but 127.0.0.1 is refused and fails
the test, so nothing here can reach the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import padded_batch, tiny_apc

from speechbench.upstreams import fetch, registry
from speechbench.upstreams.apc import APCUpstream, apc_s3prl_checkpoint
from speechbench.upstreams.checkpoints import CheckpointError, detect_checkpoint
from speechbench.upstreams.fetch import cache_dir, hub_directory, looks_like_hub_id, offline, unreachable, url_file
from speechbench.upstreams.registry import build_upstream

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "SPEECHBENCH_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
REV = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch, tmp_path):
    """Refuse (and record) any connection or lookup off 127.0.0.1; isolate caches and the offline switches."""
    blocked: list[object] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def local(host) -> bool:
        return (host.decode() if isinstance(host, bytes) else str(host)) in LOOPBACK

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            blocked.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: no lookups of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guard(real):
        def connect(self, address):
            if isinstance(address, tuple) and not local(address[0]):
                blocked.append(address)
                raise ConnectionRefusedError(f"test guard: no connections to {address}")
            return real(self, address)
        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    for var in OFFLINE_VARS + PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "sb"))
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import time
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield blocked
    assert not blocked, f"a test tried to reach a host other than 127.0.0.1: {blocked}"


Handler = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A local HTTP server on an ephemeral port: ``routes`` maps a path to a handler; ``requests`` logs each request."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()  # lets stalled handlers go at teardown
        server = self

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.requests.append(("GET", self.path))
                server.routes.get(self.path, not_found)(self)

            def do_HEAD(self):  # noqa: N802
                server.requests.append(("HEAD", self.path))
                server.routes.get(self.path, not_found)(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # handlers that fail on purpose stay quiet
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.root + path

    def gets(self, path: str) -> int:
        return self.requests.count(("GET", path))

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def not_found(h: BaseHTTPRequestHandler) -> None:
    h.send_response(404)
    h.send_header("Content-Length", "0")
    h.end_headers()


def serve(data: bytes, headers: dict[str, str] | None = None) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
    return handle


def cut_short(data: bytes, sent: int) -> Handler:
    """Announces all of ``data`` but sends ``sent`` bytes and closes the connection."""
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:sent])
    return handle


def raises_mid_body(data: bytes, sent: int) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        cut_short(data, sent)(h)
        raise ConnectionResetError("the server died mid-body")
    return handle


def stalls(data: bytes, sent: int, release: threading.Event) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        cut_short(data, sent)(h)
        release.wait(10)
    return handle


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def cache_files() -> list[str]:
    """Everything in the checkpoint cache, temporary files included."""
    return sorted(p.name for p in cache_dir().iterdir()) if cache_dir().is_dir() else []


@pytest.fixture(scope="module")
def apc_model():
    return tiny_apc(seed=3)


@pytest.fixture(scope="module")
def apc_bytes(apc_model) -> bytes:
    buffer = io.BytesIO()
    torch.save(apc_s3prl_checkpoint(apc_model), buffer)
    return buffer.getvalue()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ names and switches


@pytest.mark.parametrize("text, expected", [
    ("facebook/hubert-base-ls960", True), ("org/name.v2_b", True), ("a/b", True),
    ("hubert", False), ("a/b/c", False), ("org/", False), ("/org/name", False), ("./org/name", False),
    ("~/name", False), (".hidden/name", False), ("https://huggingface.co/a/b", False), ("org name/x", False),
])
def test_looks_like_hub_id(text, expected):
    assert looks_like_hub_id(text) is expected


@pytest.mark.parametrize("env, expected", [
    ({}, False), ({"SPEECHBENCH_OFFLINE": "1"}, True), ({"HF_HUB_OFFLINE": "true"}, True),
    ({"TRANSFORMERS_OFFLINE": " ON "}, True), ({"HF_HUB_OFFLINE": "YES"}, True), ({"HF_HUB_OFFLINE": "0"}, False),
    ({"SPEECHBENCH_OFFLINE": ""}, False), ({"SPEECHBENCH_OFFLINE": "no", "HF_HUB_OFFLINE": "1"}, True),
])
def test_offline_switches(monkeypatch, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert offline() is expected


def test_unreachable_probes_the_scheme_port(monkeypatch, server):
    assert unreachable(server.url("/x")) is None  # a live local server
    port = closed_port()
    why = unreachable(f"http://127.0.0.1:{port}/x")
    assert why.startswith("127.0.0.1 is unreachable (ConnectionRefusedError") and "\n" not in why
    probed = []

    def record(address, timeout=None):
        probed.append(address)
        raise OSError("probe only")

    monkeypatch.setattr(socket, "create_connection", record)
    unreachable("http://127.0.0.1/a.ckpt")
    unreachable("https://127.0.0.1/a.ckpt")
    assert probed == [("127.0.0.1", 80), ("127.0.0.1", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # behind a proxy the probe is skipped
    assert unreachable("https://127.0.0.1/a.ckpt") is None and len(probed) == 2


# ------------------------------------------------------------------------------------------------------ cache hits


def test_cached_file_is_used_without_network(monkeypatch):
    data = b"cached checkpoint bytes"
    target = cache_dir() / "apc.ckpt"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    url = "https://checkpoints.example.org/models/apc.ckpt"  # the guard fails the test if this host is contacted
    assert url_file(url, "apc") == target
    assert url_file(url, "apc", sha(data)) == target
    assert url_file(url, "apc", sha(data).upper()) == target
    monkeypatch.setenv("SPEECHBENCH_OFFLINE", "1")  # a cache hit needs no network, so offline mode does not matter
    assert url_file(url, "apc", sha(data)) == target
    assert target.read_bytes() == data


def test_cached_file_with_wrong_sha256_is_refused_in_one_line():
    target = cache_dir() / "apc.ckpt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the published checkpoint")
    with pytest.raises(CheckpointError) as err:
        url_file("https://checkpoints.example.org/apc.ckpt", "apc", sha(b"the published checkpoint"))
    message = one_line(err)
    assert message.startswith(f"apc: {target} has sha256 ") and sha(b"the published checkpoint")[:16] in message
    assert message.endswith("delete the file and fetch it again")


# ------------------------------------------------------------------------------------------------------- downloads


def test_download_is_cached_once_and_loads_as_an_apc_upstream(server, apc_model, apc_bytes):
    server.routes["/files/apc.ckpt"] = serve(apc_bytes)
    url = server.url("/files/apc.ckpt")
    path = url_file(url, "apc", sha(apc_bytes))
    assert path == cache_dir() / "apc.ckpt" and path.read_bytes() == apc_bytes
    assert cache_files() == ["apc.ckpt"]  # renamed into place: no temporary file left
    assert url_file(url, "apc", sha(apc_bytes)) == path and url_file(url, "apc") == path
    assert server.gets("/files/apc.ckpt") == 1  # the second and third calls were cache hits

    detected = detect_checkpoint(path)
    assert (detected.format, detected.family, detected.sha256) == ("s3prl", "apc", sha(apc_bytes))
    up = build_upstream("apc", ckpt=str(path))
    assert (up.num_layers, up.hidden_size, up.checkpoint_format) == (3, 32, "s3prl")
    wavs, lengths = padded_batch([1600, 1200])
    with torch.inference_mode():
        torch.testing.assert_close(up(wavs, lengths).hidden, APCUpstream(apc_model)(wavs, lengths).hidden)


def test_card_with_a_url_source_downloads_verifies_and_builds(monkeypatch, server, apc_bytes):
    """The whole card path: card -> url_file -> detect -> the card's sha256 -> upstream; then from the cache."""
    server.routes["/apc_360hr.ckpt"] = serve(apc_bytes)
    cards = registry.load_cards()
    card = dataclasses.replace(cards["apc"], source=server.url("/apc_360hr.ckpt"), sha256=sha(apc_bytes))
    monkeypatch.setattr(registry, "load_cards", lambda: {**cards, "apc": card})
    first = build_upstream("apc")
    second = build_upstream("apc")
    assert server.gets("/apc_360hr.ckpt") == 1 and cache_files() == ["apc_360hr.ckpt"]
    assert first.num_layers == second.num_layers == 3
    monkeypatch.setenv("SPEECHBENCH_OFFLINE", "1")
    assert build_upstream("apc").num_layers == 3  # offline, from the cache


def test_download_with_wrong_sha256_keeps_nothing(server):
    data = b"a checkpoint that changed at the source"
    server.routes["/apc.ckpt"] = serve(data)
    url = server.url("/apc.ckpt")
    with pytest.raises(CheckpointError) as err:
        url_file(url, "apc", sha(b"what the card was written for"))
    message = one_line(err)
    assert message.startswith(f"apc: the download of {url} has sha256 {sha(data)[:16]}...")
    assert "nothing was kept in the cache" in message and ".part" not in message
    assert cache_files() == []
    assert url_file(url, "apc", sha(data)).read_bytes() == data  # with the right checksum it is kept
    assert cache_files() == ["apc.ckpt"]


@pytest.mark.parametrize("failure", ["cut_short", "raises_mid_body"])
def test_interrupted_download_keeps_nothing_and_a_retry_works(server, apc_bytes, failure):
    url = server.url("/apc.ckpt")
    half = len(apc_bytes) // 2
    server.routes["/apc.ckpt"] = {"cut_short": cut_short, "raises_mid_body": raises_mid_body}[failure](apc_bytes, half)
    with pytest.raises(CheckpointError) as err:
        url_file(url, "apc")  # no checksum: the length is the only thing that can tell
    message = one_line(err)
    assert message.startswith(f"apc: {url} is not cached at {cache_dir() / 'apc.ckpt'} and the download was cut off")
    assert f"after {half} of {len(apc_bytes)} bytes" in message and "--upstream apc --ckpt PATH" in message
    assert cache_files() == []
    server.routes["/apc.ckpt"] = serve(apc_bytes)
    path = url_file(url, "apc", sha(apc_bytes))
    assert path.read_bytes() == apc_bytes and cache_files() == ["apc.ckpt"]
    assert detect_checkpoint(path).family == "apc"


def test_stalled_download_times_out_and_keeps_nothing(monkeypatch, server):
    monkeypatch.setattr(fetch, "TIMEOUT_S", 0.3)
    server.routes["/slow.ckpt"] = stalls(b"x" * 5000, 1000, server.release)
    with pytest.raises(CheckpointError) as err:
        url_file(server.url("/slow.ckpt"), "apc")
    message = one_line(err)
    assert "the download failed (TimeoutError: timed out)" in message
    assert cache_files() == []


def test_http_error_is_one_line_and_keeps_nothing(server):
    url = server.url("/missing.ckpt")
    with pytest.raises(CheckpointError) as err:
        url_file(url, "apc")
    assert "the download failed (HTTPError: HTTP Error 404: Not Found)" in one_line(err)
    assert cache_files() == []


def test_unreachable_host_fails_fast_in_one_line():
    url = f"http://127.0.0.1:{closed_port()}/apc.ckpt"
    with pytest.raises(CheckpointError) as err:
        url_file(url, "apc")
    message = one_line(err)
    assert message.startswith(f"apc: {url} is not cached at ") and "127.0.0.1 is unreachable" in message
    assert cache_files() == []


@pytest.mark.parametrize("var", ["SPEECHBENCH_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_refuses_to_download(monkeypatch, server, var):
    server.routes["/apc.ckpt"] = serve(b"never fetched")
    monkeypatch.setenv(var, "1")
    url = server.url("/apc.ckpt")
    with pytest.raises(CheckpointError) as err:
        url_file(url, "apc")
    message = one_line(err)
    assert message.startswith(f"apc: {url} is not cached at {cache_dir() / 'apc.ckpt'} and offline mode is on")
    assert message.endswith("--upstream apc --ckpt PATH")
    assert server.requests == [] and cache_files() == []


# ----------------------------------------------------------------------------------------------------- HF hub ids


@pytest.fixture
def fresh_hf_agent_registry(monkeypatch):
    """huggingface_hub 2.x fetches an agent registry from the hub the first time it builds HTTP headers, once per
    process; forget it, so that a cache lookup going through header building is caught here whatever ran before."""
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:  # another huggingface_hub version: nothing to forget
        return
    monkeypatch.setattr(_detect_agent, "_registry", None, raising=False)
    monkeypatch.setattr(_detect_agent, "_read_cached_registry", lambda path, max_age: None, raising=False)


def fake_hf_cache(repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """The HF cache layout hf_hub_download(local_files_only=True) reads: refs/<revision> -> snapshots/<commit>/."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (root / "refs").mkdir()
    (root / "refs" / revision).write_text(REV)
    return snapshot


@pytest.mark.parametrize("offline_mode", [False, True])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hub_id_in_the_hf_cache_needs_no_network(monkeypatch, fresh_hf_agent_registry, offline_mode, weights):
    snapshot = fake_hf_cache("org/tiny", {"config.json": b"{}", weights: b"weights"})
    if offline_mode:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_directory("org/tiny", "org/tiny") == snapshot  # the guard fails the test on any network attempt


def test_hub_id_offline_and_not_cached_is_one_line(monkeypatch, fresh_hf_agent_registry, tmp_path):
    monkeypatch.setenv("SPEECHBENCH_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        hub_directory("org/absent", "org/absent")
    message = one_line(err)
    assert message.startswith(f"HF hub id org/absent is not in the HF cache ({tmp_path / 'hf' / 'hub'})")
    assert "offline mode is on" in message and message.endswith("local HF directory as --upstream PATH")
    with pytest.raises(CheckpointError) as err:
        hub_directory("org/absent", "hubert", is_card=True)
    message = one_line(err)
    assert message.startswith("hubert: HF hub id org/absent") and message.endswith("--upstream hubert --ckpt PATH")


@pytest.fixture
def fake_hub(monkeypatch, server):
    """Point huggingface_hub at the local server (its URL template is built at import time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.root)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.root + "/{repo_id}/resolve/{revision}/{filename}")
    return server


def hub_file(data: bytes) -> Handler:
    return serve(data, {"X-Repo-Commit": REV, "ETag": f'"{sha(data)}"'})


def test_hub_id_is_downloaded_once_from_the_hub(fake_hub):
    fake_hub.routes["/org/tiny/resolve/main/config.json"] = hub_file(b'{"model_type": "hubert"}')
    fake_hub.routes["/org/tiny/resolve/main/pytorch_model.bin"] = hub_file(b"weights")
    directory = hub_directory("org/tiny", "org/tiny")  # model.safetensors and the preprocessor config are 404s
    assert (directory / "config.json").read_bytes() == b'{"model_type": "hubert"}'
    assert (directory / "pytorch_model.bin").read_bytes() == b"weights"
    gets = len([r for r in fake_hub.requests if r[0] == "GET"])
    assert hub_directory("org/tiny", "org/tiny") == directory  # from the HF cache now
    assert len([r for r in fake_hub.requests if r[0] == "GET"]) == gets


def test_hub_download_failure_and_unreachable_hub_are_one_line(monkeypatch, fake_hub):
    with pytest.raises(CheckpointError) as err:
        hub_directory("org/absent", "org/absent")
    message = one_line(err)
    assert message.startswith("HF hub id org/absent is not in the HF cache") and "the download failed (" in message
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(CheckpointError) as err:
        hub_directory("org/absent", "org/absent")
    assert "and 127.0.0.1 is unreachable (ConnectionRefusedError" in one_line(err)


def test_hf_url_goes_through_the_hf_cache(monkeypatch, fresh_hf_agent_registry):
    data = b"an HF-hosted checkpoint"
    snapshot = fake_hf_cache("leo/apc_series", {"apc_360hr.ckpt": data})
    url = "https://huggingface.co/leo/apc_series/resolve/main/apc_360hr.ckpt"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert url_file(url, "apc", sha(data)) == snapshot / "apc_360hr.ckpt"
    with pytest.raises(CheckpointError) as err:
        url_file(url, "apc", sha(b"other"))
    assert "delete the file and fetch it again" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        url_file("https://huggingface.co/leo/apc_series/resolve/main/apc_other.ckpt", "apc")
    message = one_line(err)
    assert "apc_other.ckpt is not in the HF cache" in message and "offline mode is on" in message
    assert cache_files() == []
