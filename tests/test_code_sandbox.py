"""The `code` reward and its sandbox: hostile programs get no reward and leave the trainer alone.

Every test runs real programs in the real sandbox (Linux; as root in CI, where it is fully
isolated). After each test the `trainer` fixture checks the trainer side: this process and a
sibling process are alive, no process of any sandbox uid is left, and no workdir is left behind.
Time limits are kept short (0.5 s) so the whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tether.rewards import sandbox as sandbox_module
from tether.rewards.code import CodeTest, CodeTestsError, extract_code, make_code_reward, run_test, validate_tests
from tether.rewards.sandbox import Isolation, Limits, Sandbox, SandboxUnavailable, run_program, sandbox_processes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux namespaces")

SHORT = 0.5  # seconds: the time limit of tests that are meant to run out of time
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
GOOD_ADD = "def add(a, b):\n    return a + b\n"
SUM_CASES = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]


@pytest.fixture(scope="module")
def reward():
    isolation = sandbox_module.probe()
    if not isolation.strict:  # CI runs as root, where it always is; see test_full_isolation_is_available_here
        pytest.skip(f"full isolation unavailable here: {isolation.detail}")
    return make_code_reward(timeout=2.0, max_workers=4)


@pytest.fixture(scope="module")
def sandbox(reward):
    return reward.sandbox


@pytest.fixture(autouse=True)
def trainer(tmp_path, monkeypatch):
    """Stands for the trainer: a secret in its environment, a sibling process, a private tempdir.
    Afterwards: all alive, nothing of the sandbox left running or on disk."""
    monkeypatch.setenv("TETHER_TEST_SECRET", "canary-" + secrets.token_hex(8))
    workdirs = tmp_path / "sandbox-workdirs"
    workdirs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(workdirs))
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        yield
        assert sibling.poll() is None, "a program killed a process of the trainer's user"
        assert os.getpgid(0) == os.getpgid(sibling.pid)
        assert sandbox_processes() == [], "a process of a sandbox uid outlived its run"
        assert list(workdirs.iterdir()) == [], "a sandbox workdir was left behind"
    finally:
        sibling.kill()
        sibling.wait()


def test_full_isolation_is_available_here():
    isolation = sandbox_module.probe()
    if os.geteuid() != 0 and not isolation.strict:
        pytest.skip(f"no user namespaces for non-root here: {isolation.detail}")
    assert isolation.strict and isolation.namespaces, isolation


# ---------------------------------------------------------------------------------------------
# Honest programs


def test_correct_program_scores_one(reward):
    io_program = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"
    assert_program = f"Here:\n```python\n{GOOD_ADD}```"
    assert reward(["p", "p"], [io_program, assert_program], tests=[SUM_CASES, ADD_TESTS]) == [1.0, 1.0]
    assert reward.last_stats["passed"] == 5 and reward.last_stats["tests"] == 5


def test_partially_correct_program_scores_the_fraction_or_zero_in_all_mode(reward):
    wrong_on_negatives = "def add(a, b):\n    return abs(a) + abs(b)\n"
    assert reward(["p"], [wrong_on_negatives], tests=[ADD_TESTS]) == [pytest.approx(2 / 3)]
    assert reward.last_stats["passed"] == 2 and reward.last_stats["failed"] == 1
    strict = make_code_reward(mode="all", max_workers=1)
    failing_first = ["assert add(-1, 1) == 0", *ADD_TESTS[:2]]
    assert strict(["p"], [wrong_on_negatives], tests=[failing_first]) == [0.0]
    assert strict.last_stats["failed"] == 1 and strict.last_stats["passed"] + strict.last_stats["skipped"] == 2


def test_stdin_stdout_compare_modes(reward):
    spaced = "print('3  ')\nprint()"
    assert reward(["p"], [spaced], tests=[[{"input": "", "output": "3\n"}]]) == [1.0]
    exact = make_code_reward(compare="exact", max_workers=1)
    assert exact(["p"], [spaced], tests=[[{"input": "", "output": "3\n"}]]) == [0.0]
    assert exact(["p"], ["print(3)"], tests=[[{"input": "", "output": "3\n"}]]) == [1.0]


def test_printing_only_a_prefix_of_the_expected_output_fails(reward):
    expected = "1\n2\n3\n"
    assert reward(["p"], ["print(1)\nprint(2)"], tests=[[{"input": "", "output": expected}]]) == [0.0]
    assert reward(["p"], ["print('1\\n2\\n3')"], tests=[[{"input": "", "output": expected}]]) == [1.0]


def test_assert_tests_see_builtin_exceptions_and_humaneval_entry_point(reward):
    raises = "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n"
    test = "assert root(4) == 2.0\ntry:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    assert False"
    humaneval = "def check(candidate):\n    assert candidate(9) == 3.0\n"
    assert reward(["p", "p"], [raises, raises], tests=[test, humaneval], entry_point=["root", "root"]) == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Time, processes, memory, output


def test_infinite_loop_times_out(reward):
    start = time.monotonic()
    rewards = reward(["p"], ["while True:\n    pass"], tests=[[{"input": "", "output": "x", "timeout": SHORT}]])
    assert rewards == [0.0] and reward.last_stats["timeout"] == 1
    assert time.monotonic() - start < SHORT + sandbox_module.STARTUP_GRACE_S + 1.0


def test_sleeping_past_the_time_limit_times_out(reward):
    program = "import time\ntime.sleep(30)\ndef add(a, b):\n    return a + b\n"
    rewards = reward(["p"], [program], tests=[[{"code": ADD_TESTS[0], "timeout": SHORT}]])
    assert rewards == [0.0] and reward.last_stats["timeout"] == 1


@pytest.mark.parametrize(
    "program",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        # leaves the process group and keeps forking: only the pid namespace (or the uid sweep) ends it
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            time.sleep(0.01)\n",
    ],
    ids=["bare", "ignoring-errors", "setsid"],
)
def test_fork_bomb_is_contained_and_cleaned_up(reward, program):
    rewards = reward(["p"], [program], tests=[[{"input": "", "output": "x", "timeout": SHORT}]])
    assert rewards == [0.0] and reward.last_stats["passed"] == 0
    assert sandbox_processes() == []  # nothing of it survives its run


def test_allocating_10_gb_is_a_memory_failure(reward):
    program = "x = bytearray(10 * 1024 ** 3)\nprint('allocated')"
    rewards = reward(["p"], [program], tests=[[{"input": "", "output": "allocated"}]])
    assert rewards == [0.0] and reward.last_stats["memory"] == 1


def test_endless_output_is_cut_off(sandbox):
    limits = Limits(timeout=SHORT, max_output_bytes=10_000)
    result = run_program("while True:\n    print('y' * 1000)", limits=limits, sandbox=sandbox)
    assert result.status == "output_limit" and len(result.stdout) <= 10_000


# ---------------------------------------------------------------------------------------------
# Network, files, environment, other processes


def test_no_connection_reaches_a_listener_of_the_trainer(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = (
        "import socket\ns = socket.socket()\ns.settimeout(3)\n"
        f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
        "except OSError as error:\n    print('refused:', error)\n"
    )
    try:
        result = run_program(program, limits=Limits(timeout=2.0), sandbox=sandbox)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert "connected" not in result.stdout and "Network is unreachable" in result.stdout


def test_outside_address_is_unreachable_at_once(sandbox):
    # 192.0.2.1 is TEST-NET-1; it is only ever dialled from inside the sandbox's empty network namespace.
    program = (
        "import socket, time\nstart = time.monotonic()\ns = socket.socket()\ns.settimeout(5)\n"
        "try:\n    s.connect(('192.0.2.1', 80))\n    print('connected')\n"
        "except OSError as error:\n    print(error, round(time.monotonic() - start, 2))\n"
    )
    result = run_program(program, limits=Limits(timeout=6.0), sandbox=sandbox)
    message, seconds = result.stdout.rsplit(" ", 1)
    assert "Network is unreachable" in message and float(seconds) < 0.5


def test_writes_outside_the_workdir_never_land(reward, tmp_path):
    target = tmp_path / "outside"  # under /tmp
    target.mkdir()
    shared = Path(tempfile.mkdtemp(prefix=".sandbox-write-probe-", dir=Path(__file__).parent))  # not under /tmp
    for folder in (target, shared):
        folder.chmod(0o777)  # writable for anyone: only the sandbox can stop the write
    paths = [target / "pwned", shared / "pwned", Path("/usr/pwned"), Path("/pwned")]
    program = (
        f"for path in {[str(p) for p in paths]!r}:\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as error:\n        print('no', path, error.strerror)\n"
        "def add(a, b):\n    return a + b\n"
    )
    try:
        result = run_program(program, limits=Limits(timeout=2.0), sandbox=reward.sandbox)
        assert not any(path.exists() for path in paths) and "wrote" not in result.stdout
        assert "no /usr/pwned Read-only file system" in result.stdout
        assert reward(["p"], [program], tests=[ADD_TESTS]) == [1.0]  # side effects change nothing
    finally:
        for leftover in shared.iterdir():
            leftover.unlink()
        shared.rmdir()


def test_project_files_and_home_folders_are_invisible(sandbox):
    program = (
        "import os\n"
        f"for path in [{__file__!r}, {str(Path(__file__).parent)!r}, '/home', '/var', '/run', '/mnt']:\n"
        "    print(path, os.path.exists(path))\n"
        "print(*sorted(os.listdir('/')))\n"
    )
    result = run_program(program, limits=Limits(timeout=2.0), sandbox=sandbox)
    *checks, top_level = result.stdout.splitlines()
    assert result.status == "ok" and all(line.endswith(" False") for line in checks), result.stdout
    interpreter_top = Path(os.path.realpath(sys.executable)).parts[1]
    assert set(top_level.split()) <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "sys",
                                      "proc", "tmp", interpreter_top}


_DEV_PROGRAM = """\
import json, os, stat
nodes = []
for top, dirs, files in os.walk("/dev"):
    for name in dirs + files:
        mode = os.lstat(os.path.join(top, name)).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            nodes.append(os.path.join(top, name))
