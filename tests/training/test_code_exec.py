"""The code scorer runs generated code only in a subprocess, with a timeout and no network."""

from __future__ import annotations

import os
import socket
import time

from training.code_exec import codeio_check, run_python

GEN = "def generate_inputs(rng: Random) -> dict:\n    return {'a': rng.randint(0, 9), 'b': rng.random()}\n"
REF = "def main_solution(a, b):\n    return {'sum': a + b, 'items': [a, b]}\n"


def test_code_runs_in_another_process_and_leaves_this_one_alone():
    marker = "HMOE_EXEC_MARKER"
    res = run_python(f"import os\nos.environ['{marker}'] = '1'\nprint(os.getpid())")
    assert res.ok and int(res.stdout) != os.getpid()
    assert marker not in os.environ


def test_an_endless_loop_times_out():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", timeout_s=1.0)
    assert not res.ok and res.error == "timeout"
    assert time.monotonic() - t0 < 5


def test_the_child_cannot_open_a_connection():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    res = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert not res.ok and "network" in res.error
    try:
        server.accept()
        arrived = True
    except socket.timeout:
        arrived = False
    finally:
        server.close()
    assert not arrived


def test_exit_codes_and_errors_are_reported():
    assert not run_python("import sys; sys.exit(3)").ok
    res = run_python("raise ValueError('boom')")
    assert not res.ok and res.error == "ValueError: boom"


def test_codeio_check_compares_outputs_with_float_tolerance():
    same = "def main_solution(a, b):\n    return {'items': [a, b + 1e-12], 'sum': a + b}\n"
    assert codeio_check(REF, same, GEN).ok
    wrong = "def main_solution(a, b):\n    return {'sum': a - b, 'items': [a, b]}\n"
    res = codeio_check(REF, wrong, GEN)
    assert not res.ok and res.error == "mismatch on input 0"
    crash = codeio_check(REF, "def main_solution(a, b):\n    raise KeyError('x')\n", GEN)
    assert not crash.ok and "KeyError" in crash.error


def test_a_broken_reference_is_named_so_the_item_can_be_skipped():
    res = codeio_check("def main_solution(a, b):\n    return 1 / 0\n", REF, GEN)
    assert not res.ok and res.error.startswith("reference raised ZeroDivisionError")


def test_code_scores_separate_answers_cut_off_by_the_token_budget():
    from training.task_scores import code_scores

    items = [{"key": f"stdlib:{i}", "family": "stdlib", "answer": "",
              "messages": [{"role": "user", "content": "def f(x):\n    \"\"\"Twice x.\"\"\""}]} for i in range(4)]
    texts = ["    return 2 * x", "    y = x +", "    return x +", "    return x * 2"]
    s = code_scores(items, texts, finished=[True, True, False, True])
    assert s["parse_rate"] == 0.5 and s["finished_rate"] == 0.75
    assert abs(s["parse_rate_finished"] - 2 / 3) < 1e-9
    assert "finished_rate" not in code_scores(items, texts)
