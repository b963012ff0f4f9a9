"""bench/paired.py's arithmetic: the sign test and the table a paired C=1 comparison prints."""

import math

from bench.paired import PairedRun, paired_table, sign_test_p
from bench.request import RequestResult


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    assert sign_test_p(5, 10) == 1.0
    assert math.isclose(sign_test_p(0, 10), 2 / 1024) and sign_test_p(10, 10) == sign_test_p(0, 10)
    assert math.isclose(sign_test_p(18, 24), 2 * sum(math.comb(24, k) for k in range(7)) / 2**24)
    assert sign_test_p(0, 1) == 1.0  # one pair can show nothing


def result(tokens: int, e2e: float, ttft: float) -> RequestResult:
    return RequestResult(ttft=ttft, e2e=e2e, output_tokens=tokens)


def test_table_reports_medians_and_the_pairs_first_over_second():
    run = PairedRun(("a", "b"), {
        "a": [result(10, 1.0, 0.1), result(10, 2.0, 0.2), result(10, 0.5, 0.1)],  # 10, 5, 20 tok/s
        "b": [result(10, 2.0, 0.3), result(10, 1.0, 0.3), result(10, 1.0, 0.3)],  # 5, 10, 10 tok/s
    })
    table = paired_table(run)
    assert "| a | 3 | 10.0 | 100.0 | 100.00 |" in table  # TPOT (e2e - ttft) / 9: 0.1, 0.2, 0.0444 s
    assert "| b | 3 | 10.0 | 300.0 | 77.78 |" in table  # 0.189, 0.0778, 0.0778 s
    assert "median 2.000 (range 0.500-2.000); a faster in 2 of 3, sign test p = 1" in table
