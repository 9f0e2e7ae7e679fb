"""The artifact store: one small key/value API over a local directory or an S3-compatible server.

Everyone writes and reads run artifacts through it (the Ray workers now, the FastAPI service later),
so it imports neither torch nor ray; pyarrow is imported only by `pyarrow_filesystem()`.

Layout (see DESIGN.md): `experiments/<experiment-id>/<trial>/{checkpoints/,metrics.jsonl,summary.json,plots/}`,
relative to the store root (`file://<dir>` or `s3://<bucket>[/<prefix>]`); `experiment_prefix()` builds it.

Guarantees, and why:

* Whole-object writes. A reader sees an object whole or not at all: LocalStore writes a temporary file
  in the target folder and renames it (os.replace is atomic on one file system); an S3 PUT (and a
  completed multipart upload) makes an object appear at once. A crashed writer leaves the old version.
* Keys are '/'-separated relative paths, checked the same way for both stores, so that a key that
  works on a laptop works on the cluster and can never escape the store root.
* No links (LocalStore): a symbolic link below the root is never followed, so a key reads or writes
  exactly the file its path names, and a link to /etc or to another experiment's folder is refused
  (LinkRefused, a KeyNotFound) instead of served; listings skip links.
* Single writer per key for `append_line`: S3 has no append, so it is read-modify-write. Two writers
  appending to the same key at once can lose a line. By design each trial's metrics.jsonl has exactly
  one writer (the rank-0 worker of that trial).
* Keys name objects, not folders: LocalStore cannot hold both 'a' and 'a/b' (S3 can); don't rely on it.
* Retries (S3): connection errors, timeouts, 5xx and the S3 "try again" codes are retried with
  exponential backoff; urllib3's own retries are off so that ours is the only loop and the attempt
  count and timing are what LBGAT_STORE_RETRIES / LBGAT_STORE_BACKOFF_S say. When the store stays
  unreachable, StoreUnavailable says where and for how long we tried. Errors that retrying cannot fix
  (a missing key, denied access) raise at once.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from workers.settings import StoreSettings, env_name

if TYPE_CHECKING:
    import minio
    import pyarrow.fs

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TMP_SUFFIX = ".lbgat-tmp"  # LocalStore temporaries; list() skips them, keys may not end with it
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# LocalStore walks paths one folder at a time (openat) with O_NOFOLLOW where the OS allows it, so that
# no symbolic link below its root is ever followed, even one swapped in while it works.
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_READ = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block
_DIR_FD = (
    bool(_O_DIRECTORY and _O_NOFOLLOW)
    and hasattr(os, "fwalk")
    and {os.open, os.stat, os.mkdir, os.rename, os.unlink, os.rmdir} <= os.supports_dir_fd
)


class StoreError(RuntimeError):
    """A store request failed permanently (retrying would not help)."""


class KeyNotFound(StoreError, KeyError):
    """The key does not exist (or its bucket does not yet)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class LinkRefused(KeyNotFound):
    """The key's path runs through a symbolic link below a LocalStore's root, which the store does not
    follow (see LocalStore): for readers the object is not there, and nothing is written through it."""