ptys = []
try:
    while len(ptys) < 100:
        ptys.append(os.openpty())
except OSError:
    pass
mounts = {line.split()[4]: line.split()[5].split(",") for line in open("/proc/self/mountinfo")}
open("/dev/null", "w").write("x")
print(json.dumps({"nodes": sorted(nodes), "ptys": len(ptys), "first": os.ttyname(ptys[0][1]) if ptys else None,
                  "mounts": mounts, "random": len(os.urandom(8)) + len(open("/dev/urandom", "rb").read(8))}))
"""


def test_dev_is_fresh_with_a_private_pty_pool_and_everything_else_nodev(sandbox):
    """Issue 19.2: the host's /dev was bound whole (read-only, not nodev): /dev/ptmx handed out the
    host's ptys (~2,000 per run), /dev/nvidia* and /dev/dri/* would have been reachable."""
    result = sandbox.run({"dev.py": _DEV_PROGRAM}, ["dev.py"], limits=Limits(timeout=10))
    assert result.status == "ok", result.stderr
    seen = json.loads(result.stdout)
    devices = ["/dev/" + name for name in sandbox_module.DEVICES]
    assert seen["nodes"] == sorted([*devices, "/dev/pts/ptmx"])  # no host node: no tty, disk, GPU, kmsg
    assert seen["ptys"] == sandbox_module.MAX_PTYS and seen["first"] == "/dev/pts/0"  # a private devpts
    assert seen["random"] == 16
    may_open_devices = {*devices, "/dev/pts"}
    assert all("nodev" in options for point, options in seen["mounts"].items() if point not in may_open_devices)
    assert all("ro" in seen["mounts"][point] for point in devices)


