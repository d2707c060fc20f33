"""The `math` reward: final-answer extraction, equivalence via math-verify, the hard per-item time limit."""

import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tether.rewards import RewardSet, RewardSetupError, get_reward
from tether.data.loading import DataError
from tether.rewards.math import costly_answer, extract_answer, make_math_reward

# (completion, reference answer, expected score)
CASES = [
    # equivalent forms
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", "1/2", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "0.5", 1.0),
    (r"\boxed{50\%}", "0.5", 1.0),
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    (r"\boxed{3.0}", "3", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{x = 2}", "2", 1.0),
    (r"the total is \boxed{1,000}", "1000", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1.0),
    # negative numbers and fractions
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{-\frac{2}{3}}", "-2/3", 1.0),
    ("the result is \u22125", "-5", 1.0),  # U+2212 minus sign, last-number fallback
    # wrong answers
    (r"\boxed{7}", "8", 0.0),
    (r"\boxed{0.74}", "0.75", 0.0),
    (r"\boxed{0.3333}", r"\frac{1}{3}", 0.0),  # math-verify rounds to 6 places
    # only the final answer counts
    (r"First 12, then 15, so \boxed{18}", "18", 1.0),
    (r"First 12, then 15, so \boxed{18}", "12", 0.0),
    (r"\boxed{5} wait, no: \boxed{6}", "5", 0.0),
    (r"\boxed{5} wait, no: \boxed{6}", "6", 1.0),
    ("3 apples and 4 pears make 7", "7", 1.0),
    ("7 at first, but actually 9", "7", 0.0),
    (r"\boxed{4} then \boxed{5", "4", 1.0),  # the last *complete* box
    # nested braces
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0),
    # answer tag
    ("<think>3 + 4 = 7, or 8?</think>\n<answer>7</answer>", "7", 1.0),
    ("<think>maybe 7</think><answer>8</answer>", "7", 0.0),
    (r"<answer>\boxed{7}</answer>", "7", 1.0),
    ("<answer>The answer is $42$.</answer>", "42", 1.0),
    # missing answer
    ("I do not know.", "7", 0.0),
    ("", "7", 0.0),
    # reference answer forms: GSM8K `####`, $...$, \boxed
    (r"\boxed{72}", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),
    (r"\boxed{1/3}", r"$\frac{1}{3}$", 1.0),
    (r"\boxed{1/3}", r"\boxed{\frac{1}{3}}", 1.0),
    # chat-format completion (TRL conversational datasets)
    ([{"role": "assistant", "content": r"\boxed{4}"}], "4", 1.0),
]


@pytest.fixture(scope="module")
def math_reward():
    reward = get_reward("math", timeout=5.0)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def case_scores(math_reward):
    """All cases in one batch: one round-trip to the worker."""
    return math_reward(["q"] * len(CASES), [c for c, _, _ in CASES], answer=[a for _, a, _ in CASES])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c)[:40] for c, _, _ in CASES])
