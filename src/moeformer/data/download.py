"""Downloading the public corpora, cached, checksum-verified, written atomically.

``download("tatoeba-cmn", "data")`` fetches the original once and returns the folder that holds
it (``data/cmn-eng/cmn.txt``, the layout of the project's ``../shared/data``); later calls find
the files there and touch no network. Each file is streamed to a temporary file beside its
destination, checked against its SHA-256 where one is recorded, and renamed into place
(``os.replace``), so an interrupted or corrupt download never leaves a file that looks complete.

Without network access every call fails with a :class:`DownloadError` that says so; every
command that downloads also accepts a local copy (``--data PATH``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

_CHUNK = 1 << 16
_PYTORCH_EXAMPLES = (
    "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
    "word_language_model/data/wikitext-2/"
)


class DownloadError(RuntimeError):
    """A corpus could not be fetched: unreachable network, HTTP error, bad checksum or archive."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a corpus: fetched from ``url`` (or taken from the zip archive at ``url``) and saved as ``name``."""

    url: str
    name: str
    sha256: str | None = None  # of what ``url`` serves (the archive, for a member); None: not recorded
    member: str | None = None  # path inside the zip archive at ``url``; None: ``url`` is the file


@dataclass(frozen=True)
class RemoteCorpus:
    """A named public corpus: its files and the folder (under the download directory) they go to."""

    directory: str
    files: tuple[RemoteFile, ...]
    description: str


CORPORA: dict[str, RemoteCorpus] = {
    "tatoeba-cmn": RemoteCorpus(
        "cmn-eng",
        # sha256 None: manythings.org rebuilds this archive as Tatoeba grows, and it could not be
        # fetched from here to record one. The project's ../shared/data copy is a subset (its SOURCE.md).
        (RemoteFile("https://www.manythings.org/anki/cmn-eng.zip", "cmn.txt", None, member="cmn.txt"),),
        "English-Mandarin sentence pairs from Tatoeba, English<TAB>Chinese<TAB>attribution (CC-BY 2.0 FR)",
    ),
    "tinyshakespeare": RemoteCorpus(
        "tinyshakespeare",
        # sha256 of ../shared/data/tinyshakespeare/input.txt, byte-identical to char-rnn's master (its SOURCE.md).
        (
            RemoteFile(
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                "input.txt",
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            ),
        ),
        "Shakespeare's plays, 1.1 MB, for character-level language models (public domain)",
    ),
    "wikitext-2": RemoteCorpus(
        "wikitext-2",
        # The tokenized v1 files at a pinned pytorch/examples commit. valid/test sha256 from
        # ../shared/data/wikitext-2/SOURCE.md; train.txt (10.8 MB) could not be fetched here: None.
        (
            RemoteFile(_PYTORCH_EXAMPLES + "train.txt", "train.txt", None),
            RemoteFile(
                _PYTORCH_EXAMPLES + "valid.txt",
                "valid.txt",
                "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            ),
            RemoteFile(
                _PYTORCH_EXAMPLES + "test.txt",
                "test.txt",
                "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
            ),
        ),
        "WikiText-2 (v1, tokenized), word-level language modelling (CC BY-SA)",
    ),
}


def download(name: str, dest_dir: str | Path, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """The folder ``dest_dir / <corpus directory>`` holding corpus ``name``, downloaded unless already there."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    corpus = CORPORA[name]
    folder = Path(dest_dir) / corpus.directory
    folder.mkdir(parents=True, exist_ok=True)
    for remote in corpus.files:
        target = folder / remote.name
        if _is_cached(target, remote):
            continue
        if remote.member is None:
            fetch(remote.url, target, sha256=remote.sha256, progress=progress, timeout=timeout)
        else:
            _fetch_member(remote, target, progress=progress, timeout=timeout)
    return folder


def _is_cached(target: Path, remote: RemoteFile) -> bool:
    """A file already in place; verified when its own checksum is recorded (not an archive's)."""
    if not target.is_file():
        return False
    return remote.member is not None or remote.sha256 is None or sha256_of(target) == remote.sha256


def fetch(
    url: str, dest: str | Path, *, sha256: str | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` atomically; with ``sha256`` given, keep it only if the digest matches."""
    dest = Path(dest)
    with _temporary_beside(dest) as part:
        digest = _stream(url, part, progress=progress, timeout=timeout, label=dest.name)
        _check_digest(url, sha256, digest)
        os.replace(part, dest)
    return dest


def _fetch_member(remote: RemoteFile, target: Path, *, progress: bool, timeout: float) -> None:
    """Download the archive at ``remote.url`` to a temporary file and move its member to ``target``."""
    with _temporary_beside(target, suffix=".zip") as archive:
        digest = _stream(remote.url, archive, progress=progress, timeout=timeout, label=Path(remote.url).name)
        _check_digest(remote.url, remote.sha256, digest)
        with _temporary_beside(target) as part:
            _extract(archive, str(remote.member), part, remote.url)
            os.replace(part, target)


def _extract(archive: Path, member: str, dest: Path, url: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise DownloadError(f"{url}: the archive has no {member!r}; it holds {', '.join(zf.namelist()[:10])}")
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{url} did not serve a valid zip archive ({err})") from None


def _stream(url: str, dest: Path, *, progress: bool, timeout: float, label: str) -> str:
    """Write what ``url`` serves to ``dest`` with a progress bar; return its SHA-256 (hex)."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress)
            with bar:
                while chunk := _read(response, url):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _unreachable(url, err.reason) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
        raise _unreachable(url, err) from None
    return digest.hexdigest()


def _read(response: IO[bytes], url: str) -> bytes:
    try:
        return response.read(_CHUNK)
    except (OSError, http.client.HTTPException) as err:
        raise _unreachable(url, err) from None


def _unreachable(url: str, reason: object) -> DownloadError:
    return DownloadError(
        f"could not download {url}: {reason}. The network looks unreachable from this machine. "
        "Fetch the file where there is internet access and pass its local path instead (--data PATH)."
    )


def _check_digest(url: str, expected: str | None, actual: str) -> None:
    if expected is not None and actual != expected:
        raise DownloadError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; the download was discarded"
        )


def sha256_of(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _temporary_beside(dest: Path, suffix: str = ".part") -> Iterator[Path]:
    """A temporary file in ``dest``'s folder (so the final rename stays on one file system), removed on exit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
