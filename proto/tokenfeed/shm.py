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

A client may also offer a FIFO beside the ring (``pipe``): a server that opens it writes each
message there, a ``u32`` length then the ``BatchChunk``'s bytes, instead of sending it over gRPC
(which then carries only the call's end). A message costs the server a ``write`` and the client a
``read``, where gRPC costs each side its HTTP/2 framing, a completion queue and thread wake-ups:
with many ranks on one server, the gRPC send was a quarter of the server loop's time. The server
closes the FIFO when the call ends (the client then reads the call's status), a server that dies
closes it too, and a client that goes makes the server's next write fail (``EPIPE``).

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
import fcntl
import hmac
import mmap
import os
import re
import secrets
import select
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
#: The FIFO beside a ring: the ring's path and this suffix.
PIPE_SUFFIX = ".pipe"
#: Initial metadata of a call whose messages come through the offered FIFO.
PIPE_KEY = "tokenfeed-shm-pipe"
_LENGTH = struct.Struct("<I")
#: A FIFO's buffer, asked for where the system allows (Linux's default is 64 KiB): the messages a
#: ring holds (eight) with their cursors and provenance fit without the server waiting on it.
PIPE_BYTES = 1 << 20
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
        if not NAME.fullmatch(name.removesuffix(PIPE_SUFFIX)):
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

    def __init__(self, slots: int, slot_bytes: int, directory: str | None = None, pipe: bool = False) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self._pipe = -1  # the FIFO's read end (``pipe``)
        self._received = bytearray()  # what was read from the FIFO past the last whole message
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
        if pipe:
            try:
                os.mkfifo(self.path + PIPE_SUFFIX, 0o600)
                # open before offering it: a server's non-blocking open for writing needs a reader
                self._pipe = os.open(self.path + PIPE_SUFFIX, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._poll = select.poll()  # (not select: a process may hold more than 1,024 descriptors)
                self._poll.register(self._pipe, select.POLLIN)
            except BaseException:
                self.close()
                raise

    @property
    def piped(self) -> bool:
        """Whether this ring offers a FIFO for the call's messages."""
        return self._pipe >= 0

    def spec(self) -> pb.SharedMemory:
        return pb.SharedMemory(path=self.path, nonce=self.nonce, slots=self.slots, slot_bytes=self.slot_bytes,
                               pipe=self.path + PIPE_SUFFIX if self._pipe >= 0 else "")

    def message(self, timeout: float) -> bytes | None:
        """The next message the server wrote into the FIFO; ``None`` if none came within
        ``timeout`` seconds. ``EOFError`` once the server closed it (the call ended) and every
        message before that was read; a torn message at the end is an ``EOFError`` as well."""
        while True:
            got = self._whole()
            if got is not None:
                return got
            if not self._poll.poll(timeout * 1000):
                return None
            data = os.read(self._pipe, 1 << 16)
            if not data:
                raise EOFError("the server closed the stream's pipe")
            self._received += data

    def _whole(self) -> bytes | None:
        """The first whole message of what was read, taken off it."""
        buf = self._received
        if len(buf) < _LENGTH.size:
            return None
        end = _LENGTH.size + _LENGTH.unpack_from(buf)[0]
        if len(buf) < end:
            return None
        data = bytes(buf[_LENGTH.size:end])
        del buf[:end]
        return data

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
            for path in (self.path, self.path + PIPE_SUFFIX):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        self.unlink()
        if self._pipe >= 0:
            fd, self._pipe = self._pipe, -1
            os.close(fd)
        if not hasattr(self, "_map"):
            return
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


class ServerPipe:
    """The server's end of a stream's FIFO (``SharedMemory.pipe``): each message a ``u32`` length
    and its bytes, written without blocking (``write`` says how much the FIFO took)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def attach(cls, spec: pb.SharedMemory) -> ServerPipe:
        """Open the FIFO a request offers beside its ring (whose offer ``ServerRing.attach``
        checked). ``ValueError`` for an offer no client makes, ``OSError`` when this server
        cannot use it (messages then go over gRPC)."""
        if spec.pipe != spec.path + PIPE_SUFFIX:
            raise ValueError(f"pipe must be the ring's path followed by {PIPE_SUFFIX!r}, got {spec.pipe!r}")
        if not stat.S_ISFIFO(os.lstat(spec.pipe).st_mode):  # before opening: no file, device or link
            raise OSError(errno.EINVAL, "not a FIFO", spec.pipe)
        # (non-blocking: ENXIO where no reader has it open, rather than waiting for one)
        fd = os.open(spec.pipe, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode):
                raise OSError(errno.EINVAL, "not a FIFO", spec.pipe)
            if st.st_uid != os.geteuid():
                raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, this server runs as uid {os.geteuid()}",
                              spec.pipe)
            if hasattr(fcntl, "F_SETPIPE_SZ"):
                try:
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
                except OSError:  # above the system's limit (fs.pipe-max-size): the default then
                    pass
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, spec.pipe)

    @staticmethod
    def frame(message: bytes) -> list[bytes]:
        """A message as the FIFO carries it."""
        return [_LENGTH.pack(len(message)), message]

    def write(self, parts: list[bytes] | list[memoryview]) -> int:
        """Write what the FIFO takes now of ``parts``; the bytes written (0: it is full).
        ``BrokenPipeError`` once the client closed its end."""
        try:
            return os.writev(self.fd, parts)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
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