_KEYRING_PROGRAM = """\
import ctypes, errno, json, sys
libc = ctypes.CDLL(None, use_errno=True)
call = lambda name, *args: libc.syscall(ctypes.c_long(NUMBERS[name]), *(ctypes.c_long(a) for a in args))
KEY_SPEC_USER_KEYRING, KEYCTL_READ = -4, 11
if sys.argv[1] == "add":
    key = call("add_key", ctypes.addressof(ctypes.create_string_buffer(b"user")),
               ctypes.addressof(ctypes.create_string_buffer(b"tether-probe")),
               ctypes.addressof(ctypes.create_string_buffer(b"secret-1234")), 11, KEY_SPEC_USER_KEYRING)
    print(json.dumps({"key": key, "errno": errno.errorcode.get(ctypes.get_errno())}))
else:
    key = call("request_key", ctypes.addressof(ctypes.create_string_buffer(b"user")),
               ctypes.addressof(ctypes.create_string_buffer(b"tether-probe")), 0, 0)
    buffer = ctypes.create_string_buffer(64)
    size = call("keyctl", KEYCTL_READ, key, ctypes.addressof(buffer), 64, 0) if key > 0 else -1
    print(json.dumps({"key": key, "read": buffer.raw[:max(size, 0)].decode(errors="replace")}))
"""


def _numbers():
    machine = os.uname().machine
    if machine not in sandbox_module.SYSCALL_NUMBERS:
        pytest.skip(f"no seccomp table for {machine}")
    return sandbox_module.SYSCALL_NUMBERS[machine][1]


