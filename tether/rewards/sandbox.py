"""Run untrusted programs (model-written code) in an isolated, resource-limited process tree.

One run is one fresh tree, and the trainer talks to it only through pipes:

    trainer ──Popen, new session──► boot    `python -I -S sandbox.py SPEC` (this file, as a script)
                                     │  unshare(net, mount, pid, ipc, uts [, user])
                                     └─fork─► init    pid 1 of the new pid namespace
                                                │  read-only system folders, all others hidden,
                                                │  private tmpfs /tmp and workdir, fresh /proc
                                                └─fork─► program   rlimits, setuid(sandbox uid),
                                                                   no_new_privs, seccomp, exec python

- The fresh root has its own /dev (five device nodes and a private devpts; every other mount is nodev),
  and the program runs under a seccomp deny-list (`SECCOMP_DENIED`: keyrings, bpf, perf, userfaultfd,
  io_uring, ptrace, mounts, namespaces, kexec, modules), installed by `_install_seccomp` before exec.
- stdin, stdout and stderr are pipes to the trainer; stdout/stderr are capped (`max_output_bytes`).
- init reports the program's wait status and CPU time on a status pipe the program never holds.
- The wall-clock limit kills the tree's process group; killing init kills everything in its pid
  namespace, including processes that called setsid() to leave the group.
- As root, each run gets its own uid from a range (60000+; locked across processes with flock), so
  RLIMIT_NPROC bounds a fork bomb and the program cannot signal, ptrace or write anything of yours.
  Not as root, an unprivileged user namespace gives the same namespaces, and the program runs as
  you but without capabilities, with your home folders hidden and / read-only.

`probe()` finds out once per process which of this the machine allows. `Sandbox` refuses to run
with less than full isolation unless `allow_weak=True`, and then logs what is missing.
docs/sandbox.md has the threat model.

This file has two halves. The first runs INSIDE the boot process and imports only what it needs,
so that each run starts fast; the second is the trainer side.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import sys

# clone(2) / unshare(2) flags
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
# mount(2) flags
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
# mount_setattr(2): the one call that makes a whole mount tree read-only (Linux >= 5.12)
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscalls share one table)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# prctl(2)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
# seccomp(2) classic-BPF filter: instructions, and what the filter returns
BPF_LD_W_ABS, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS = 1, 38
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

SETUP_FAILED = 125
MAX_FD = 1 << 20  # descriptors above the program's own are closed up to here
"""Exit status of boot/init when the sandbox could not be built (never the program's own status)."""

SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr", "/etc", "/sys")
"""What a program sees of the machine, read-only and nodev, in a fresh root: nothing else exists there
(no /home, /root, /var, /run, /mnt, /opt, /work, /data, ...: keys, tokens, datasets with the answers,
other users' files), except the interpreter's own folders, bound back read-only, and a fresh /dev."""

DEVICES = ("null", "zero", "full", "random", "urandom")
"""The only host device nodes in the sandbox's fresh /dev (each bound alone, read-only mount, writable
node). Besides them /dev holds a private devpts instance (`/dev/ptmx` -> `pts/ptmx`, at most
MAX_PTYS ptys, none of the host's), the /dev/shm tmpfs and the /dev/fd, stdin/out/err links: no
/dev/nvidia*, /dev/dri, /dev/kvm, disks, ttys or the host's pty pool."""
MAX_PTYS = 8

WRITABLE_DIRS = ("/tmp", "/dev/shm")
"""Empty, size-limited tmpfs, private to the run."""


SECCOMP_DENIED = (
    "add_key", "request_key", "keyctl",  # kernel keyrings: would persist across runs of the same uid
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns", "open_by_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "lookup_dcookie", "iopl", "ioperm",
)
"""System calls the program gets EPERM for (a deny-list of kernel-attack surface it never needs). Also:
`clone` with any CLONE_NEW* flag is EPERM, `clone3` is ENOSYS (its flags sit behind a pointer seccomp
cannot read; glibc then falls back to `clone`), and any call through a foreign ABI (x32, i386) is EPERM."""

SYSCALL_NUMBERS = {
    "x86_64": (0xC000003E, dict(
        add_key=248, request_key=249, keyctl=250, bpf=321, perf_event_open=298, userfaultfd=323,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, ptrace=101, process_vm_readv=310,
        process_vm_writev=311, mount=165, umount2=166, pivot_root=155, chroot=161, open_tree=428, move_mount=429,
        fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, unshare=272, setns=308,
        open_by_handle_at=304, kexec_load=246, kexec_file_load=320, init_module=175, finit_module=313,
        delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163, syslog=103, quotactl=179,
        lookup_dcookie=212, iopl=172, ioperm=173, clone=56, clone3=435,
    )),
    "aarch64": (0xC00000B7, dict(
        add_key=217, request_key=218, keyctl=219, bpf=280, perf_event_open=241, userfaultfd=282,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, mount=40, umount2=39, pivot_root=41, chroot=51, open_tree=428, move_mount=429,
        fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, unshare=97, setns=268,
        open_by_handle_at=265, kexec_load=104, kexec_file_load=294, init_module=105, finit_module=273,
        delete_module=106, reboot=142, swapon=224, swapoff=225, acct=89, syslog=116, quotactl=60,
        lookup_dcookie=18, clone=220, clone3=435,
    )),
}
"""(AUDIT_ARCH_*, system call numbers) per machine; elsewhere no filter is installed (docs/sandbox.md)."""


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_filter(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The deny-list as classic BPF over `struct seccomp_data` (nr at byte 0, arch at 4, args from 16),
    as (code, jt, jf, k) instructions; None on a machine without a table."""
    if machine not in SYSCALL_NUMBERS:
        return None
    arch, numbers = SYSCALL_NUMBERS[machine]
    deny, enosys = SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ERRNO | ENOSYS
    program: list[tuple] = [
        (BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ, 1, 0, arch), (BPF_RET, 0, 0, deny),  # foreign ABI: nothing
        (BPF_LD_W_ABS, 0, 0, 0),
    ]
    if machine == "x86_64":
        program.append((BPF_JGE, "deny", 0, 0x40000000))  # the x32 ABI: the same calls, other numbers
    program += [(BPF_JEQ, "deny", 0, numbers[name]) for name in SECCOMP_DENIED if name in numbers]
    program += [
        (BPF_JEQ, "enosys", 0, numbers["clone3"]),
        (BPF_JEQ, 0, "allow", numbers["clone"]),
        (BPF_LD_W_ABS, 0, 0, 16),  # clone's flags: the low half of argument 0 (little-endian)
        (BPF_JSET, "deny", 0, NAMESPACE_FLAGS),
    ]
    labels = {"allow": len(program), "deny": len(program) + 1, "enosys": len(program) + 2}
    program += [(BPF_RET, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET, 0, 0, deny), (BPF_RET, 0, 0, enosys)]
    jump = lambda at, target: labels[target] - at - 1 if isinstance(target, str) else target  # noqa: E731
    return [(code, jump(i, jt), jump(i, jf), k) for i, (code, jt, jf, k) in enumerate(program)]


def _install_seccomp() -> None:
    """Install `seccomp_filter` for this process and everything it starts (needs no_new_privs first)."""
    program = seccomp_filter(os.uname().machine)
    if program is None:
        return
    instructions = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), instructions)
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "prctl(PR_SET_SECCOMP)")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    result = _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))
    _check(result, f"mount {fstype or source} on {target}")


def _make_read_only(path: str, recursive: bool, nodev: bool = True) -> None:
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (MOUNT_ATTR_NODEV if nodev else 0))
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(), ctypes.c_uint(flags),
        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, f"mount_setattr(read-only) on {path}")


def _report(status_fd: int, **message) -> None:
    os.write(status_fd, (json.dumps(message) + "\n").encode())


def _boot(spec: dict) -> int:
    """The boot process: new namespaces, then fork init and wait for it. Runs as the trainer's user."""
    status_fd = spec["status_fd"]
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the trainer (the thread that started us) dies -> we die
    if os.getppid() != spec["parent_pid"]:
        return SETUP_FAILED
    try:
        if spec["namespaces"]:
            flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
            if spec["user_namespace"]:
                flags |= CLONE_NEWUSER
            uid, gid = os.getuid(), os.getgid()  # before unshare: afterwards they read as unmapped (65534)
            _check(_libc.unshare(flags), "unshare")
            if spec["user_namespace"]:  # map only ourselves; the program keeps our uid, loses all capabilities
                maps = {"setgroups": "deny", "uid_map": f"{uid} {uid} 1", "gid_map": f"{gid} {gid} 1"}
                for name, text in maps.items():
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
    except OSError as error:
        _report(status_fd, error=str(error))
        return SETUP_FAILED
    init = os.fork()
    if init == 0:
        try:
            code = _init(spec)
        except BaseException as error:  # noqa: BLE001 - anything here is a setup failure, reported
            _report(status_fd, error=f"{type(error).__name__}: {error}")
            code = SETUP_FAILED
        os._exit(code)
    os.waitpid(init, 0)
    return 0


def _init(spec: dict) -> int:
    """pid 1 of the sandbox: build its filesystem view, run the program, reap, report, exit.

    When this process exits, the kernel kills every process left in its pid namespace."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.umask(0o022)
    if spec["namespaces"]:
        _build_filesystem(spec)
    program = os.fork()
    if program == 0:
        _exec_program(spec)  # never returns
    while True:  # reap everything reparented to us; stop when the program itself is done
        pid, wait_status, usage = os.wait4(-1, 0)
        if pid == program:
            break
    _report(spec["status_fd"], wait_status=wait_status, cpu=usage.ru_utime + usage.ru_stime)
    return 0


def _build_filesystem(spec: dict) -> None:
    """Inside the new mount namespace, build a fresh root and chroot into it.

    The root is a tmpfs holding read-only binds of SYSTEM_DIRS and of the interpreter's folders
    (spec["expose"]), then writable tmpfs /tmp, /dev/shm and workdir, and a /proc of this pid
    namespace. chroot (not pivot_root) is enough: the program never holds CAP_SYS_CHROOT."""
    workdir, size = spec["workdir"], f"size={spec['tmpfs_mb']}m,nr_inodes=4096"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    staged = {}  # the program files the trainer wrote into workdir
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                staged[name] = f.read()

    root = workdir  # any existing folder will do as the mount point of the new root
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            os.mkdir(root + path)
            _mount(path, root + path, None, MS_BIND | MS_REC)
    for path in spec["expose"]:
        if not any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS):
            os.makedirs(root + path)
            _mount(path, root + path, None, MS_BIND | MS_REC)
    for path in ("/tmp", "/proc", *([] if workdir.startswith("/tmp/") else [workdir])):
        os.makedirs(root + path, exist_ok=True)  # mount points, made before everything turns read-only
    _stage_dev(root + "/dev")
    _make_read_only(root, recursive=True)  # and nodev: no device node opens anywhere but the ones below
    _fill_dev(root + "/dev")

    for path in WRITABLE_DIRS:
        if os.path.isdir(root + path):
            _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
    os.makedirs(root + workdir, exist_ok=True)
    owner = f"uid={spec['uid']},gid={spec['gid']}," if spec["uid"] is not None else ""
    _mount("tmpfs", root + workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},{owner}mode=0700")
    for name, data in staged.items():
        with open(root + os.path.join(workdir, name), "wb") as f:
            f.write(data)
        os.chmod(root + os.path.join(workdir, name), 0o444)
    try:  # a /proc that shows only this pid namespace
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # refused in some containers: an empty /proc rather than the host's
        _mount("tmpfs", root + "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=0555")
    os.chdir(root)
    os.chroot(".")


def _stage_dev(dev: str) -> None:
    """A fresh /dev (a small tmpfs): mount points for DEVICES, pts and shm, and the usual links."""
    os.mkdir(dev)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in DEVICES:
        os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
    for name in ("pts", "shm"):
        os.mkdir(f"{dev}/{name}")
    links = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}
    for name, target in links.items():
        os.symlink(target, f"{dev}/{name}")


def _fill_dev(dev: str) -> None:
    """After the root turned read-only and nodev: bind each of DEVICES alone (its mount keeps device
    access, read-only: the node stays writable, `chmod` on it fails) and mount a private devpts."""
    for name in DEVICES:
        _mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
        _make_read_only(f"{dev}/{name}", recursive=False, nodev=False)
    try:  # a new devpts instance: its ptys are not the host's, and there are at most MAX_PTYS of them
        options = f"newinstance,ptmxmode=0666,mode=0620,max={MAX_PTYS}"
        _mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, options)
    except OSError:  # refused (some containers): no ptys at all, never the host's
        pass


def _exec_program(spec: dict) -> None:
    """The forked program process: limits, descriptors, identity, then exec. Reports failures to init's pipe."""
    status_fd = spec["status_fd"]
    try:
        limits = spec["limits"]
        for name, value in (
            ("RLIMIT_CORE", (0, 0)),
            ("RLIMIT_CPU", (limits["cpu_seconds"], limits["cpu_seconds"] + 1)),  # SIGXCPU, then SIGKILL
            ("RLIMIT_AS", (limits["memory_bytes"],) * 2),
            ("RLIMIT_NPROC", (limits["max_processes"],) * 2),
            ("RLIMIT_FSIZE", (limits["max_file_bytes"],) * 2),
        ):
            resource.setrlimit(getattr(resource, name), value)
        # Descriptors: the trainer's extra pipes become 3, 4, ...; the status pipe stays open only
        # until exec (to report an exec failure); everything else but 0-2 is closed.
        first_free = 3 + len(spec["input_fds"])
        status_fd = fcntl.fcntl(status_fd, fcntl.F_DUPFD_CLOEXEC, first_free)
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, first_free) for fd in spec["input_fds"]]
        for target, fd in enumerate(moved, start=3):
            os.dup2(fd, target)
        os.closerange(first_free, status_fd)
        os.closerange(status_fd + 1, MAX_FD)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
        os.chdir(spec["workdir"])
        if spec["uid"] is not None:
            os.setgroups([])
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries do not raise privileges from here on
        if sys.platform == "linux":
            _install_seccomp()
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as error:  # noqa: BLE001 - reported, then the child ends
        _report(status_fd, error=f"starting the program failed: {type(error).__name__}: {error}")
    os._exit(SETUP_FAILED)


