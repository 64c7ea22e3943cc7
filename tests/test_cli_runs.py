"""RunPool (tests/cli_runs.py): a run that resumes from another waits for it, and never loses that dependency."""

import threading

import pytest
from cli_runs import RunPool


def test_a_run_waits_for_the_run_it_resumes_from():
    pool, order, parent_may_finish = RunPool(), [], threading.Event()

    def parent():
        parent_may_finish.wait(timeout=30)
        order.append("parent")
        return "parent"

    def child():
        order.append("child")
        return "child"

    try:
        pool.submit("parent", parent)
        pool.submit("child", child, after="parent")
        parent_may_finish.set()
        assert pool.result("child") == "child"
        assert order == ["parent", "child"]
    finally:
        pool.close()


def test_an_unknown_after_is_an_error_not_a_run_without_its_parent():
    pool, started = RunPool(), []
    try:
        with pytest.raises(KeyError, match="'child' resumes from 'parent'"):
            pool.submit("child", lambda: started.append("child"), after="parent")
        with pytest.raises(KeyError, match="'child' was not started"):
            pool.result("child")
        assert started == []
    finally:
        pool.close()


def test_a_wanted_run_whose_parent_is_not_wanted_is_an_error():
    pool = RunPool(wanted={"child"})
    try:
        pool.submit("parent", lambda: "parent")  # not wanted: not started
        with pytest.raises(KeyError, match="resumes from 'parent'"):
            pool.submit("child", lambda: "child", after="parent")
    finally:
        pool.close()