def test_keyring_data_does_not_persist_from_one_run_to_the_next(sandbox):
    """Issue 19.3: add_key(KEY_SPEC_USER_KEYRING) in one run was read back by the next (same uid)."""
    files = {"keys.py": f"NUMBERS = {_numbers()!r}\n{_KEYRING_PROGRAM}"}
    added = sandbox.run(files, ["keys.py", "add"], limits=Limits(timeout=10))
    read = sandbox.run(files, ["keys.py", "read"], limits=Limits(timeout=10))
    assert added.status == read.status == "ok", added.stderr + read.stderr
    assert json.loads(added.stdout) == {"key": -1, "errno": "EPERM"}
    assert json.loads(read.stdout) == {"key": -1, "read": ""}


_SYSCALLS_PROGRAM = """\
import ctypes, errno, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(number, *args):
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in (*args, 0, 0, 0, 0, 0)[:5]))
    return errno.errorcode.get(ctypes.get_errno(), "?") if result == -1 else result
seen = {name: call(number) for name, number in NUMBERS.items() if name in DENIED}
child = call(NUMBERS["clone"], 0x10000000 | 17)  # CLONE_NEWUSER | SIGCHLD
if child == 0:
    os._exit(0)
seen["clone(CLONE_NEWUSER)"] = child
seen["clone3"] = call(NUMBERS["clone3"])
ran = []
thread = threading.Thread(target=ran.append, args=(1,))
thread.start()
thread.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
echoed = subprocess.run(["echo", "hi"], capture_output=True).stdout.decode()
print(json.dumps({"seen": seen, "works": [ran, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), echoed]}))
"""


def test_the_seccomp_deny_list_refuses_kernel_attack_surface_and_keeps_ordinary_programs_working(sandbox):
    numbers = _numbers()
    denied = [name for name in sandbox_module.SECCOMP_DENIED if name in numbers]
    files = {"calls.py": f"NUMBERS = {numbers!r}\nDENIED = {denied!r}\n{_SYSCALLS_PROGRAM}"}
    result = sandbox.run(files, ["calls.py"], limits=Limits(timeout=10))
    assert result.status == "ok", result.stderr
    report = json.loads(result.stdout)
    expected = {name: "EPERM" for name in denied} | {"clone(CLONE_NEWUSER)": "EPERM", "clone3": "ENOSYS"}
    assert report["seen"] == expected
    assert report["works"] == [[1], 7, "hi\n"]  # threads (clone3 -> clone), fork, exec still work
    assert {"keyctl", "bpf", "perf_event_open", "userfaultfd", "mount", "ptrace", "kexec_load", "init_module",
            "finit_module", "unshare"} <= set(denied)


def test_os_system_through_subclasses_cannot_touch_the_host(reward):
    marker_file = Path(f"/tmp/xyz_outside_{secrets.token_hex(4)}")
    program = (
        "wrap = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
        f"wrap.__init__.__globals__['system']('touch {marker_file}')\n"
        "def add(a, b):\n    return a + b\n"
    )
    assert reward(["p"], [program], tests=[ADD_TESTS]) == [1.0]  # the program is right; its attack is void
    assert not marker_file.exists()


def test_the_trainers_environment_is_not_visible(reward, sandbox):
    secret = os.environ["TETHER_TEST_SECRET"]
    program = (
        "import os\nprint(dict(os.environ))\n"
        "try:\n    print(open('/proc/%d/environ' % os.getppid()).read())\nexcept OSError as e:\n    print(e)\n"
    )
    result = run_program(program, limits=Limits(timeout=2.0), sandbox=sandbox)
    assert result.status == "ok" and secret not in result.stdout and "TETHER_TEST_SECRET" not in result.stdout
    program = "import os\nprint(os.environ.get('TETHER_TEST_SECRET'))"
    rewards = reward(["p"], [program], tests=[[{"input": "", "output": secret}]])
    assert rewards == [0.0]


@pytest.mark.parametrize(
    "attack",
    ["os.kill(os.getppid(), 9)", "os.killpg(0, 9)", "os.kill(-1, 9)", "os.killpg(os.getpgid(os.getppid()), 9)"],
)
def test_killing_the_parent_or_everything_hurts_only_the_program(reward, attack):
    program = f"import os\ntry:\n    {attack}\nexcept OSError:\n    pass\nprint(3)\n"
    assert reward(["p"], [program], tests=[[{"input": "", "output": "4"}]]) == [0.0]
    assert os.getpid() > 0  # still here; the fixture checks the sibling process


