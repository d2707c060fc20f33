"""pass@k against the combinatorial definition; majority vote and maj@k tie rules."""

import math

import pytest

from tether.eval import maj_at_k, majority_vote, pass_at_k
from tether.eval.metrics import mean_pass_at_k, pass_at_1_mean


def pass_at_k_by_counting(n, c, k):
    """Chen et al. 2021, eq. 1 as written: 1 - C(n - c, k) / C(n, k) (math.comb is 0 when k > n - c)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_combinatorial_value_on_all_small_cases():
    checked = 0
    for n in range(1, 13):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_counting(n, c, k), abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 13))


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 0, 5, 0.0),  # nothing correct
        (10, 10, 1, 1.0),  # everything correct
        (10, 3, 10, 1.0),  # k = n: any correct sample passes
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_stable_for_large_n():
    """C(1000, 100) overflows a float; the product form does not. pass@1 must still be c/n."""
    assert pass_at_k(1000, 7, 1) == pytest.approx(0.007)
    assert 0.0 < pass_at_k(1000, 1, 100) == pytest.approx(0.1)  # 1 - (999/1000 ... ) = k/n for c = 1


@pytest.mark.parametrize(
    "n, c, k, message",
    [
        (5, 2, 6, "1 <= k <= n, got k=6, n=5"),
        (5, 2, 0, "1 <= k <= n, got k=0, n=5"),
        (5, 6, 1, "0 <= c <= n, got c=6, n=5"),
        (5, -1, 1, "0 <= c <= n, got c=-1, n=5"),
        (0, 0, 1, "n >= 1 samples, got n=0"),
    ],
)
def test_pass_at_k_errors(n, c, k, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match="k must be an integer, got 1.5"):
        pass_at_k(4, 1, 1.5)


def test_means():
    assert mean_pass_at_k([(4, 1), (4, 4)], k=1) == pytest.approx((0.25 + 1.0) / 2)
    assert pass_at_1_mean([True, False, False, True]) == 0.5
    assert pass_at_1_mean([[1, 1], [1, 0, 0, 0]]) == pytest.approx((1.0 + 0.25) / 2)  # problems weigh equally


@pytest.mark.parametrize(
    "answers, expected",
    [
        (["3", "4", "4", "3", "5"], "3"),  # tie 2-2: "3" appeared first
        (["4", "3", "3", "4"], "4"),
        (["5", "4", "4"], "4"),  # a clear majority beats first appearance
        ([None, None, "7"], "7"),  # None never wins, even when most frequent
        ([None, None], None),
        ([], None),
    ],
)
def test_majority_vote_ties(answers, expected):
    assert majority_vote(answers) == expected


def test_majority_vote_with_key_groups_equivalent_answers():
    answers = ["0.5", "1/2", "2", "2"]
    as_number = {"0.5": 0.5, "1/2": 0.5, "2": 2.0}.get
    assert majority_vote(answers, key=as_number) == "0.5"  # 2-2 tie; the 0.5 group came first


def test_maj_at_k():
    answers = ["1", "2", "2", "3", "3", "3"]
    assert maj_at_k(answers, "2", k=3) == 1.0  # first three: 2 wins
    assert maj_at_k(answers, "2", k=5) == 1.0  # 2-2 tie between "2" and "3": "2" came first
    assert maj_at_k(answers, "3") == 1.0  # all six
    assert maj_at_k(answers, lambda answer: int(answer) > 2) == 1.0  # a checker instead of a value
    assert maj_at_k([None, None], "1") == 0.0
    with pytest.raises(ValueError, match=r"1 <= k <= len\(answers\) = 6, got k=7"):
        maj_at_k(answers, "1", k=7)
