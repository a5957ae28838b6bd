"""The process between the app and one IPython kernel: ending it ends everything the kernel
started.

A kernel's process group is not enough to hold what a cell starts: `Popen(...,
start_new_session=True)`, a `setsid` double fork or `nohup cmd &` leave the group, and once the
kernel is gone its orphans belong to init. So `dialogue.kernel.process` starts this small program
instead of the kernel, and it starts the kernel:

- **Linux with a writable cgroup v2** (root, or a delegated subtree as under systemd user
  services): the kernel runs in a cgroup of its own, created beside this process's cgroup. No
  process can leave it without write access to another cgroup, and `cgroup.kill` (or freezing
  and SIGKILLing each member, before Linux 5.14) ends all of it at once.
- **Linux otherwise** (a read-only /sys/fs/cgroup, as in most containers, or
  `DIALOGUE_KERNEL_NO_CGROUP=1` in the kernel's environment): this process is a
  child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so every orphaned descendant, however it
  detached, is re-parented to it rather than to init. It ends them by walking /proc from its
  own pid and SIGKILLing every descendant until none is left.
- **Elsewhere** (macOS, the BSDs): neither exists; it ends the kernel's process group (what the
  kernel and plain subprocesses share). A process that made a session of its own survives
  there, and `Kernel.containment` says "process-group" so a caller can tell.

It ends everything when the kernel exits (the supervisor then exits with the kernel's status, or
dies by the kernel's signal, so the app reports the kernel's death as before); on SIGTERM or
SIGHUP (the app's "stop now"); and when the app dies, even by SIGKILL: its stdin is the read end
of a pipe whose only write end the app holds, so EOF means the app is gone. (PR_SET_PDEATHSIG was
not used: it fires when the *thread* that started the child exits, and the app may start kernels
from a short-lived event-loop thread.) A change of parent pid is checked too, for an app that
leaked the pipe's write end into a forked child.

SIGINT (jupyter_client's interrupt, sent to this process's group) is forwarded to the kernel's
process group, which is what the kernel had before there was a supervisor.

It imports only the standard library and runs with `python -I -S`, so it costs a few
milliseconds and nothing of the app's environment.

    python -I -S supervisor.py --info PATH -- KERNEL_ARGV...

PATH receives JSON once the kernel is started: {"supervisor_pid", "kernel_pid", "containment":
"cgroup" | "subreaper" | "process-group", "cgroup": path or null}, or {"error": ...} if the
kernel could not be started (exit status 127).
"""
from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
LINUX = sys.platform.startswith("linux")
END_WAIT = 5.0  # seconds spent making sure everything is gone before giving up
DISABLE_CGROUP_ENV = "DIALOGUE_KERNEL_NO_CGROUP"  # "1": use the subreaper even where a cgroup works


# ---------------------------------------------------------------- subreaper