# ---------------------------------------------------------------------------------------------
# Attacks on the judge


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n",
        "import os\nos._exit(0)\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        "print('OK')\nimport sys\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
    ],
    ids=["sys-exit-at-import", "os-exit-at-import", "os-exit-in-call", "sys-exit-in-call", "fake-ok"],
)
def test_exiting_before_the_asserts_scores_zero(reward, program):
    assert reward(["p"], [program], tests=[ADD_TESTS]) == [0.0]


def test_an_always_equal_result_scores_zero(reward):
    program = (
        "class AlwaysEqual(int):\n    def __eq__(self, other):\n        return True\n"
        "    __ne__ = lambda s, o: False\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return AlwaysEqual(0)\n"
    )
    reflected = "class A:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return A()\n"
    assert reward(["p", "p"], [program, reflected], tests=[ADD_TESTS, ["assert 3 == add(1, 2)"]]) == [0.0, 0.0]


def test_shadowing_builtins_or_raising_stopiteration_does_not_pass(reward):
    shadow = "def abs(x):\n    return 0\ndef all(*args):\n    return True\ndef f(x):\n    return 99\n"
    stop = "def is_even(x):\n    raise StopIteration\n"
    tests = ["assert abs(f(1) - 0.5) < 1e-9", "assert all(f(x) == x for x in [1, 2])"]
    assert reward(["p", "p"], [shadow, stop], tests=[tests, ["assert all(map(is_even, [2, 4]))"]]) == [0.0, 0.0]


def test_frame_gc_and_proc_tampering_finds_no_marker(reward):
    program = (
        "import gc, os, re, sys\n"
        "found = set()\n"
        "for obj in gc.get_objects():\n"
        "    for value in (obj.values() if isinstance(obj, dict) else [obj]):\n"
        "        if isinstance(value, str):\n"
        "            found.update(re.findall(r'\\b[0-9a-f]{32}\\b', value))\n"
        "frame = sys._getframe()\n"
        "while frame:\n"
        "    frame.f_globals['passed'] = True\n"
        "    frame = frame.f_back\n"
        "for path in ['/proc/%d/%s' % (os.getppid(), name) for name in ('environ', 'mem', 'fd/1', 'fd/3')]:\n"
        "    try:\n        open(path, 'w').write(' '.join(found) + '\\n')\n"
        "    except OSError:\n        pass\n"
        "for marker in found:\n    print(marker)\n"
        "def add(a, b):\n    return None\n"
    )
    assert reward(["p"], [program], tests=[ADD_TESTS]) == [0.0]


NAN = "def f(x):\n    return float('nan')\n"


@pytest.mark.parametrize(
    "program, tests",
    [
        (NAN, ["assert not f(1) > 3", "assert not f(2) < 0"]),  # every comparison with NaN is False
        (NAN, ["assert f(1) != 2.5"]),
        ("def f(x):\n    return [1.0, float('nan')]\n", ["assert not f(1) == [1.0, 2.0]"]),
        ("def f(x):\n    return {'a': complex(0, float('nan'))}\n", ["assert f(1) != {'a': 1j}"]),
    ],
    ids=["negated-asserts", "not-equal", "nested-in-list", "complex-in-dict"],
)
def test_a_nan_result_fails_the_test(reward, program, tests):
    """Issue 19.4: a NaN crossing from the solution fails the test (was 1.0 for all four)."""
    assert reward(["p"], [program], tests=[tests]) == [0.0]
    assert reward.last_stats["failed"] == len(tests)


def test_a_nan_result_passes_where_the_test_expects_nan(reward):
    tests = ["import math\nassert math.isnan(f(1))", "assert str(f(2)) == str(float('nan'))"]
    io = [{"input": "", "output": "nan\n"}]  # stdin/stdout: NaN is text, compared as text
    assert reward(["p", "p"], [NAN, "print(float('nan'))"], tests=[tests, io]) == [1.0, 1.0]
    assert reward(["p"], ["print(float('nan'))"], tests=[[{"input": "", "output": "3\n"}]]) == [0.0]


def test_the_solution_never_sees_the_test_code(sandbox):
    program = (
        "import os, glob\n"
        "print(sorted(os.listdir('.')))\n"
        "def add(a, b):\n    return a + b\n"
    )
    test = CodeTest("assert", code="assert add(40, 2) == 42  # secret-expected")
    outcome, result = run_test(sandbox, program, test, Limits())
    assert outcome == "passed" and "secret-expected" not in result.stderr and "['solution.py']" in result.stderr