def test_math_cases(case_scores, index):
    completion, answer, expected = CASES[index]
    assert case_scores[index] == expected, (completion, answer)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        (r"a \boxed{1} b \boxed{\frac{a}{b^{2}}} c", "boxed", r"\frac{a}{b^{2}}"),
        (r"\boxed{\{1,2\}}", "boxed", r"\{1,2\}"),
        (r"\fbox{9}", "boxed", "9"),
        (r"\boxed 5", "boxed", "5"),
        ("no box 3", "boxed", None),
        (r"\boxed{unclosed", "boxed", None),
        ("<answer> 12 </answer>", "answer_tag", "12"),
        ("<answer>1</answer> <answer>2</answer>", "answer_tag", "2"),
        ("<answer>open", "answer_tag", None),
        ("x=3, y=1,234.5 and 7/8.", "last_number", "7/8"),
        ("totals: 1,234,567", "last_number", "1234567"),
        ("no digits", "last_number", None),
        (r"<answer>4</answer> \boxed{5}", "auto", "4"),  # the answer tag wins in auto
        (r"\boxed{5} and then 6", "auto", "5"),  # a box beats a later bare number
        ("just 6.", "auto", "6"),
    ],
)
def test_extract_answer(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_extract_answer_unknown_mode():
    with pytest.raises(ValueError, match="extract mode must be one of"):
        extract_answer("x", "boxd")


def test_missing_answer_column_is_a_clear_error(math_reward):
    with pytest.raises(RewardSetupError) as error:
        math_reward(["q"], [r"\boxed{1}"], solution=["1"])
    assert str(error.value) == (
        "the math reward needs a 'answer' column with the reference answers; this batch has columns: "
        "['solution']. Add it to the dataset or set answer_column."
    )


def test_missing_reference_is_none_not_zero(math_reward):
    assert math_reward(["q", "q"], [r"\boxed{1}", r"\boxed{1}"], answer=[None, "1"]) == [None, 1.0]


# (8+1)^{(8+1)^9} has ~3.7 * 10^8 digits: math-verify's comparison runs for minutes. It passes the cheap
# pre-checks (`costly_answer` reads only literal powers such as 9^{9^9}), so only the time limits stop it.
SLOW = r"\boxed{(8+1)^{(8+1)^{9}}}"
TIMEOUT = 1.0
SLACK = 4.0  # killing a worker and starting a fresh one for the remaining items (~0.5 s idle)


@pytest.fixture(scope="module")
def fast_timeout_reward():
    reward = get_reward("math", timeout=TIMEOUT)
    assert reward(["q"], [r"\boxed{1}"], answer=["1"]) == [1.0]  # start the worker outside the timing
    yield reward
    reward.close()


def test_pathological_answer_hits_the_time_limit(fast_timeout_reward):
    """One slow item is None (a timeout), and the items after it are still judged correctly."""
    start = time.monotonic()
    scores = fast_timeout_reward(["q"] * 3, [SLOW, r"\boxed{3}", r"\boxed{4}"], answer=["3", "3", "3"])
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + SLACK
    assert scores == [None, 1.0, 0.0]
    assert fast_timeout_reward.stats["timeouts"] >= 1


def test_time_limit_holds_in_a_worker_thread(fast_timeout_reward):
    """math-verify's own timeouts use signals (main thread only); the worker process does not."""
    timeouts_before = fast_timeout_reward.stats["timeouts"]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        scores = pool.submit(fast_timeout_reward, ["q"], [SLOW], answer=["3"]).result()
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert scores == [None]
    assert fast_timeout_reward.stats["timeouts"] == timeouts_before + 1
    assert fast_timeout_reward(["q"], [r"\boxed{2}"], answer=["2"]) == [1.0]  # recovers


def test_none_from_math_makes_the_weighted_total_none(math_reward):
    """A row math cannot judge (no reference) has no total; the other rows are weighted sums."""
    rewards = RewardSet([math_reward, {"name": "format", "weight": 0.5}])
    completions = ["<think>a</think><answer>3</answer>", "<think>a</think><answer>3</answer>", "3"]
    result = rewards(["q"] * 3, completions, answer=[None, "3", "4"])
    assert result.per_function == {"math": [None, 1.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert result.total == [None, 1.5, 0.0]
    assert result.none_count == {"math": 1, "format": 0}
    assert result.metrics()["rewards/math/bad_reference"] >= 1


# ---------------------------------------------------------------------------------------------
# Reference answers are checked when the data loads (issue 19.5)


@pytest.mark.parametrize(
    "columns, words",
    [
        ({"prompt": "q"}, "missing; the math reward reads the reference answer"),
        ({"answer": None}, "missing or null"),
        ({"answer": ""}, "empty"),
        ({"answer": "  "}, "empty"),
        ({"answer": "Solve it.\n#### "}, "empty"),
        ({"answer": float("nan")}, "nan is not a finite number"),
        ({"answer": float("inf")}, "inf is not a finite number"),
        ({"answer": "-Infinity"}, "'-Infinity' is not a finite number"),
        ({"answer": "NaN"}, "'NaN' is not a finite number"),
        ({"answer": r"\boxed{nan}"}, "'nan' is not a finite number"),
    ],
)
def test_check_rows_refuses_a_bad_reference_naming_file_row_and_field(math_reward, columns, words):
    good = {"answer": "3"}
    with pytest.raises(DataError) as error:
        math_reward.check_rows("train.jsonl", [(0, good), (5, columns), (6, good)])
    assert str(error.value).startswith("train.jsonl, row 5, field 'answer': ") and words in str(error.value)


def test_check_rows_through_the_reward_set_and_a_renamed_column():
    rewards = RewardSet([{"name": "math", "answer_column": "solution"}])
    accepted = [(0, {"solution": r"(-\infty, 3]"}), (1, {"solution": r"\infty"}), (2, {"solution": 7})]
    rewards.check_rows("d.jsonl", accepted)  # LaTeX infinity written on purpose is a real answer
    with pytest.raises(DataError, match=r"d.jsonl, row 1, field 'solution': missing; "):
        rewards.check_rows("d.jsonl", [(0, {"solution": "1"}), (1, {"answer": "1"})])
    rewards.close()


def test_a_nan_or_infinite_reference_scores_none_not_one(math_reward):
    """Before the fix JSON NaN matched \\boxed{nan} and Infinity matched \\boxed{\\infty}, both 1.0."""
    completions = [r"\boxed{nan}", r"\boxed{\infty}", r"\boxed{-\infty}", r"\boxed{\infty}"]
    answers = [float("nan"), float("inf"), "-inf", r"\infty"]
    assert math_reward(["q"] * 4, completions, answer=answers) == [None, None, None, 1.0]


# ---------------------------------------------------------------------------------------------
# Adversarial answers: refused unread, or verified in parallel within a bound for the whole batch (issue 19.6)

TOWERS = [r"\boxed{%d^{%d^{%d^%d}}}" % (a, a, a, a) for a in range(2, 8)]  # the six of the issue: 48 s before


@pytest.mark.parametrize(
    "answer, why",
    [
        (r"5^{5^{5^5}}", "an exponent tower taller than 2"),
        ("5^5^5^5", "an exponent tower taller than 2"),
        (r"9^{9^9}", "a power of more than 100000 digits"),
        (r"10^{10^{10}}", "a power of more than 100000 digits"),
        ("7" * 1001, "more than 1000 digits"),
        ("x+" * 1001, "longer than 2000 characters"),
        ("(" * 13 + "1" + ")" * 13, "nested deeper than 12 brackets"),
        (r"e^{x^2}", None),
        (r"2^{2^n}", None),
        (r"2^{100}", None),
        ("x^2 + y^2 + z^2", None),
        (r"\frac{\sqrt{2}}{2}", None),
        (r"(-\infty, 3] \cup \{5\}", None),
        ("7" * 1000, None),
    ],
)
def test_costly_answer_refuses_only_the_absurd(answer, why):
    assert costly_answer(answer) == why


def test_absurd_answers_are_refused_before_math_verify(math_reward):
    """Six power towers took 48 s in one batch (8 s each, one after another): now 0.0 at once, unread."""
    refused_before = math_reward.stats["refused"]
    hundred_k_digits = r"\boxed{" + "7" * 100_000 + "}"
    start = time.monotonic()
    scores = math_reward(["q"] * 8, [*TOWERS, hundred_k_digits, r"\boxed{3}"], answer=["3"] * 7 + ["7" * 100_000])
    assert time.monotonic() - start < 1.0
    assert scores == [0.0] * 6 + [0.0, None]  # the 100k-digit reference is refused too (see check_rows)
    assert math_reward.stats["refused"] == refused_before + 7


def test_a_batch_of_slow_answers_ends_within_timeout_times_batches_per_worker():
    """n slow answers on w workers: at most TIMEOUT * ceil(n / w) (plus killing/starting slack), where one
    worker took (TIMEOUT + restart) * n. Right answers ahead of the slow ones are still judged."""
    reward = get_reward("math", timeout=TIMEOUT, workers=2)
    assert reward(["q"] * 2, [r"\boxed{1}", "2"], answer=["1", "1"]) == [1.0, 0.0]  # both workers started
    # 7^(7^9) and up: over 1 s on a quiet CPU too (5^(5^9) verifies within 1 s when the machine is idle)
    slow = [r"\boxed{(%d+1)^{(%d+1)^{9}}}" % (a, a) for a in range(6, 12)]
    completions = [r"\boxed{3}", r"\boxed{4}", *slow]
    start = time.monotonic()
    scores = reward(["q"] * 8, completions, answer=["3"] * 8)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT * math.ceil(8 / 2) + 1.0, elapsed
    assert scores == [1.0, 0.0] + [None] * 6
    assert reward.stats["timeouts"] == 6
    reward.close()


def test_the_pool_is_sized_to_the_cores_and_reused_across_calls():
    reward = make_math_reward()
    assert reward.pool.size == len(os.sched_getaffinity(0))
    reward(["q"] * 4, [r"\boxed{%d}" % i for i in range(4)], answer=["1"] * 4)
    pids = reward.pool.pids()
    assert reward(["q"] * 4, [r"\boxed{%d}" % i for i in range(4)], answer=["2"] * 4) == [0.0, 0.0, 1.0, 0.0]
    assert reward.pool.pids() == pids and len(pids) == min(4, reward.pool.size)
    template = reward.pool._template.process.pid
    reward.close()
    assert reward.pool.pids() == []
    assert [pid for pid in [template, *pids] if os.path.exists(f"/proc/{pid}")] == []  # not even a zombie


ORPHAN_PROGRAM = r"""
import os, signal, sys, threading, time
from tether.rewards.math import make_math_reward
reward = make_math_reward(timeout=60.0, workers=2)
assert reward(["q"] * 2, [r"\boxed{1}", "2"], answer=["1", "1"]) == [1.0, 0.0]
pids = [reward.pool._template.process.pid, *reward.pool.pids()]
threading.Thread(target=reward, args=(["q"], [sys.argv[1]]), kwargs={"answer": ["3"]}, daemon=True).start()
time.sleep(1.0)  # a worker is now deep in (8+1)^{(8+1)^9}
print(*pids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the trainer dies without cleaning up
"""


def test_a_killed_trainer_leaves_no_math_process_behind():
    """The template sees its socket close, SIGKILLs its workers (also one stuck in C arithmetic), exits."""
    child = subprocess.run([sys.executable, "-c", ORPHAN_PROGRAM, SLOW], capture_output=True, text=True, timeout=120)
    pids = [int(pid) for pid in child.stdout.split()]
    assert len(pids) == 3, child.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (its parent reaps it)
    except OSError:
        return False