def make_subreaper() -> bool:
    """Adopt orphaned descendants (Linux 3.4+). ctypes because the standard library has no
    prctl; no third-party package is wanted in a process that starts with every kernel."""
    if not LINUX:
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (psutil's children(recursive=True) does the same
    scan; it is not imported here to keep this process stdlib-only and quick to start)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int(data[data.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


# ---------------------------------------------------------------- cgroup v2

def _cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4].replace("\\040", " ")
    except OSError:
        pass
    return None


def _own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class CGroup:
    """A cgroup v2 directory holding the kernel and everything it starts."""

    def __init__(self, path: str):
        self.path = path
        self._procs_fd: int | None = None

    @classmethod
    def create(cls) -> "CGroup | None":
        """A new cgroup beside this process's own, or None where cgroups cannot be used (not
        Linux, v1 only, read-only, not delegated to us, disabled by the environment)."""
        if not LINUX or os.environ.get(DISABLE_CGROUP_ENV) == "1":
            return None
        mount, own = _cgroup2_mount(), _own_cgroup()
        if mount is None or own is None:
            return None
        parent = os.path.join(mount, own.lstrip("/"))
        path = os.path.join(parent, f"dialogue-k-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            os.mkdir(path)
        except OSError:
            return None
        cg = cls(path)
        try:
            # Opened here, written by the child between fork and exec: moving a process needs
            # write access to cgroup.procs, checked against whoever opened it.
            cg._procs_fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
        except OSError:
            cg.remove()
            return None
        return cg

    def join(self) -> None:
        """Move the calling process into the cgroup ("0" means the writer)."""
        assert self._procs_fd is not None
        os.write(self._procs_fd, b"0")

    def close_fd(self) -> None:
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None

    def _dirs(self) -> list[str]:
        """This cgroup and any a process inside made below it, deepest first."""
        out = []
        for root, dirs, _ in os.walk(self.path):
            out.extend(os.path.join(root, d) for d in dirs)
        return sorted(out, key=lambda p: p.count(os.sep), reverse=True) + [self.path]

    def pids(self) -> list[int]:
        found = []
        for d in self._dirs():
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    found.extend(int(x) for x in f.read().split())
            except (OSError, ValueError):
                pass
        return found

    def populated(self) -> bool:
        try:
            with open(os.path.join(self.path, "cgroup.events")) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == "populated":
                        return v.strip() != "0"
        except OSError:
            return False
        return bool(self.pids())

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and below it: one write with cgroup.kill (Linux
        5.14+); before that, freeze so nothing forks meanwhile, kill each member, thaw (a frozen
        process still dies of SIGKILL)."""
        try:
            with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                f.write("1")
            return
        except OSError:
            pass
        freeze = os.path.join(self.path, "cgroup.freeze")
        frozen = _write(freeze, "1")
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if frozen:
            _write(freeze, "0")

    def remove(self) -> bool:
        """rmdir the cgroup (and any below it); only possible once it is empty."""
        self.close_fd()
        ok = True
        for d in self._dirs():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- the supervisor

class Supervisor:
    def __init__(self, argv: list[str], info: str | None):
        self.argv = argv
        self.info = info
        self.parent = os.getppid()
        self.kernel: subprocess.Popen | None = None
        self.status: int | None = None  # the kernel's wait status, once reaped
        self.stop_asked = False
        self.parent_gone = False
        self.cgroup: CGroup | None = None
        self.subreaper = False

    # ------------------------------------------------------------ signals

    def _on_interrupt(self, signum: int, frame: object) -> None:
        k = self.kernel
        if k is not None and self.status is None:
            try:
                os.killpg(k.pid, signal.SIGINT)
            except OSError:
                pass

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_asked = True

    def _install_signals(self, wake_w: int) -> None:
        # Handlers, not SIG_IGN: a handled signal is reset by exec in the kernel, an ignored one
        # would be inherited (and a kernel that ignores SIGINT cannot be interrupted).
        signal.signal(signal.SIGINT, self._on_interrupt)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        self.subreaper = make_subreaper()
        self.cgroup = CGroup.create()
        env = dict(os.environ)
        # ipykernel's parent poller watches this pid: a kernel whose supervisor is gone exits.
        env["JPY_PARENT_PID"] = str(os.getpid())
        env.pop(DISABLE_CGROUP_ENV, None)
        try:
            self.kernel = self._spawn(env, self.cgroup)
        except subprocess.SubprocessError:  # joining the cgroup failed in the child
            if self.cgroup is not None:
                self.cgroup.remove()
                self.cgroup = None
            try:
                self.kernel = self._spawn(env, None)
            except OSError as e:
                self._write_info({"error": _oserror_text(e)})
                return False
        except OSError as e:
            if self.cgroup is not None:
                self.cgroup.remove()
                self.cgroup = None
            self._write_info({"error": _oserror_text(e)})
            return False
        if self.cgroup is not None:
            self.cgroup.close_fd()
        self._write_info({"supervisor_pid": os.getpid(), "kernel_pid": self.kernel.pid,
                          "containment": self.containment,
                          "cgroup": self.cgroup.path if self.cgroup else None})
        return True

    @property
    def containment(self) -> str:
        return "cgroup" if self.cgroup else "subreaper" if self.subreaper else "process-group"

    def _spawn(self, env: dict[str, str], cgroup: CGroup | None) -> subprocess.Popen:
        # preexec_fn is unsafe only in a process with threads; this one has none.
        return subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True,  # as jupyter_client starts a kernel
                                preexec_fn=cgroup.join if cgroup is not None else None)

    def _write_info(self, info: dict) -> None:
        if not self.info:
            return
        tmp = self.info + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, self.info)
        except OSError:
            pass

    def reap(self) -> None:
        """Collect every child that ended: the kernel (keeping its status) and the orphans this
        subreaper adopted."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if self.kernel is not None and pid == self.kernel.pid:
                self.status = status
                self.kernel.returncode = os.waitstatus_to_exitcode(status)

    def watch(self) -> None:
        """Wait until the kernel exits, the app asks for the end, or the app is gone."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._install_signals(wake_w)
        watch_stdin = _is_pipe(0)
        while True:
            self.reap()
            if self.status is not None or self.stop_asked:
                return
            if os.getppid() != self.parent:
                self.parent_gone = True
                return
            fds = [wake_r] + ([0] if watch_stdin else [])
            try:
                ready, _, _ = select.select(fds, [], [], 1.0)
            except InterruptedError:
                continue
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            if 0 in ready:
                try:
                    data = os.read(0, 512)
                except OSError:
                    data = b""
                if not data:
                    self.parent_gone = True
                    return

    def end_all(self) -> None:
        """SIGKILL the kernel and every process it started, wherever it went, and wait until
        they are gone (bounded)."""
        k = self.kernel
        if k is not None and self.status is None:
            for kill in (lambda: os.killpg(k.pid, signal.SIGKILL), lambda: os.kill(k.pid, signal.SIGKILL)):
                try:
                    kill()
                except OSError:
                    pass
        deadline = time.monotonic() + END_WAIT
        while True:
            if self.cgroup is not None and self.cgroup.populated():
                self.cgroup.kill()
            left = descendants(os.getpid()) if LINUX else []
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.reap()
            busy = bool(left) or (self.cgroup is not None and self.cgroup.populated())
            if (not busy and (k is None or self.status is not None)) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if self.cgroup is not None:
            self.cgroup.remove()

    def exit(self) -> None:
        """Leave as the kernel left: its exit status, or death by its signal."""
        code = os.waitstatus_to_exitcode(self.status) if self.status is not None else -signal.SIGKILL
        if code >= 0:
            os._exit(code)
        sig = -code
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of our own
        except (ImportError, ValueError, OSError):
            pass
        signal.set_wakeup_fd(-1)
        for s in (sig, signal.SIGKILL):
            try:
                signal.signal(s, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
            os.kill(os.getpid(), s)
            time.sleep(0.05)
        os._exit(128 + sig)


def _is_pipe(fd: int) -> bool:
    import stat
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _oserror_text(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


def main(args: list[str]) -> None:
    info = None
    if args[:1] == ["--info"] and len(args) >= 2:
        info, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.stderr.write("usage: supervisor.py [--info PATH] -- COMMAND...\n")
        os._exit(2)
    sup = Supervisor(args, info)
    if not sup.start():
        os._exit(127)
    sup.watch()
    sup.end_all()
    if sup.parent_gone and info:
        # The app died without cleaning up: its private directory (sockets, connection file
        # with the kernel's key) would otherwise stay until the next app start sweeps it.
        shutil.rmtree(os.path.dirname(os.path.abspath(info)), ignore_errors=True)
    sup.exit()


if __name__ == "__main__":
    main(sys.argv[1:])
