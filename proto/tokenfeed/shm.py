"""Shared-memory rings: how a client on the server's host receives tokens without gRPC carrying them.

The client creates a file in a shared-memory directory (``/dev/shm``) and offers it in its
``StreamRequest.shared_memory``; the server opens it if it can (same host, same directory, same
user, not disabled) and then writes each message's tokens into a slot of the file, sending only
the small rest of the message over gRPC (``BatchChunk.shm_slot``). Message ``m`` of a call uses
slot ``m % slots``; the client publishes in the header how many messages it is done with, and the
server writes message ``m`` only when that count is above ``m - slots``. One ring per call: a
reconnect makes a new file, so a server still finishing a cancelled call can never write into the
ring of the call that replaced it. The client unlinks the file as soon as the first message has
arrived (the client keeps its mapping, the server its descriptor), so a crashed client leaves
nothing behind.

The server never maps the file: a client may truncate it at any moment, and touching a mapped page
past the end of a file raises SIGBUS, which would kill the server and every stream of every job
with it. It reads and writes through the descriptor (``pread``/``pwrite``), where a truncated file
is a short read or an error (``RingBroken``) that ends that one stream. A client that truncates
its own file hurts only itself: its mapping is its own.

Layout (little-endian): a ``HEADER_BYTES`` header, then ``slots`` slots of ``slot_bytes``::

    0   magic  b"TFSHM001"         24  slots       u32     40  released  u64 (client writes)
    8   nonce  16 bytes            32  slot_bytes  u64
"""

from __future__ import annotations

import errno
import hmac
import mmap
import os
import re
import secrets
import stat
import struct
import tempfile
import time

from tokenfeed.v1 import tokenfeed_pb2 as pb

MAGIC = b"TFSHM001"
HEADER_BYTES = 4096
_FIXED = struct.Struct("<8s16sI4xQ")  # magic, nonce, slots, slot_bytes
_RELEASED = struct.Struct("<Q")
_RELEASED_AT = 40
NAME = re.compile(r"tokenfeed-\d+-[0-9a-f]{16}")
#: Bounds a server enforces on an offered ring.
MAX_SLOTS = 4096
MAX_RING_BYTES = 1 << 30


def default_dir() -> str:
    """``$TOKENFEED_SHM_DIR``, else ``/dev/shm`` where it exists (Linux), else the temp directory."""
    env = os.environ.get("TOKENFEED_SHM_DIR")
    if env:
        return env
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


#: A ring file older than this whose creator is gone is a leftover (see ``sweep``).
STALE_S = 60.0
_swept: set[tuple[int, str]] = set()  # (pid, directory) already swept by this process


def sweep(directory: str, now: float | None = None) -> list[str]:
    """Remove ring files left by clients killed before their first message arrived (a client
    unlinks its ring then): older than ``STALE_S``, created by a process id that no longer
    exists. Safe even if the id is alive in another PID namespace: a server opens a ring when the
    stream starts, so unlinking the file later takes nothing from anyone. Returns what went."""
    now = time.time() if now is None else now
    gone: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return gone
    for name in names:
        if not NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime < STALE_S or _alive(int(name.split("-")[1])):
                continue
            os.unlink(path)
            gone.append(path)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class ClientRing:
    """The client's side of a ring: it owns the file (created, then unlinked) and the mapping."""

    def __init__(self, slots: int, slot_bytes: int, directory: str | None = None) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.directory = directory or default_dir()
        if (os.getpid(), self.directory) not in _swept:  # once per process and directory
            _swept.add((os.getpid(), self.directory))
            sweep(self.directory)
        self.path = os.path.join(self.directory, f"tokenfeed-{os.getpid()}-{secrets.token_hex(8)}")
        self.nonce = secrets.token_bytes(16)
        size = HEADER_BYTES + slots * slot_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # Reserve the pages now: on a full tmpfs, touching an unreserved page kills the writer
            # (SIGBUS); here it is an OSError and the caller streams inline instead.
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        _FIXED.pack_into(self._map, 0, MAGIC, self.nonce, slots, slot_bytes)
        self._linked = True

    def spec(self) -> pb.SharedMemory:
        return pb.SharedMemory(path=self.path, nonce=self.nonce, slots=self.slots, slot_bytes=self.slot_bytes)

    def view(self, slot: int, nbytes: int) -> memoryview:
        """The first ``nbytes`` of ``slot`` (a ``ValueError`` for a slot or size the ring lacks)."""
        if not 0 <= slot < self.slots or not 0 <= nbytes <= self.slot_bytes:
            raise ValueError(f"message names slot {slot} of {nbytes} bytes; the ring has {self.slots} "
                             f"slots of {self.slot_bytes} bytes")
        start = HEADER_BYTES + slot * self.slot_bytes
        return memoryview(self._map)[start:start + nbytes]

    def release(self, messages: int) -> None:
        """The client is done with the first ``messages`` messages of the call."""
        _RELEASED.pack_into(self._map, _RELEASED_AT, messages)

    def unlink(self) -> None:
        if getattr(self, "_linked", True):
            self._linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        try:
            self._map.close()
        except BufferError:  # a view still alive (a caller's array): the mapping goes with it
            pass


class RingBroken(OSError):
    """The client broke its ring under a running stream (truncated or resized the file): that
    stream ends, the client may reconnect without shared memory; nothing else is affected."""