if __name__ == "__main__":  # the boot process stops here: it must not pay for the imports below
    sys.exit(_boot(json.loads(sys.argv[1])))


# =============================================================================================
# Trainer side

import logging  # noqa: E402  (see the module docstring: the boot process never gets here)
import math  # noqa: E402
import pwd  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

log = logging.getLogger(__name__)

STARTUP_GRACE_S = 1.0
"""Added to every wall-clock limit: starting the boot process and the interpreter takes ~0.1 s on an
idle machine and several times that on a loaded one; the time limit is meant for the program."""

SANDBOX_UID_BASE, SANDBOX_UID_COUNT = 60000, 1000
"""As root, each concurrent run gets its own uid from [BASE, BASE+COUNT). Uids listed in /etc/passwd,
or owning a process we did not start, are skipped; an flock per uid keeps other trainers off it."""

PYTHON_FLAGS = ("-s", "-S", "-B", "-P") if sys.version_info >= (3, 11) else ("-I", "-S", "-B")
"""No site-packages, no user site, no .pyc writes, script folder not on sys.path. Not -I/-E: the
environment is entirely ours (scrubbed), and -E would drop the fixed PYTHONHASHSEED."""

STATUS_MAX_BYTES = 64 * 1024


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate programs as required, and a weaker sandbox was not accepted."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run."""

    timeout: float = 2.0
    """Wall-clock seconds for the program (STARTUP_GRACE_S is added); also bounds CPU time."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS) of each process: allocations beyond it fail (MemoryError)."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes + threads of the run (its own uid as root; its own user namespace
    otherwise). Memory is limited per process, so a run can hold up to max_processes x memory_mb."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: the largest file the program may write."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output_bytes: int = 1 << 20
    """stdout and stderr kept by the trainer, each; a program that writes more is killed ("output_limit")."""
    tmpfs_mb: int = 64
    """Size of the program's private workdir and /tmp (memory-backed, gone when the run ends)."""

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "max_processes", "max_file_mb", "max_open_files",
                     "max_output_bytes", "tmpfs_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == math.inf:
                raise ValueError(f"sandbox limit '{name}' must be a positive number, got {value!r}")


