"""Memory cgroup pressure notifications on an asyncio loop.

gVisor's ``hostmm.NotifyCurrentMemcgPressureCallback``: the kernel tells us when a
memory cgroup comes under memory pressure, and we call a callback on the event loop
(``MemoryFile`` passes ``start_evictions``). gVisor parks a goroutine in a blocking
eventfd read; here the kernel's fd is watched by the loop itself, so there is no thread
and nothing blocks.

Two kernel mechanisms, chosen by what the cgroup directory offers:

- cgroup v1 (``memory.pressure_level``): an eventfd registered in
  ``cgroup.event_control`` at a vmpressure level ("low" fires on any reclaim in the
  group, "medium" on moderate reclaim, "critical" when the group is about to OOM).
  The eventfd is readable, so it goes straight to ``loop.add_reader``.
- cgroup v2 (``memory.pressure``) or a system-wide PSI file (``/proc/pressure/memory``):
  a PSI trigger (see :data:`PSI_TRIGGERS` for what each level means). PSI signals
  ``EPOLLPRI``, which ``add_reader`` does not watch, so the trigger fd sits in a private
  ``select.epoll`` whose own fd is what the loop watches.

Kernel quirks this module absorbs (each was observed on the machines this library is
developed on, kernel 6.x):

- The loop's readiness check of the nested epoll *consumes* the PSI event (the PSI
  poll handler clears the event as it reports it), so ``poll(0)`` inside our callback
  usually returns ``[]``: the callback running at all is the event.
- An unprivileged trigger (no ``CAP_SYS_RESOURCE``, which even root may lack in a
  container) starts its first window from a stale baseline, so a group with any stall
  history (the system-wide file, the root cgroup, an old cgroup) fires once spuriously
  on its first stall after arming, however small. A trigger on such a file has its
  first events checked against the group's ``total=`` counter: an event is delivered
  only once the stall really grew by the threshold since arming.
- Unprivileged triggers are evaluated by the kernel's 2-second averaging work, and
  *reading* the same PSI file (anyone's ``cat``) runs that averaging early and skips the
  trigger check for that period: events arrive 2-4 s after pressure starts, later if
  something polls the file.
- Removing a v1 cgroup signals its eventfds once; removing a v2 cgroup leaves the
  trigger fd permanently in ``EPOLLERR``. Both end the watcher (with a warning) rather
  than report pressure or spin the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
from collections.abc import Callable
from types import TracebackType
from typing import Final, NamedTuple

from .errors import AllocatorError

__all__ = [
    "PRESSURE_LEVELS",
    "PSI_TRIGGERS",
    "InvalidPressureLevelError",
    "MemcgPressureWatcher",
    "PressureWatcherError",
    "PsiTrigger",
    "current_memcg_path",
]

logger = logging.getLogger("asyncpgalloc")

#: The levels ``MemcgPressureWatcher.start`` accepts: cgroup v1's vmpressure levels.
PRESSURE_LEVELS: Final = ("low", "medium", "critical")


class PsiTrigger(NamedTuple):
    """A PSI trigger: notify when ``state`` stall time reaches ``stall_us`` within ``window_us``.

    ``state`` is ``"some"`` (at least one task of the group stalled on memory) or
    ``"full"`` (every non-idle task stalled at once: no progress at all).
    """

    state: str
    stall_us: int
    window_us: int

    def spec(self) -> bytes:
        """The string written to the PSI file; the kernel documents it NUL-terminated."""
        return f"{self.state} {self.stall_us} {self.window_us}".encode() + b"\0"


# Without CAP_SYS_RESOURCE the kernel accepts only windows that are a multiple of 2 s
# (a 1 s or 3 s window fails with EINVAL) and evaluates them every 2 s anyway, so every
# level uses 2 s: valid with or without the capability, and one evaluation per window.
# The shares follow Android lmkd's defaults (some 7% / some 10% / full 7% of a 1 s
# window), a little more conservative because a 2 s window averages out short bursts:
#: The PSI trigger used for each level on cgroup v2 / system-wide PSI files.
PSI_TRIGGERS: Final[dict[str, PsiTrigger]] = {
    # 7.5%: some task waits on reclaim or refaults noticeably - the analogue of v1's
    # "low" (reclaim is happening), early enough to shed cached memory cheaply.
    "low": PsiTrigger("some", 150_000, 2_000_000),
    # 15%: a visible share of the group's time is lost to memory.
    "medium": PsiTrigger("some", 300_000, 2_000_000),
    # 15% of *full* stall: the whole group makes no progress that often - thrashing,
    # the analogue of v1's "critical" (about to OOM).
    "critical": PsiTrigger("full", 300_000, 2_000_000),
}

_V1_FILE: Final = "memory.pressure_level"
_V1_CONTROL: Final = "cgroup.event_control"
_V2_FILE: Final = "memory.pressure"


class PressureWatcherError(AllocatorError):
    """Memory pressure notifications cannot be set up for this cgroup.

    Raised when the directory offers neither cgroup v1's ``memory.pressure_level`` nor a
    PSI ``memory.pressure`` file, or when the kernel refuses the registration. The
    message names what was missing or refused; the ``OSError`` is chained.
    """


class InvalidPressureLevelError(PressureWatcherError, ValueError):
    """The pressure level is not one of :data:`PRESSURE_LEVELS`."""


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _cgroup_mounts(fstype: str, controller: str | None) -> list[tuple[str, str]]:
    """(root inside the hierarchy, mount point) of each ``fstype`` mount (with ``controller``)."""
    mounts: list[tuple[str, str]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, sep, post = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            fields = pre.split(" ")
            tail = post.split(" ")
            if len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
                continue
            if controller is not None and controller not in tail[2].split(","):
                continue
            mounts.append((_unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4])))
    return mounts


def _under_mount(cgroup: str, mounts: list[tuple[str, str]]) -> str | None:
    # A mount may show only a subtree of the hierarchy (a container's bind mount); the
    # process's cgroup is reachable only through a mount whose root contains it.
    for root, mountpoint in mounts:
        if root == "/":
            rel = cgroup
        elif cgroup == root or cgroup.startswith(root.rstrip("/") + "/"):
            rel = cgroup[len(root.rstrip("/")) :]
        else:
            continue
        path = os.path.normpath(mountpoint + "/" + rel.lstrip("/"))
        if os.path.isdir(path):
            return path
    return None


def current_memcg_path() -> tuple[str, int]:
    """This process's memory cgroup directory and its cgroup version (1 or 2).

    Reads ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` (two small procfs reads;
    call it from the loop freely). When the memory controller is bound to a cgroup v1
    hierarchy that is mounted, that hierarchy's directory is the answer (version 1);
    otherwise the unified (v2) hierarchy's directory (version 2), which has PSI files
    even where the v2 memory controller is not enabled.

    Raises :class:`PressureWatcherError` when no mounted hierarchy holds the process.
    """
    v1_memory: str | None = None
    v2: str | None = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            hierarchy, controllers, cgroup = parts
            if hierarchy == "0" and controllers == "":
                v2 = cgroup
            elif "memory" in controllers.split(","):
                v1_memory = cgroup
    if v1_memory is not None:
        path = _under_mount(v1_memory, _cgroup_mounts("cgroup", "memory"))
        if path is not None:
            return path, 1
    if v2 is not None:
        path = _under_mount(v2, _cgroup_mounts("cgroup2", None))
        if path is not None:
            return path, 2
    raise PressureWatcherError(
        "cannot find this process's memory cgroup: /proc/self/cgroup names "
        f"v1 memory cgroup {v1_memory!r} and v2 cgroup {v2!r}, but no mounted cgroup "
        "hierarchy in /proc/self/mountinfo contains them"
    )


def _psi_total(fd: int, state: str) -> int | None:
    """The ``total=`` stall (µs) of ``state`` in a PSI file, or None if it cannot be parsed."""
    try:
        text = os.pread(fd, 512, 0).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == state:
            for word in words[1:]:
                if word.startswith("total="):
                    try:
                        return int(word[len("total=") :])
                    except ValueError:
                        return None
    return None


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # pragma: no cover - only on a double close, which would be our bug
        logger.exception("closing memcg pressure fd %d", fd)


class MemcgPressureWatcher:
    """Calls ``callback()`` on the loop each time the kernel reports pressure for a memory cgroup.

    Create one with :meth:`start`; end it with :meth:`stop` (or use it as a context
    manager). The callback runs on the loop thread, synchronously, from a reader
    callback: it should be quick (``MemoryFile.start_evictions`` only wakes tasks). An
    exception from it is logged on the ``"asyncpgalloc"`` logger and the watcher keeps
    going. Kernel notifications that pile up between two loop iterations are delivered
    as one call (the v1 eventfd counter is read and reset in one go; PSI reports at
    most one event per 2 s window anyway).

    Attributes: ``version`` (1 or 2: which mechanism is used; a system-wide PSI file
    counts as 2), ``path`` (the cgroup directory, or the PSI file when given one),
    ``level`` (``"low"``, ``"medium"`` or ``"critical"``).
    """

    version: int
    path: str
    level: str

    def __init__(
        self,
        *,
        callback: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        version: int,
        path: str,
        level: str,
        watch_fd: int,
        owned_fds: list[int],
        epoll: select.epoll | None,
        psi_fd: int | None = None,
        psi_baseline: int | None = None,
    ) -> None:
        # Private: use start(). Takes ownership of every fd passed in.
        self.version = version
        self.path = path
        self.level = level
        self._callback = callback
        self._loop = loop
        self._watch_fd = watch_fd
        self._owned_fds = owned_fds
        self._epoll = epoll
        self._psi_fd = psi_fd
        # While not None, PSI events are checked against the stall counter (see the
        # module docstring: spurious first events on groups with stall history).
        self._psi_baseline = psi_baseline
        self._events = 0
        self._active = True

    # -- setup -----------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        callback: Callable[[], None],
        *,
        level: str = "low",
        memcg_path: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> MemcgPressureWatcher:
        """Start watching a memory cgroup for pressure at ``level``.

        ``memcg_path`` is the cgroup's directory: under the v1 memory hierarchy's mount
        (it has ``memory.pressure_level``) or in a cgroup2 mount (it has
        ``memory.pressure``); a PSI file itself (``/proc/pressure/memory`` for the
        whole system, or a cgroup's ``memory.pressure``) is accepted too. ``None``
        means this process's own memory cgroup (:func:`current_memcg_path`).

        ``loop`` defaults to the running loop; call this on the loop's thread
        (``add_reader`` is not thread-safe). Setup is a handful of syscalls (open,
        eventfd or epoll, one write to a cgroup file, close) and does not block.

        Raises :class:`InvalidPressureLevelError` for an unknown level and
        :class:`PressureWatcherError` when neither mechanism is available or the
        kernel refuses it; every fd opened so far is closed before raising.
        """
        if level not in PRESSURE_LEVELS:
            raise InvalidPressureLevelError(
                f"pressure level must be one of {PRESSURE_LEVELS}, not {level!r}"
            )
        if loop is None:
            loop = asyncio.get_running_loop()
        path = os.path.abspath(memcg_path) if memcg_path is not None else current_memcg_path()[0]

        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, _V1_FILE)):
                return cls._start_v1(callback, loop, path, level)
            if os.path.exists(os.path.join(path, _V2_FILE)):
                return cls._start_psi(callback, loop, path, os.path.join(path, _V2_FILE), level)
            raise PressureWatcherError(
                f"{path} has neither {_V1_FILE} (cgroup v1 memory controller) nor "
                f"{_V2_FILE} (cgroup v2 PSI): not a memory cgroup directory, or the "
                "kernel lacks both (PSI needs CONFIG_PSI and psi=1)"
            )
        if os.path.isfile(path):
            return cls._start_psi(callback, loop, path, path, level)
        raise PressureWatcherError(f"memory cgroup {path} does not exist")

    @classmethod
    def _start_v1(
        cls,
        callback: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        path: str,
        level: str,
    ) -> MemcgPressureWatcher:
        pressure_path = os.path.join(path, _V1_FILE)
        control_path = os.path.join(path, _V1_CONTROL)
        opened: list[int] = []
        efd = -1
        try:
            try:
                pressure_fd = os.open(pressure_path, os.O_RDONLY | os.O_CLOEXEC)
                opened.append(pressure_fd)
                control_fd = os.open(control_path, os.O_WRONLY | os.O_CLOEXEC)
                opened.append(control_fd)
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                opened.append(efd)
                # One write(2): the kernel parses the whole registration from one buffer.
                spec = f"{efd} {pressure_fd} {level}".encode()
                os.write(control_fd, spec)
            except OSError as e:
                raise PressureWatcherError(
                    f"cannot register a {level!r} pressure eventfd for {pressure_path} "
                    f"through {control_path}: {e}"
                ) from e
            # The registration holds its own references: only the eventfd must stay
            # open (closing it is what unregisters, as in gVisor).
            for fd in (control_fd, pressure_fd):
                opened.remove(fd)
                _close_quietly(fd)
            watcher = cls(
                callback=callback,
                loop=loop,
                version=1,
                path=path,
                level=level,
                watch_fd=efd,
                owned_fds=[efd],
                epoll=None,
            )
            loop.add_reader(efd, watcher._on_eventfd_ready)
        except BaseException:
            for fd in reversed(opened):
                _close_quietly(fd)
            raise
        logger.debug("watching %s for %r memory pressure (cgroup v1 eventfd)", path, level)
        return watcher

    @classmethod
    def _start_psi(
        cls,
        callback: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        path: str,
        psi_path: str,
        level: str,
    ) -> MemcgPressureWatcher:
        trigger = PSI_TRIGGERS[level]
        opened: list[int] = []
        epoll: select.epoll | None = None
        try:
            try:
                psi_fd = os.open(psi_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                opened.append(psi_fd)
                # Read before arming, so the baseline is no later than the kernel's.
                baseline = _psi_total(psi_fd, trigger.state)
                os.write(psi_fd, trigger.spec())
                epoll = select.epoll(1)  # EPOLL_CLOEXEC is Python's default
                epoll.register(psi_fd, select.EPOLLPRI)
            except OSError as e:
                raise PressureWatcherError(
                    f"cannot arm PSI trigger {trigger.spec()[:-1].decode()!r} on {psi_path}: "
                    f"{e} (EINVAL: the window must be a multiple of 2 s without "
                    "CAP_SYS_RESOURCE; EOPNOTSUPP: PSI is disabled)"
                ) from e
            # A group with no stall yet cannot fire spuriously (the kernel's stale
            # baseline is 0 as well): only groups with history need the check.
            watcher = cls(
                callback=callback,
                loop=loop,
                version=2,
                path=path,
                level=level,
                watch_fd=epoll.fileno(),
                owned_fds=[psi_fd],
                epoll=epoll,
                psi_fd=psi_fd,
                psi_baseline=baseline if baseline else None,
            )
            loop.add_reader(epoll.fileno(), watcher._on_psi_ready)
        except BaseException:
            if epoll is not None:
                epoll.close()
            for fd in reversed(opened):
                _close_quietly(fd)
            raise
        logger.debug(
            "watching %s for %r memory pressure (PSI trigger %r)",
            psi_path,
            level,
            trigger.spec()[:-1].decode(),
        )
        return watcher

    # -- readiness callbacks (on the loop) -------------------------------------------

    def _on_eventfd_ready(self) -> None:
        try:
            os.eventfd_read(self._watch_fd)
        except BlockingIOError:
            return  # another reader or a spurious wakeup: nothing was counted
        # Removing the cgroup signals its eventfds one last time (the kernel's
        # unregistration path): that is no pressure, and no further event can come.
        if not os.path.isdir(self.path):
            logger.warning("memory cgroup %s was removed; pressure watcher stopped", self.path)
            self.stop()
            return
        self._deliver()

    def _on_psi_ready(self) -> None:
        assert self._epoll is not None and self._psi_fd is not None
        # Usually [] (the loop's readiness check consumed the event); only a persistent
        # condition such as EPOLLERR survives to be seen here.
        for _fd, mask in self._epoll.poll(0):
            if mask & (select.EPOLLERR | select.EPOLLHUP):
                logger.warning(
                    "PSI trigger on %s reports an error (the cgroup was removed?); "
                    "pressure watcher stopped",
                    self.path,
                )
                self.stop()
                return
        if self._psi_baseline is not None:
            total = _psi_total(self._psi_fd, PSI_TRIGGERS[self.level].state)
            if total is not None and total - self._psi_baseline < PSI_TRIGGERS[self.level].stall_us:
                logger.debug(
                    "ignoring PSI event on %s: stall grew %d µs since arming, below the "
                    "threshold (the kernel's first-window event for a group with history)",
                    self.path,
                    total - self._psi_baseline,
                )
                return
            self._psi_baseline = None
        self._deliver()

    def _deliver(self) -> None:
        self._events += 1
        try:
            self._callback()
        except Exception:
            # The watcher outlives a failing callback, as gVisor's goroutine does.
            logger.exception(
                "memory pressure callback %r for %s raised; still watching",
                self._callback,
                self.path,
            )

    # -- public ------------------------------------------------------------------------

    @property
    def events(self) -> int:
        """How many notifications were delivered (callback calls, including ones that raised)."""
        return self._events

    @property
    def active(self) -> bool:
        """False once stopped, by :meth:`stop` or because the cgroup went away."""
        return self._active

    def stop(self) -> None:
        """Stop watching and close every fd. Idempotent; call on the loop's thread.

        The loop stops watching the fd before it is closed (uvloop requires that
        order). Closing the v1 eventfd unregisters it from the cgroup; closing the PSI
        fd destroys the trigger. A few syscalls, nothing blocks.
        """
        if not self._active:
            return
        self._active = False
        try:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._watch_fd)
        finally:
            if self._epoll is not None:
                self._epoll.close()
            for fd in reversed(self._owned_fds):
                _close_quietly(fd)
            self._owned_fds = []

    def __enter__(self) -> MemcgPressureWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "active" if self._active else "stopped"
        return (
            f"<MemcgPressureWatcher v{self.version} {self.path} level={self.level} "
            f"events={self._events} {state}>"
        )