#: Trailing metadata on the status that ends a stream whose ring broke: the client may reopen the
#: stream from its cursor with tokens inline (``client.transport`` does).
BROKEN_KEY = "tokenfeed-shm-broken"
#: Opening an offered path must neither follow a link, block (a FIFO) nor adopt a terminal.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class ServerRing:
    """The server's side: the client's file, checked, then read and written through the descriptor
    this server opened, never through a mapping (see the module docstring: no SIGBUS)."""

    def __init__(self, fd: int, path: str, slots: int, slot_bytes: int) -> None:
        self._fd, self.path, self.slots, self.slot_bytes = fd, path, slots, slot_bytes
        self.size = HEADER_BYTES + slots * slot_bytes

    @classmethod
    def attach(cls, spec: pb.SharedMemory, directory: str) -> ServerRing:
        """Open the ring a request offers. Raises ``ValueError`` for an offer no client makes (the
        request is refused) and ``OSError`` when this server cannot use it (the client is on
        another host, sees another directory or runs as another user: tokens go inline)."""
        _check_offer(spec, directory)
        if not stat.S_ISREG(os.lstat(spec.path).st_mode):  # before opening: no FIFO, device or link
            raise OSError(errno.EINVAL, "not a regular file", spec.path)
        fd = os.open(spec.path, _OPEN_FLAGS)
        try:
            _check_file(fd, spec)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, spec.path, spec.slots, spec.slot_bytes)

    def released(self) -> int:
        """How many messages of the call the client is done with (``RingBroken`` if the counter
        is gone: the file was truncated)."""
        try:
            data = os.pread(self._fd, _RELEASED.size, _RELEASED_AT)
        except OSError as err:
            raise self._broken(f"reading its released counter: {err.strerror}") from None
        if len(data) < _RELEASED.size:
            raise self._broken("its released counter is gone: the file was truncated")
        return _RELEASED.unpack(data)[0]

    def writable(self, message: int) -> bool:
        return message < self.released() + self.slots

    def write(self, slot: int, data: bytes | memoryview) -> None:
        """Put ``data`` (one message's tokens, C-contiguous) at the start of ``slot``; check
        ``writable`` first. A file no longer the ring's size is ``RingBroken``: this catches a
        truncation before the write (a file truncated meanwhile only gets its hole refilled)."""
        nbytes = memoryview(data).nbytes
        if not 0 <= slot < self.slots or nbytes > self.slot_bytes:
            raise ValueError(f"{nbytes} bytes for slot {slot} do not fit {self.slots} slots of {self.slot_bytes} bytes")
        try:
            now = os.fstat(self._fd).st_size
            if now != self.size:
                raise self._broken(f"the file was truncated or resized to {now} bytes (the ring has {self.size})")
            written = os.pwrite(self._fd, data, HEADER_BYTES + slot * self.slot_bytes)
        except RingBroken:
            raise
        except OSError as err:
            raise self._broken(f"writing slot {slot}: {err.strerror}") from None
        if written != nbytes:
            raise self._broken(f"wrote {written} of {nbytes} bytes into slot {slot}")

    def _broken(self, why: str) -> RingBroken:
        return RingBroken(f"shared-memory ring {self.path} broke under the stream: {why}; "
                          f"the client should reconnect without shared memory")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _check_offer(spec: pb.SharedMemory, directory: str) -> None:
    """The offer's fields: ``ValueError`` for what no client sends, ``OSError`` for another directory."""
    if not 1 <= spec.slots <= MAX_SLOTS:
        raise ValueError(f"slots must be in [1, {MAX_SLOTS}], got {spec.slots}")
    if not 1 <= spec.slot_bytes or HEADER_BYTES + spec.slots * spec.slot_bytes > MAX_RING_BYTES:
        raise ValueError(f"{spec.slots} slots of {spec.slot_bytes} bytes exceed "
                         f"{MAX_RING_BYTES} bytes or are empty")
    if len(spec.nonce) != 16:
        raise ValueError("nonce must be 16 bytes")
    name = os.path.basename(spec.path)
    if not NAME.fullmatch(name):
        raise ValueError(f"path must name a tokenfeed ring (tokenfeed-PID-HEX), got {name!r}")
    if os.path.dirname(spec.path) != directory:
        raise OSError(errno.ENOENT, f"not in this server's shared-memory directory {directory}", spec.path)


def _check_file(fd: int, spec: pb.SharedMemory) -> None:
    """The opened file is the offering client's ring: a regular file of this server's user (a
    client of another user must not make it write into files it cannot write itself; root opens
    any file) of the offered size, whose header holds the offer's nonce."""
    size = HEADER_BYTES + spec.slots * spec.slot_bytes
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise OSError(errno.EINVAL, f"not a ring of {size} bytes", spec.path)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, this server runs as uid {os.geteuid()}", spec.path)
    header = os.pread(fd, _FIXED.size, 0)
    if len(header) < _FIXED.size:
        raise OSError(errno.EINVAL, "truncated while being opened", spec.path)
    magic, nonce, slots, slot_bytes = _FIXED.unpack(header)
    if (magic != MAGIC or not hmac.compare_digest(nonce, spec.nonce)
            or (slots, slot_bytes) != (spec.slots, spec.slot_bytes)):
        raise OSError(errno.EINVAL, "header does not match the offer (another client's file?)", spec.path)