RUN_STATUSES = ("ok", "crash", "timeout", "memory", "output_limit", "sandbox_error")


@dataclass(frozen=True)
class RunResult:
    """What one run produced. Nothing in it is a judgement: the caller compares stdout itself."""

    status: str
    """ok (exit 0) | crash (other exit or signal) | timeout | memory | output_limit | sandbox_error."""
    stdout: str
    stderr: str
    returncode: int | None
    """Exit code, or -signal; None when the program was killed by the trainer or never started."""
    elapsed: float
    """Wall-clock seconds of the whole run, start-up included."""
    cpu_time: float | None = None


@dataclass(frozen=True)
class Isolation:
    """Which layers a sandbox applies (found by `probe`)."""

    namespaces: bool
    """Own network (no interfaces, loopback down), pid, mount, ipc and uts namespaces."""
    user_namespace: bool
    """Namespaces created unprivileged; the program runs as you, without capabilities."""
    drop_uid: bool
    """(root) the program runs as a per-run uid of its own."""
    detail: str = ""
    """Why a stronger configuration failed, when it did."""

    @property
    def strict(self) -> bool:
        return self.namespaces and (self.user_namespace or self.drop_uid)

    def missing(self) -> list[str]:
        """Layers absent here, in words (empty when strict)."""
        missing = []
        if not self.namespaces:
            missing += [
                "network isolation (programs can open sockets)",
                "own pid namespace (programs see your processes; setsid() escapes the process group)",
                "private filesystem view (programs can read and write whatever their user can)",
            ]
        if not (self.user_namespace or self.drop_uid):
            as_whom = "your user, i.e. root" if os.geteuid() == 0 else "your user"
            missing.append(f"privilege drop (programs run as {as_whom})")
        return missing