# ---------------------------------------------------------------------------------------------
# Throughput


def test_64_programs_through_the_pool_finish_and_leave_nothing(reward):
    programs = ["import sys\nprint(int(sys.stdin.read()) * 2)"] * 60 + ["while True:\n    pass"] * 4
    tests = [[{"input": str(i), "output": str(2 * i), "timeout": SHORT}] for i in range(64)]
    start = time.monotonic()
    rewards = reward(["p"] * 64, programs, tests=tests)
    assert rewards == [1.0] * 60 + [0.0] * 4
    assert reward.last_stats["passed"] == 60 and reward.last_stats["timeout"] == 4
    assert time.monotonic() - start < 30.0


# ---------------------------------------------------------------------------------------------
# Data validation


def test_null_expected_output_is_a_data_error_naming_row_and_field(reward):
    with pytest.raises(CodeTestsError, match=r"train\.jsonl, row 7, field 'tests\[1\]\.output'.*null"):
        validate_tests([{"input": "1", "output": "1"}, {"input": "2", "output": None}], source="train.jsonl", row=7)
    with pytest.raises(CodeTestsError, match=r"row 1, field 'tests\[0\]\.output'"):
        reward(["p", "p"], ["print(1)", "print(1)"], tests=[SUM_CASES, [{"input": "1", "output": None}]])


@pytest.mark.parametrize(
    ("tests", "field", "words"),
    [
        (None, "tests", "missing"),
        ([], "tests", "non-empty"),
        ([{"input": "1", "ouptut": "1"}], "tests[0]", "unknown key"),
        ([{"input": 1, "output": "1"}], "tests[0].input", "string"),
        (["assert f(1) == "], "tests[0].code", "does not compile"),
        ([{"input": "", "output": "1", "timeout": -1}], "tests[0].timeout", "positive"),
        ({"inputs": ["1"], "outputs": []}, "tests", "same length"),
        (42, "tests", "non-empty list"),
    ],
)
def test_malformed_tests_are_data_errors(tests, field, words):
    with pytest.raises(CodeTestsError, match=words) as error:
        validate_tests(tests, source="data.jsonl", row=3)
    assert f"data.jsonl, row 3, field '{field}'" in str(error.value)


def test_accepted_test_formats():
    apps = validate_tests('{"inputs": ["1\\n"], "outputs": ["2\\n"]}', source="d", row=0, time_limit=3)
    assert apps == [CodeTest("io", input="1\n", output="2\n", timeout=3.0)]
    tests = ["assert f(1) == 2", {"code": "assert f(2) == 3", "timeout": 1}, {"output": "x"}]
    mixed = validate_tests(tests, source="d", row=0)
    assert [t.kind for t in mixed] == ["assert", "assert", "io"] and mixed[1].timeout == 1.0 and mixed[2].input == ""
    assert validate_tests("assert f(1) == 2", source="d", row=0) == [CodeTest("assert", code="assert f(1) == 2")]
    with pytest.raises(CodeTestsError, match="field 'time_limit'"):
        validate_tests(["assert True"], source="d", row=0, time_limit="fast")


def test_reward_without_a_tests_column_is_an_error(reward):
    with pytest.raises(CodeTestsError, match="'tests'"):
        reward(["p"], ["print(1)"])


def test_extract_code_takes_the_last_python_block():
    assert extract_code("plan\n```python\nx = 1\n```\nfinal\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_code("```py\nprint(1)") == "print(1)"  # cut off by the length limit
    assert extract_code("print(3)") == "print(3)"


# ---------------------------------------------------------------------------------------------
# Where isolation is impossible


def test_weaker_isolation_is_refused_unless_accepted(monkeypatch, caplog):
    weak = Isolation(namespaces=False, user_namespace=False, drop_uid=False, detail="unshare: EPERM")
    monkeypatch.setitem(sandbox_module._probe_cache, os.path.realpath(sys.executable), weak)
    with pytest.raises(SandboxUnavailable, match="allow_weak_sandbox") as error:
        make_code_reward()
    assert "network isolation" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="tether.rewards.sandbox"):
        accepted = Sandbox(allow_weak=True)
    assert accepted.isolation == weak and "WEAKER isolation" in caplog.text and "network isolation" in caplog.text