class StoreUnavailable(StoreError):
    """The store stayed unreachable (or refused us) after all attempts; the message says what to check."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


# -- keys ------------------------------------------------------------------------------------------


def validate_key(key: str) -> str:
    """Return `key` if it is a clean relative '/'-separated path, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid store key {key!r}: keys are non-empty '/'-separated relative paths")
    _check_segments(key, key.split("/"), what="key")
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix is '' or a key, optionally ending in '/' ('experiments/e1/' or 'experiments/e')."""
    if not isinstance(prefix, str):
        raise ValueError(f"invalid store prefix {prefix!r}")
    if prefix:
        parts = prefix.split("/")
        if parts[-1] == "":
            parts = parts[:-1]
        if not parts:
            raise ValueError(f"invalid store prefix {prefix!r}: may not be '/' alone (use '' for everything)")
        _check_segments(prefix, parts, what="prefix")
    return prefix


def _check_segments(name: str, parts: list[str], *, what: str) -> None:
    if name.startswith("/"):
        raise ValueError(f"invalid store {what} {name!r}: must be relative, not start with '/'")
    for part in parts:
        if part == "":
            raise ValueError(f"invalid store {what} {name!r}: empty path segment ('//' or a trailing '/')")
        if part in (".", ".."):
            raise ValueError(f"invalid store {what} {name!r}: '.' and '..' segments are not allowed")
        if "\\" in part or any(ord(c) < 32 for c in part):
            raise ValueError(f"invalid store {what} {name!r}: no backslashes or control characters")
        if part.endswith(_TMP_SUFFIX):
            raise ValueError(f"invalid store {what} {name!r}: the suffix {_TMP_SUFFIX} is reserved")


def experiment_prefix(experiment_id: str, trial: str | None = None) -> str:
    """'experiments/<id>/' or 'experiments/<id>/<trial>/' — the folder of one experiment or trial."""
    for what, value in (("experiment id", experiment_id), ("trial", trial)):
        if value is None and what == "trial":
            continue
        if not isinstance(value, str) or not _ID_RE.match(value) or value in (".", ".."):
            raise ValueError(f"invalid {what} {value!r}: use letters, digits, '_', '.', '-' only")
    return f"experiments/{experiment_id}/" if trial is None else f"experiments/{experiment_id}/{trial}/"


# -- the interface ---------------------------------------------------------------------------------


class ArtifactStore(ABC):
    """Keys are relative to the store root; see the module docstring for the guarantees."""

    url: str  # location without credentials, safe to log: "file:///abs/dir" or "s3://bucket/prefix"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` at `key`, replacing it whole (readers never see a partial object)."""

    def put_file(self, key: str, path: str | Path) -> None:
        """Upload the local file `path` to `key` (whole-object, like put_bytes)."""
        self.put_bytes(key, Path(path).read_bytes())

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2).encode())

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; KeyNotFound if it does not exist."""

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    @abstractmethod
    def get_file(self, key: str, path: str | Path) -> Path:
        """Download `key` to `path` through a temporary file and a rename: `path` is whole or untouched."""

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream the object in chunks of at most `chunk_size` bytes (a download that never holds it whole).

        The object is opened when this is called, so a missing key raises KeyNotFound here, not at the
        first `next()`; iterate to the end or close() the iterator to release the file or connection.
        (This fallback reads the object whole; LocalStore and S3Store stream.)
        """
        _check_chunk_size(chunk_size)
        data = memoryview(self.get_bytes(key))
        return (bytes(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))

    def presigned_get(self, key: str, expires_s: int) -> str:
        """A URL that lets anyone holding it GET `key` for `expires_s` seconds, without credentials.
        Only S3 stores can sign URLs; others raise NotImplementedError."""
        raise NotImplementedError(
            f"{type(self).__name__} ({self.url}) cannot make presigned URLs; they need an s3:// store"
        )

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (string prefix, recursive), sorted by key."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; return how many. '' is refused."""

    def append_line(self, key: str, line: str) -> None:
        """Append one line (e.g. a metrics.jsonl record) to `key`, creating it if absent.

        Read-modify-write, because S3 has no append: the new object is written whole, so readers see
        the old or the new content, but two concurrent writers of one key may lose a line. There is
        one writer per key by design (each trial's rank-0 worker owns its metrics.jsonl).
        """
        line = line.removesuffix("\n")
        if "\n" in line:
            raise ValueError(f"append_line({key!r}): the line may not contain a newline")
        try:
            old = self.get_bytes(key)
        except KeyNotFound:
            old = b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        self.put_bytes(key, old + line.encode() + b"\n")

    @abstractmethod
    def check(self) -> None:
        """Cheap reachability / permission check; creates the bucket or folder. Raises StoreUnavailable."""

    def with_timeout(self, timeout_s: float) -> ArtifactStore:
        """The same store for a caller that must not wait on it (the scheduler's round, a health probe):
        one attempt per request, `timeout_s` to connect and to read, so an outage costs it at most
        that, not the whole retry schedule. A store without a network to wait on returns itself."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        return self

    @abstractmethod
    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, base path) for Ray Train: RunConfig(storage_filesystem=fs, storage_path=f"{base}/...")."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# -- local directory -------------------------------------------------------------------------------


class LocalStore(ArtifactStore):
    """A directory on the local (or a shared) file system; the default for a laptop and the tests.

    No symbolic link below the root is followed, for reading, writing, listing or deleting: keys
    name regular files in real folders, as on S3 (which has no links), so a key means the same thing
    on a laptop and on the cluster. A link put into the store (to /etc, or to another experiment's
    folder) would otherwise let a key that is checked to lie under one experiment's prefix read or
    write outside it. Where the OS has `openat` (Linux, macOS) every path is walked one folder at a
    time with O_NOFOLLOW, so a folder swapped for a link between a check and its use is still not
    followed; elsewhere each component is checked with lstat just before use (not race-free).
    The root itself may be (or sit under) a link: it is resolved once, here.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _parts(self, key: str) -> list[str]:
        return validate_key(key).split("/")

    def _missing(self, key: str) -> KeyNotFound:
        return KeyNotFound(f"no object {key!r} in {self.url}")

    def _refused(self, key: str, parts: list[str], depth: int) -> LinkRefused:
        link = "/".join(parts[: depth + 1])
        return LinkRefused(
            f"no object {key!r} in {self.url}: {link!r} is a symbolic link, and the local store follows "
            "no links (keys name regular files, as on S3)"
        )

    # -- walking without following links ---------------------------------------------------------

    def _open_dir(self, key: str, parts: list[str], *, create: bool = False) -> int:
        """A descriptor of the folder root/parts, opened one component at a time with O_NOFOLLOW
        (created where missing if `create`). KeyNotFound (LinkRefused for a link) if it is not there."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY)
        except FileNotFoundError:
            raise self._missing(key) from None
        try:
            for depth, part in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    child = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if _is_link(part, fd):
                        raise self._refused(key, parts, depth) from None
                    if not create and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                        raise self._missing(key) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _checked_path(self, key: str, parts: list[str], *, check: int) -> Path:
        """Without openat: the key's path after an lstat of its first `check` components (a link
        refuses the key; a missing component ends the check, as nothing below it exists)."""
        path = self.root
        for depth, part in enumerate(parts[:check]):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(mode):
                raise self._refused(key, parts, depth)
        return self.root.joinpath(*parts)

    def _open_read(self, key: str) -> io.BufferedReader:
        """The regular file `key` names, open for reading; KeyNotFound for anything else (a folder, a
        FIFO, a link: O_NONBLOCK keeps a FIFO from blocking the open)."""
        parts = self._parts(key)
        if not _DIR_FD:
            path = self._checked_path(key, parts, check=len(parts))
            try:
                fd = os.open(path, _O_READ | _O_NOFOLLOW)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                    raise self._missing(key) from None
                raise
        else:
            folder = self._open_dir(key, parts[:-1])
            try:
                fd = os.open(parts[-1], _O_READ | _O_NOFOLLOW, dir_fd=folder)
            except OSError as exc:
                if _is_link(parts[-1], folder):
                    raise self._refused(key, parts, len(parts) - 1) from None
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                    raise self._missing(key) from None
                raise
            finally:
                os.close(folder)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._missing(key)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _write(self, key: str, fill: Callable[[io.BufferedWriter], None]) -> None:
        """Fill a temporary file in the key's folder, then rename it over the key (whole-object writes);
        the folders on the way are created, never followed if they are links."""
        parts = self._parts(key)
        if not _DIR_FD:
            _write_atomic(self._checked_path(key, parts, check=len(parts) - 1), fill)
            return
        folder = self._open_dir(key, parts[:-1], create=True)
        try:
            tmp = f".{parts[-1]}.{secrets.token_hex(8)}{_TMP_SUFFIX}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600, dir_fd=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    fill(f)
                os.replace(tmp, parts[-1], src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=folder)
                raise
        finally:
            os.close(folder)

    def _folders(self, prefix: str) -> Iterator[tuple[str, list[str], list[str], int | None]]:
        """(folder relative to the root, sub-folder names, file names, folder descriptor or None) for
        the deepest folder `prefix` names and everything below it, children before parents; links
        are listed by name (to be skipped or unlinked) but never entered."""
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        parts = folder.split("/") if folder else []
        if not _DIR_FD:
            try:
                start = self._checked_path(prefix, parts, check=len(parts))
            except KeyNotFound:
                return
            if not start.is_dir() or start.is_symlink():
                return
            for dirpath, dirnames, filenames in os.walk(start, topdown=False):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                yield ("" if rel == "." else rel), dirnames, filenames, None
            return
        try:
            top = self._open_dir(prefix, parts)
        except KeyNotFound:  # LinkRefused included: nothing under a link is listed
            return
        try:
            for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", topdown=False, dir_fd=top):
                below = dirpath[2:] if dirpath.startswith("./") else ""
                rel = "/".join(p for p in (folder, below) if p)
                yield rel, dirnames, filenames, dir_fd
        finally:
            os.close(top)

    @staticmethod
    def _lstat(rel: str, name: str, dir_fd: int | None, root: Path) -> os.stat_result | None:
        try:
            if dir_fd is None:
                return os.lstat(root.joinpath(*rel.split("/"), name) if rel else root / name)
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:  # deleted while we walked
            return None

    # -- the API -----------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as src:
            self._write(key, lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def get_bytes(self, key: str) -> bytes:
        with self._open_read(key) as f:
            return f.read()

    def get_file(self, key: str, path: str | Path) -> Path:
        target = Path(path)
        with self._open_read(key) as src:  # opened first, so a missing key leaves no temporary
            _download_atomic(target, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        return target

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        _check_chunk_size(chunk_size)
        src = self._open_read(key)
        return _chunks(src.read, src.close, chunk_size)

    def exists(self, key: str) -> bool:
        try:
            self._open_read(key).close()
        except KeyNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        validate_prefix(prefix)
        out = []
        for rel, _dirnames, filenames, dir_fd in self._folders(prefix):
            for name in filenames:
                key = f"{rel}/{name}" if rel else name
                if name.endswith(_TMP_SUFFIX) or not key.startswith(prefix):
                    continue
                info = self._lstat(rel, name, dir_fd, self.root)
                if info is not None and stat.S_ISREG(info.st_mode):  # links and FIFOs are no objects
                    out.append(ObjectInfo(key, info.st_size))
        return sorted(out, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        """Regular files are deleted and counted; links under the prefix are removed (never their
        targets); folders that became empty go too, up to (not including) the root."""
        _refuse_empty(prefix, self.url)
        validate_prefix(prefix)
        count = 0
        emptied: set[str] = set()  # folders (relative) from which something was removed
        for rel, dirnames, filenames, dir_fd in self._folders(prefix):
            for name in [*filenames, *dirnames]:
                key = f"{rel}/{name}" if rel else name
                info = self._lstat(rel, name, dir_fd, self.root)
                if info is None:
                    continue
                path = name if dir_fd is not None else str(self.root.joinpath(*key.split("/")))
                try:
                    if stat.S_ISDIR(info.st_mode):
                        if key in emptied:  # children come first: this one may be empty now
                            os.rmdir(path, dir_fd=dir_fd)
                            emptied.add(rel)
                    elif key.startswith(prefix) and not name.endswith(_TMP_SUFFIX):
                        os.unlink(path, dir_fd=dir_fd)
                        count += stat.S_ISREG(info.st_mode)
                        emptied.add(rel)
                except (FileNotFoundError, OSError):  # gone meanwhile, or a folder not yet empty
                    continue
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if folder in emptied:  # the prefix's own folder and its parents, while empty
            current = self.root.joinpath(*folder.split("/"))
            while current != self.root and self.root in current.parents:
                try:
                    current.rmdir()  # never follows a link (a link is not a folder to rmdir)
                except OSError:
                    break
                current = current.parent
        return count

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".check.", suffix=_TMP_SUFFIX, dir=self.root)
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise StoreUnavailable(
                f"artifact store {self.url} is not writable: {exc}; check {env_name('artifact_store')} "
                "and the folder's permissions"
            ) from exc

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        import pyarrow.fs

        self.root.mkdir(parents=True, exist_ok=True)
        return pyarrow.fs.LocalFileSystem(), str(self.root)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _write_atomic(target: Path, fill: Callable[[io.BufferedWriter], None], suffix: str = _TMP_SUFFIX) -> None:
    """Fill a temporary file beside `target`, then rename it: readers see the old file or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_atomic(target: Path, fill: Callable[[io.BufferedWriter], None]) -> None:
    _write_atomic(target, fill, suffix=".part")


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of bytes, got {chunk_size!r}")