# ---------------------------------------------------------------------------------------------
# Uids for runs as root


def _process_uids() -> dict[int, int]:
    """pid -> real uid of every process on the machine (as far as /proc shows). Read from `status`:
    the owner of /proc/<pid> reads as root for a process that made itself non-dumpable."""
    owners = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Uid:"):
                            owners[int(entry)] = int(line.split()[1])
                            break
            except (OSError, ValueError, IndexError):
                pass
    return owners


class _UidPool:
    """Per-run uids, exclusive across this machine's trainers through one flock'ed file per uid."""

    def __init__(self, base: int = SANDBOX_UID_BASE, count: int = SANDBOX_UID_COUNT):
        self.base, self.count = base, count
        self._free: list[int] = []
        self._locks: dict[int, int] = {}  # uid -> fd holding its flock, for the life of this process
        self._lock = threading.Lock()

    def _lock_dir(self) -> str:
        for path in ("/run/tether-sandbox", "/var/lock/tether-sandbox", "/tmp/tether-sandbox-uids"):
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o077:
                return path
        raise SandboxUnavailable("no private root-owned folder for sandbox uid locks (/run/tether-sandbox)")

    def acquire(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            lock_dir, busy = self._lock_dir(), set(_process_uids().values())
            for uid in range(self.base, self.base + self.count):
                if uid in self._locks or uid in busy:
                    continue
                try:
                    pwd.getpwuid(uid)
                    continue  # a real account: never ours
                except KeyError:
                    pass
                fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                self._locks[uid] = fd
                return uid
        raise SandboxUnavailable(f"all sandbox uids {self.base}-{self.base + self.count - 1} are in use")

    def release(self, uid: int) -> None:
        kill_uid(uid)
        with self._lock:
            self._free.append(uid)

    def uids(self) -> set[int]:
        with self._lock:
            return set(self._locks)


def kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process of `uid` until none is left (a process may fork while we sweep)."""
    for _ in range(rounds):
        pids = [pid for pid, owner in _process_uids().items() if owner == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
    log.warning("sandbox uid %d still has processes after %d kill rounds", uid, rounds)


_uid_pool = _UidPool()


def sandbox_processes() -> list[int]:
    """Pids of live processes owned by any sandbox uid this process has used (for tests and checks)."""
    uids = _uid_pool.uids()
    return [pid for pid, owner in _process_uids().items() if owner in uids]


# ---------------------------------------------------------------------------------------------
# One run


def _interpreter_dirs(python: str) -> list[str]:
    """Folders the interpreter needs (exposed read-only inside the sandbox even where a home folder
    is hidden): its binary's folder and its prefix, the folder above (`prefix/bin/python`)."""
    binary = os.path.realpath(python)
    dirs = {os.path.dirname(binary), os.path.dirname(os.path.dirname(binary))}
    if binary == os.path.realpath(sys.executable):
        dirs |= {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    dirs.discard("/")
    return [d for d in sorted(dirs) if not any(d.startswith(other + "/") for other in dirs)]


def _program_env(workdir: str) -> dict[str, str]:
    """The program's whole environment: nothing inherited from the trainer (no tokens, no keys)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": "/tmp",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function, failed_path, _):
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, 0o700)
        function(failed_path)

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)
    except OSError as error:
        log.warning("could not remove sandbox workdir %s: %s", path, error)


class _Pipes:
    """The trainer's ends of one run's pipes: feeds inputs, collects capped outputs, closes them all."""

    def __init__(self, writes: dict[int, bytes], reads: dict[str, int], caps: dict[str, int]):
        self.selector = selectors.DefaultSelector()
        self.out = {name: bytearray() for name in reads}
        self.caps = caps
        self.overflow = False
        for fd, data in writes.items():
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_WRITE, memoryview(data))
        for name, fd in reads.items():
            self.selector.register(fd, selectors.EVENT_READ, name)

    def pump(self, deadline: float) -> bool:
        """Move data until every read pipe is at EOF (True), or the deadline or an output cap hits (False)."""
        while any(key.events & selectors.EVENT_READ for key in self.selector.get_map().values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self.selector.select(remaining):
                if key.events & selectors.EVENT_WRITE:
                    self._write(key)
                elif not self._read(key):
                    return False
        return True

    def _write(self, key) -> None:
        try:
            rest = key.data[os.write(key.fd, key.data[:65536]):]
        except BlockingIOError:
            return
        except BrokenPipeError:  # the program stopped reading: fine
            rest = b""
        self.selector.unregister(key.fd)
        if rest:
            self.selector.register(key.fd, selectors.EVENT_WRITE, rest)
        else:
            os.close(key.fd)

    def _read(self, key) -> bool:
        chunk = os.read(key.fd, 65536)
        if not chunk:
            self.selector.unregister(key.fd)
            os.close(key.fd)
            return True
        buffer = self.out[key.data]
        room = self.caps[key.data] - len(buffer)
        buffer += chunk[:room]
        if len(chunk) > room and key.data != "status":
            self.overflow = True
            return False
        return True

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fd)
            os.close(key.fd)
        self.selector.close()


class Sandbox:
    """Runs programs with the isolation `probe()` found; refuses weaker isolation unless allowed.

    `allow_weak=True` accepts whatever the machine allows (possibly only rlimits, a scrubbed
    environment and a temporary folder) and logs a warning naming what is missing."""

    def __init__(self, *, allow_weak: bool = False, python: str = sys.executable):
        self.python = os.path.realpath(python)
        self.isolation = probe(self.python)
        if not self.isolation.strict:
            missing = "; ".join(self.isolation.missing())
            if not allow_weak:
                raise SandboxUnavailable(
                    f"the code sandbox cannot fully isolate programs on this machine. Missing: {missing}. "
                    f"({self.isolation.detail}) To get full isolation run as root, or allow unprivileged "
                    f"user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu also "
                    f"kernel.apparmor_restrict_unprivileged_userns=0). To run with this weaker sandbox "
                    f"anyway, set the reward option allow_weak_sandbox: true. See docs/sandbox.md."
                )
            log.warning("code sandbox running WEAKER isolation (allow_weak_sandbox=true). Missing: %s", missing)

    def run(
        self,
        files: dict[str, str | bytes],
        args: list[str],
        stdin: str | bytes = b"",
        fd_inputs: tuple[bytes, ...] = (),
        limits: Limits = Limits(),
    ) -> RunResult:
        """Run `python <PYTHON_FLAGS> *args` in a fresh sandbox whose workdir holds `files`.

        `stdin` is the program's standard input; `fd_inputs[i]` is readable on descriptor 3 + i."""
        return _run(self.python, self.isolation, files, args, stdin, fd_inputs, limits)


def _run(python, isolation, files, args, stdin, fd_inputs, limits) -> RunResult:
    uid = _uid_pool.acquire() if isolation.drop_uid else None
    workdir = tempfile.mkdtemp(prefix="tether-sandbox-")
    try:
        for name, content in files.items():
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
            os.chmod(os.path.join(workdir, name), 0o444)
        if uid is not None and not isolation.namespaces:  # else the program gets a tmpfs copy instead
            os.chown(workdir, uid, uid)
        stdin = stdin.encode() if isinstance(stdin, str) else stdin
        return _launch(python, isolation, workdir, uid, args, stdin, fd_inputs, limits)
    except OSError as error:
        return RunResult("sandbox_error", "", f"sandbox: {error}", None, 0.0)
    finally:
        _remove_tree(workdir)
        if uid is not None:
            _uid_pool.release(uid)


def _launch(python, isolation, workdir, uid, args, stdin, fd_inputs, limits) -> RunResult:
    start = time.monotonic()
    # Every pipe is ours: (read end, write end); the child's ends are closed here once it has them.
    stdin_pipe, stdout_pipe, stderr_pipe, status_pipe = os.pipe(), os.pipe(), os.pipe(), os.pipe()
    input_pipes = [os.pipe() for _ in fd_inputs]
    spec = {
        "parent_pid": os.getpid(),
        "status_fd": status_pipe[1],
        "input_fds": [read for read, _ in input_pipes],
        "namespaces": isolation.namespaces,
        "user_namespace": isolation.user_namespace,
        "uid": uid,
        "gid": uid,
        "workdir": workdir,
        "expose": _interpreter_dirs(python),
        "tmpfs_mb": int(limits.tmpfs_mb),
        "argv": [python, *PYTHON_FLAGS, *args],
        "env": _program_env(workdir),
        "limits": {
            "cpu_seconds": _cpu_seconds(limits),
            "memory_bytes": int(limits.memory_mb * 2**20),
            "max_processes": int(limits.max_processes),
            "max_file_bytes": int(limits.max_file_mb * 2**20),
            "max_open_files": int(limits.max_open_files),
        },
    }
    child_ends = [stdin_pipe[0], stdout_pipe[1], stderr_pipe[1], status_pipe[1], *spec["input_fds"]]
    pipes = _Pipes(
        writes={stdin_pipe[1]: stdin, **{write: data for (_, write), data in zip(input_pipes, fd_inputs)}},
        reads={"stdout": stdout_pipe[0], "stderr": stderr_pipe[0], "status": status_pipe[0]},
        caps={"stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes, "status": STATUS_MAX_BYTES},
    )
    try:
        process = subprocess.Popen(
            [python, "-I", "-S", os.path.abspath(__file__), json.dumps(spec)],
            stdin=stdin_pipe[0], stdout=stdout_pipe[1], stderr=stderr_pipe[1],
            pass_fds=[status_pipe[1], *spec["input_fds"]], start_new_session=True,
            cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    except OSError:
        pipes.close()
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    try:
        finished = pipes.pump(deadline=start + limits.timeout + STARTUP_GRACE_S)
    finally:
        # Kill before reaping: until `wait` the boot process is at least a zombie, so its process
        # group id cannot have been reused by anyone else. Killing init ends its pid namespace.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        process.wait()
        pipes.close()
    return _classify(pipes, finished, limits, time.monotonic() - start)


def _cpu_seconds(limits: Limits) -> int:
    """RLIMIT_CPU soft limit: the time limit rounded up, plus one second of slack."""
    return math.ceil(limits.timeout) + 1


def _classify(pipes: _Pipes, finished: bool, limits: Limits, elapsed: float) -> RunResult:
    """Turn what came back into a RunResult. Only init's status pipe says how the program ended."""
    stdout = pipes.out["stdout"].decode("utf-8", errors="replace")
    stderr = pipes.out["stderr"].decode("utf-8", errors="replace")
    messages = []
    for line in pipes.out["status"].decode(errors="replace").splitlines():
        try:
            messages.append(json.loads(line))
        except ValueError:
            pass
    errors = [m["error"] for m in messages if "error" in m]
    ends = [m for m in messages if "wait_status" in m]
    result = RunResult("sandbox_error", stdout, stderr, None, elapsed)

    if pipes.overflow:
        return replace(result, status="output_limit")
    if errors:
        return replace(result, stderr=f"sandbox: {errors[0]}\n{stderr}")
    if not ends:  # killed at the deadline (or the tree died without a word)
        return replace(result, status="sandbox_error" if finished else "timeout")
    wait_status, cpu = ends[-1]["wait_status"], ends[-1]["cpu"]
    result = replace(result, cpu_time=cpu)
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        out_of_cpu = sig in (signal.SIGXCPU, signal.SIGKILL) and cpu >= _cpu_seconds(limits) - 0.05
        return replace(result, status="timeout" if out_of_cpu else "crash", returncode=-sig)
    code = os.WEXITSTATUS(wait_status)
    if code == 0:
        return replace(result, status="ok", returncode=0)
    # Said by the program itself, so only a label for statistics, never a judgement.
    last_line = stderr.strip().rsplit("\n", 1)[-1]
    return replace(result, status="memory" if last_line.startswith("MemoryError") else "crash", returncode=code)


# ---------------------------------------------------------------------------------------------
# Probe, once per process


_PROBE_PROGRAM = """\
import errno, json, os, socket
s = socket.socket()
try:
    s.connect(("127.0.0.1", 9))
    network = "open"
except OSError as error:
    network = errno.errorcode.get(error.errno, str(error.errno))
print(json.dumps({"uid": os.getuid(), "network": network}))
"""

_probe_cache: dict[str, Isolation] = {}
_probe_lock = threading.Lock()


def _candidates() -> list[Isolation]:
    """Configurations to try, strongest first."""
    if sys.platform != "linux":
        return [Isolation(False, False, False)]
    if os.geteuid() == 0:
        return [Isolation(True, False, True), Isolation(False, False, True), Isolation(False, False, False)]
    return [Isolation(True, True, False), Isolation(False, False, False)]


def probe(python: str = sys.executable) -> Isolation:
    """The strongest isolation this machine allows, tried end to end with a tiny program (cached)."""
    python = os.path.realpath(python)
    with _probe_lock:
        if python in _probe_cache:
            return _probe_cache[python]
        failures = []
        chosen = Isolation(False, False, False)
        for candidate in _candidates():
            outcome = _try(python, candidate)
            if outcome is None:
                chosen = candidate
                break
            failures.append(outcome)
        isolation = Isolation(chosen.namespaces, chosen.user_namespace, chosen.drop_uid, " | ".join(failures))
        _probe_cache[python] = isolation
        return isolation


def _try(python: str, candidate: Isolation) -> str | None:
    """None when `candidate` works end to end, else why not."""
    try:
        result = _run(python, candidate, {"probe.py": _PROBE_PROGRAM}, ["probe.py"], b"", (), Limits(timeout=10.0))
    except (OSError, SandboxUnavailable) as error:
        return f"{_describe(candidate)}: {error}"
    lines = result.stderr.strip().splitlines()
    why = lines[0] if result.status == "sandbox_error" and lines else (lines or [result.status])[-1]
    if result.status != "ok":
        return f"{_describe(candidate)}: {why}"
    try:
        network = json.loads(result.stdout)["network"]
    except (ValueError, KeyError, TypeError):
        return f"{_describe(candidate)}: unexpected probe output {result.stdout[:200]!r}"
    if candidate.namespaces and network != "ENETUNREACH":
        return f"{_describe(candidate)}: network still reachable ({network})"
    return None


def _describe(isolation: Isolation) -> str:
    parts = ["namespaces" if isolation.namespaces else "no namespaces"]
    if isolation.user_namespace:
        parts.append("user namespace")
    if isolation.drop_uid:
        parts.append("own uid")
    return "+".join(parts)


_default_sandbox: Sandbox | None = None


def run_program(
    source: str, stdin: str | bytes = "", limits: Limits = Limits(), *, sandbox: Sandbox | None = None
) -> RunResult:
    """Run Python `source` once with `stdin`, fully isolated (raises SandboxUnavailable if that is
    impossible here; pass a `Sandbox(allow_weak=True)` to accept less)."""
    global _default_sandbox
    if sandbox is None:
        if _default_sandbox is None:
            _default_sandbox = Sandbox()
        sandbox = _default_sandbox
    return sandbox.run({"solution.py": source}, ["solution.py"], stdin=stdin, limits=limits)
