"""Tests for corpus downloads (moeformer.data.download), served from localhost: never the network."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from moeformer.data import download as dl
from moeformer.data.download import CORPORA, DownloadError, RemoteCorpus, RemoteFile, download, fetch, sha256_of

PAYLOAD = "First Citizen:\nBefore we proceed any further, hear me speak.\n你好。\n".encode() * 50


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, request log): an HTTP server on localhost in a thread."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root, requests
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def closed_port_url():
    """A localhost URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def test_fetch_writes_the_file_and_verifies_it(server, tmp_path):
    """fetch saves the served bytes, checks the sha256 and leaves no temporary file."""
    base, root, _ = server
    (root / "input.txt").write_bytes(PAYLOAD)
    out = tmp_path / "out"
    path = fetch(base + "input.txt", out / "input.txt", sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(out) == []


def test_fetch_with_a_progress_bar(server, tmp_path, capsys):
    """progress=True draws a tqdm bar (on stderr, never stdout) and still writes the file."""
    base, root, _ = server
    (root / "input.txt").write_bytes(PAYLOAD)
    fetch(base + "input.txt", tmp_path / "input.txt", progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "input.txt" in captured.err
    assert (tmp_path / "input.txt").read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    """A wrong sha256 raises DownloadError; neither the file nor a temporary is left behind."""
    base, root, _ = server
    (root / "input.txt").write_bytes(PAYLOAD)
    with pytest.raises(DownloadError, match="checksum mismatch .* expected sha256 0{64}"):
        fetch(base + "input.txt", tmp_path / "input.txt", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == [root]


def test_http_error_is_a_download_error(server, tmp_path):
    """A 404 is reported with its status."""
    base, _, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(base + "missing.txt", tmp_path / "x.txt", progress=False)
    assert not (tmp_path / "x.txt").exists()


def test_unreachable_says_so_and_points_to_local_data(closed_port_url, tmp_path):
    """A refused connection is a DownloadError saying the network is unreachable and naming --data PATH."""
    with pytest.raises(DownloadError, match="network looks unreachable") as info:
        fetch(closed_port_url, tmp_path / "input.txt", progress=False, timeout=5)
    assert "--data PATH" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_file_url(tmp_path):
    """file:// URLs work too (a local mirror)."""
    source = tmp_path / "source.txt"
    source.write_bytes(PAYLOAD)
    assert fetch(source.as_uri(), tmp_path / "copy.txt", progress=False).read_bytes() == PAYLOAD


# --------------------------------------------------------------------------------------------
# download by name
# --------------------------------------------------------------------------------------------


@pytest.fixture
def local_corpora(server, monkeypatch):
    """Two corpora served from localhost: a plain file with its checksum and a zip archive."""
    base, root, requests = server
    (root / "input.txt").write_bytes(PAYLOAD)
    with zipfile.ZipFile(root / "cmn-eng.zip", "w") as zf:
        zf.writestr("cmn.txt", "Hi.\t嗨。\tCC-BY 2.0 (France) Attribution: tatoeba.org #538123\n")
        zf.writestr("_about.txt", "about")
    plain = RemoteFile(base + "input.txt", "input.txt", hashlib.sha256(PAYLOAD).hexdigest())
    member = RemoteFile(base + "cmn-eng.zip", "cmn.txt", None, member="cmn.txt")
    monkeypatch.setitem(CORPORA, "local-plain", RemoteCorpus("plain", (plain,), "test"))
    monkeypatch.setitem(CORPORA, "local-zip", RemoteCorpus("cmn-eng", (member,), "test"))
    return requests


def test_download_plain_and_zip(local_corpora, tmp_path):
    """download returns the corpus folder with its files; the archive itself is not kept."""
    folder = download("local-plain", tmp_path, progress=False)
    assert folder == tmp_path / "plain" and (folder / "input.txt").read_bytes() == PAYLOAD
    folder = download("local-zip", tmp_path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["cmn.txt"]
    assert (folder / "cmn.txt").read_text(encoding="utf-8").startswith("Hi.\t嗨。\t")


def test_download_uses_the_cache(local_corpora, tmp_path):
    """A second call finds the files and makes no request."""
    download("local-plain", tmp_path, progress=False)
    download("local-zip", tmp_path, progress=False)
    assert len(local_corpora) == 2
    download("local-plain", tmp_path, progress=False)
    download("local-zip", tmp_path, progress=False)
    assert len(local_corpora) == 2


def test_download_replaces_a_corrupt_cached_file(local_corpora, tmp_path):
    """A cached file whose recorded checksum does not match is fetched again."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "input.txt").write_bytes(b"truncated")
    folder = download("local-plain", tmp_path, progress=False)
    assert (folder / "input.txt").read_bytes() == PAYLOAD and len(local_corpora) == 1


def test_download_missing_member_and_bad_archive(server, monkeypatch, tmp_path):
    """An archive without the member, or not a zip at all, is a DownloadError and leaves nothing."""
    base, root, _ = server
    with zipfile.ZipFile(root / "a.zip", "w") as zf:
        zf.writestr("other.txt", "x")
    (root / "b.zip").write_bytes(b"not a zip")
    for name, archive in (("no-member", "a.zip"), ("not-zip", "b.zip")):
        remote = RemoteFile(base + archive, "x.txt", member="x.txt")
        monkeypatch.setitem(CORPORA, name, RemoteCorpus("d", (remote,), ""))
    with pytest.raises(DownloadError, match="has no 'x.txt'; it holds other.txt"):
        download("no-member", tmp_path / "data", progress=False)
    with pytest.raises(DownloadError, match="not serve a valid zip"):
        download("not-zip", tmp_path / "data", progress=False)
    assert list((tmp_path / "data" / "d").iterdir()) == []


def test_unknown_corpus_lists_the_known_ones(tmp_path):
    """An unknown name is a ValueError listing the corpora on offer."""
    with pytest.raises(ValueError, match="unknown corpus 'imagenet'; known corpora: tatoeba-cmn, tinyshakespeare"):
        download("imagenet", tmp_path)


def test_download_unreachable(closed_port_url, monkeypatch, tmp_path):
    """download by name reports an unreachable network the same way."""
    monkeypatch.setitem(CORPORA, "offline", RemoteCorpus("offline", (RemoteFile(closed_port_url, "input.txt"),), ""))
    with pytest.raises(DownloadError, match="unreachable"):
        download("offline", tmp_path, progress=False, timeout=5)
    assert list((tmp_path / "offline").iterdir()) == []


@pytest.mark.parametrize(
    ("corpus", "file", "shared"),
    [
        ("tinyshakespeare", "input.txt", ("tinyshakespeare", "input.txt")),
        ("wikitext-2", "valid.txt", ("wikitext-2", "valid.txt")),
        ("wikitext-2", "test.txt", ("wikitext-2", "test.txt")),
    ],
)
def test_recorded_checksums_match_the_shared_copies(shared_data, corpus, file, shared):
    """The sha256 recorded for a corpus file is that of the project's verified local copy."""
    remote = next(f for f in CORPORA[corpus].files if f.name == file)
    assert remote.sha256 == sha256_of(shared_data(*shared))


def test_registry_is_well_formed():
    """Every corpus has https URLs, unique file names, and sha256 values of 64 hex digits when set."""
    assert {"tatoeba-cmn", "tinyshakespeare", "wikitext-2"} <= set(CORPORA)
    for corpus in CORPORA.values():
        names = [f.name for f in corpus.files]
        assert len(names) == len(set(names))
        for remote in corpus.files:
            assert remote.url.startswith("https://")
            assert remote.sha256 is None or (len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0)
    assert dl.CORPORA["tatoeba-cmn"].files[0].member == "cmn.txt"