def _chunks(read: Callable[[int], bytes], close: Callable[[], None], chunk_size: int) -> Iterator[bytes]:
    """Yield read(chunk_size) until it returns b''; close() when done, on error or when the
    generator is closed (or collected) early."""
    try:
        while chunk := read(chunk_size):
            yield chunk
    finally:
        close()


def _refuse_empty(prefix: str, url: str) -> None:
    if not prefix:
        raise ValueError(f"delete_prefix('') would delete everything in {url}; name a prefix")


# -- S3 --------------------------------------------------------------------------------------------

# S3 error codes that mean "try again later" (AWS and MinIO/SeaweedFS spellings).
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "SlowDown",
        "ServiceUnavailable",
        "RequestTimeout",
        "OperationAborted",
        "XMinioServerNotInitialized",
        "XMinioReadQuorum",
        "XMinioWriteQuorum",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject"})
_AUTH_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)


def _transient_status(status: int | None) -> bool:
    return status is not None and (status == 429 or (status >= 500 and status != 501))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` may help: network trouble, timeouts, 5xx, throttling."""
    import urllib3.exceptions
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", None)
        return exc.code in _TRANSIENT_CODES or _transient_status(status)
    if isinstance(exc, ServerError):
        return _transient_status(exc.status_code)
    if isinstance(exc, InvalidResponseError):  # a non-XML answer, e.g. a proxy's 502 page
        return _transient_status(getattr(exc, "_code", None))
    # urllib3.exceptions.HTTPError covers MaxRetryError, ProtocolError, NewConnectionError, timeouts;
    # ConnectionError / TimeoutError (OSError) come through when a socket call fails outside urllib3.
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


class S3Store(ArtifactStore):
    """An S3-compatible bucket (MinIO, SeaweedFS, AWS), optionally under a key prefix.

    The minio client gets its own urllib3 PoolManager with our timeouts and *no* urllib3 retries, so
    the loop in `_retry` is the only retry loop. The bucket is created if missing, by `check()` and
    lazily before the first write. Build one per process (`open_store()` from the LBGAT_* environment,
    see StoreSettings.as_env); the client's connection pool does not pickle.
    """

    def __init__(self, settings: StoreSettings) -> None:
        import minio
        import urllib3

        if settings.scheme != "s3":
            raise ValueError(f"S3Store needs an s3:// store, got {settings.store_url}")
        if not (settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key):
            raise ValueError("S3Store needs LBGAT_S3_ENDPOINT, LBGAT_S3_ACCESS_KEY and LBGAT_S3_SECRET_KEY")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.endpoint = settings.s3_endpoint
        self.secure = settings.s3_secure
        self.region = settings.s3_region
        self.url = settings.store_url
        self._settings = settings
        self._attempts = settings.store_retries
        self._timeout = settings.store_timeout_s
        self._backoff = settings.store_backoff_s
        self._access_key = settings.s3_access_key
        self._secret = settings.s3_secret_key  # SecretStr: only unwrapped where a client needs it
        self._bucket_ready = False

        pool_args: dict[str, Any] = {}
        if self.secure:  # as minio's default client: verify against SSL_CERT_FILE or certifi's bundle
            import certifi

            pool_args = {
                "cert_reqs": "CERT_REQUIRED",
                "ca_certs": os.environ.get("SSL_CERT_FILE") or certifi.where(),
            }
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout),
            retries=False,  # our _retry loop is the only one
            maxsize=10,
            **pool_args,
        )
        self._client: minio.Minio = minio.Minio(
            self.endpoint,
            access_key=self._access_key,
            secret_key=self._secret.get_secret_value(),
            secure=self.secure,
            region=self.region,
            http_client=http,
        )

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.url} at {'https' if self.secure else 'http'}://{self.endpoint}"

    def _scrub(self, text: str) -> str:
        secret = self._secret.get_secret_value()
        return text.replace(secret, "**********") if secret else text

    def _describe(self, exc: BaseException) -> str:
        from minio.error import S3Error

        if isinstance(exc, S3Error):
            text = f"S3 error {exc.code}: {exc.message}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self._scrub(text)

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures with exponential backoff; see the module docstring."""
        start = time.monotonic()
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self._attempts:
                    elapsed = time.monotonic() - start
                    raise StoreUnavailable(
                        f"artifact store {self._where} unavailable: {what} failed {attempt} time(s) over "
                        f"{elapsed:.1f}s (last error: {self._describe(exc)}). Is the S3 server up and "
                        f"reachable, and is {env_name('s3_endpoint')}={self.endpoint} right "
                        f"({env_name('s3_secure')}={str(self.secure).lower()})? Retries and timeouts: "
                        f"{env_name('store_retries')}, {env_name('store_timeout_s')}."
                    ) from None
                logger.warning(
                    "artifact store %s: %s failed (attempt %d/%d, %s); retrying in %.2fs",
                    self._where,
                    what,
                    attempt,
                    self._attempts,
                    self._describe(exc),
                    delay,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _permanent(self, what: str, exc: Exception, key: str | None = None) -> StoreError:
        """Translate a non-transient minio error into our exceptions."""
        from minio.error import S3Error

        if isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
            self._bucket_ready = False  # deleted behind our back: the next write creates it again
        if isinstance(exc, S3Error) and exc.code in _NOT_FOUND_CODES and key is not None:
            return KeyNotFound(f"no object {key!r} in {self.url}")
        if isinstance(exc, S3Error) and exc.code in _AUTH_CODES:
            return StoreError(
                f"artifact store {self._where} refused {what}: {self._describe(exc)}; check "
                f"{env_name('s3_access_key')} / {env_name('s3_secret_key')} and the key's permissions"
            )
        return StoreError(f"artifact store {self._where}: {what} failed: {self._describe(exc)}")

    def _run(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        try:
            return self._retry(what, fn)
        except StoreError:
            raise
        except Exception as exc:
            from minio.error import MinioException

            if isinstance(exc, MinioException):
                raise self._permanent(what, exc, key) from None
            raise

    def _ensure_bucket(self, force: bool = False) -> None:
        """Create the bucket if missing (once per store object unless `force`)."""
        if self._bucket_ready and not force:
            return
        from minio.error import S3Error

        def ensure() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=self.region)
                logger.info("artifact store: created bucket %s at %s", self.bucket, self.endpoint)
            except S3Error as exc:  # a concurrent creator won the race
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._run(f"check/create bucket {self.bucket!r}", ensure)
        self._bucket_ready = True

    # -- the API -------------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._ensure_bucket()
        self._run(
            f"put {key!r}",
            lambda: self._client.put_object(self.bucket, name, io.BytesIO(data), len(data)),
        )

    def put_file(self, key: str, path: str | Path) -> None:
        name = self._name(key)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"put_file({key!r}): no file {path}")
        self._ensure_bucket()
        self._run(f"upload {key!r}", lambda: self._client.fput_object(self.bucket, name, str(path)))

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)

        def get() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._run(f"get {key!r}", get, key)

    def get_file(self, key: str, path: str | Path) -> Path:
        name = self._name(key)
        target = Path(path)

        def download() -> None:
            response = self._client.get_object(self.bucket, name)
            try:
                _download_atomic(target, lambda f: shutil.copyfileobj(response, f, 1 << 20))
            finally:
                response.close()
                response.release_conn()

        self._run(f"download {key!r}", download, key)
        return target

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The GET is retried like any request; once the body streams, a broken connection raises
        (the caller has sent part of the object already, so a silent restart would corrupt it)."""
        _check_chunk_size(chunk_size)
        name = self._name(key)
        response = self._run(f"get {key!r}", lambda: self._client.get_object(self.bucket, name), key)

        def close() -> None:
            response.close()
            response.release_conn()

        return _chunks(lambda n: response.read(n), close, chunk_size)

    def presigned_get(self, key: str, expires_s: int) -> str:
        """Signed for the endpoint this service uses (LBGAT_S3_ENDPOINT): the URL works for clients
        that reach the S3 server at that address. Signing is local, but minio may ask the server for
        the bucket's region first when LBGAT_S3_REGION is unset."""
        import datetime

        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise ValueError(f"expires_s must be between 1 s and 7 days, got {expires_s}")
        name = self._name(key)
        return self._run(
            f"presign {key!r}",
            lambda: self._client.presigned_get_object(
                self.bucket, name, expires=datetime.timedelta(seconds=expires_s)
            ),
            key,
        )

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._run(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, name), key)
        except KeyNotFound:
            return False
        return True

    def _list_names(self, prefix: str) -> list[tuple[str, int]]:
        """(object name, size) under the full prefix, directory markers ('x/') included."""
        from minio.error import S3Error

        full = f"{self.prefix}/{prefix}" if self.prefix else prefix

        def listing() -> list[tuple[str, int]]:
            try:
                objects = self._client.list_objects(self.bucket, prefix=full or None, recursive=True)
                return [(o.object_name or "", o.size or 0) for o in objects]
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return []
                raise

        return self._run(f"list {prefix!r}", listing)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        validate_prefix(prefix)
        # Names ending in '/' are folder markers (pyarrow and consoles create them): not objects.
        infos = [
            ObjectInfo(self._key(n), size) for n, size in self._list_names(prefix) if not n.endswith("/")
        ]
        return sorted(infos, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        _refuse_empty(prefix, self.url)
        validate_prefix(prefix)
        names = [n for n, _ in self._list_names(prefix)]
        if not names:
            return 0

        def delete() -> None:
            for start in range(0, len(names), 1000):  # S3 multi-delete takes at most 1000 keys
                batch = [DeleteObject(n) for n in names[start : start + 1000]]
                errors = [e for e in self._client.remove_objects(self.bucket, batch) if e.code != "NoSuchKey"]
                if errors:
                    first = errors[0]
                    raise StoreError(
                        f"artifact store {self._where}: could not delete {len(errors)} object(s) under "
                        f"{prefix!r}, e.g. {first.name!r}: {first.code} {first.message}"
                    )

        self._run(f"delete {prefix!r}", delete)
        return sum(1 for n in names if not n.endswith("/"))

    def with_timeout(self, timeout_s: float) -> ArtifactStore:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        # model_copy: the same validated settings (no environment is read again), one attempt
        return S3Store(self._settings.model_copy(update={"store_retries": 1, "store_timeout_s": timeout_s}))

    def check(self) -> None:
        """HEAD the bucket (creating it if missing); any failure becomes StoreUnavailable."""
        try:
            self._ensure_bucket(force=True)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None

    def pyarrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow S3FileSystem on the same server and credentials, and '<bucket>[/<prefix>]'.

        pyarrow does not read endpoint variables, so the endpoint is passed explicitly. The returned
        filesystem holds the secret key (Ray pickles it to the workers): do not log it.
        """
        import pyarrow.fs

        self._ensure_bucket()
        fs = pyarrow.fs.S3FileSystem(
            access_key=self._access_key,
            secret_key=self._secret.get_secret_value(),
            endpoint_override=self.endpoint,
            scheme="https" if self.secure else "http",
            # A fixed region: without one the AWS SDK would probe EC2 metadata for it.
            region=self.region or "us-east-1",
            connect_timeout=self._timeout,
            request_timeout=self._timeout,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=self._attempts),
        )
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return fs, base


def open_store(settings: StoreSettings | None = None) -> ArtifactStore:
    """The store the settings name (None: read StoreSettings from the environment). Connects lazily."""
    settings = settings if settings is not None else StoreSettings()
    if settings.scheme == "file":
        return LocalStore(settings.local_root)
    return S3Store(settings)
