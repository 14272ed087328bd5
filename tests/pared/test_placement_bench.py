"""The placement benchmark's own logic (pared.workloads.placement): the bandwidth trace of the
closed-loop adaptation run and the episode-by-episode alternation of its arms."""
from __future__ import annotations

from pared.workloads.placement import ADAPT_MBIT, ADAPT_TRACE, closed_loop, trace_mbit


def test_trace_follows_the_schedule_and_cycles():
    period = sum(n for _, n in ADAPT_TRACE)
    expected = [m for m, n in ADAPT_TRACE for _ in range(n)]
    assert [trace_mbit(i) for i in range(period)] == expected
    assert [trace_mbit(period + i) for i in range(period)] == expected
    assert trace_mbit(0, [(5, 1), (7, 2)]) == 5 and trace_mbit(2, [(5, 1), (7, 2)]) == 7
    # the artifact is planned over the whole range the trace visits
    assert min(ADAPT_MBIT) <= min(m for m, _ in ADAPT_TRACE) and max(ADAPT_MBIT) >= 400


class _Cam:
    closed = False

    def close(self):
        self.closed = True


class _Tasks:
    TASK_NAMES = ["reach", "push", "door"]


class _Workload:
    task_names = ["push", "reach"]
    episodes = 2

    def __init__(self):
        self.cam = _Cam()
        self._envs = {0: (None, self.cam)}

    def tasks_module(self):
        return _Tasks


def test_closed_loop_alternates_the_arms_episode_by_episode_in_rotating_order():
    wl = _Workload()
    order = []

    def step(arm, tid, ep):
        order.append((arm, tid, ep))
        return {"arm": arm, "tid": tid, "ep": ep}
    out = closed_loop(wl, ["a", "b", "c"], step)
    # every arm runs every (task, episode) once, the three one after another, the first arm rotating
    assert order == [("a", 1, 0), ("b", 1, 0), ("c", 1, 0),
                     ("b", 1, 1), ("c", 1, 1), ("a", 1, 1),
                     ("c", 0, 0), ("a", 0, 0), ("b", 0, 0),
                     ("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]
    assert list(out["b"]) == ["push", "reach"]
    assert [e["ep"] for e in out["b"]["reach"]] == [0, 1] and all(e["arm"] == "b" for e in out["b"]["reach"])
    assert wl.cam.closed and wl._envs == {}        # the simulators' cameras are released


def test_a_cases_latency_is_its_parts_and_the_link():
    from pared.ir.target import Link
    from pared.workloads.placement import case_s
    t = {"main.whole": 0.010, "main.k3_first": 0.002, "main.k3_second": 0.004}
    link = Link("x", bandwidth=1e6, rtt=0.002)            # 1 MB/s, 1 ms each way
    assert case_s(t, "first", 0, 100, link, 4.0) == 0.040                     # on the edge, 4x slower
    assert abs(case_s(t, "second", 5000, 1000, link, 4.0) - (0.010 + 0.006 + 0.002)) < 1e-12
    assert abs(case_s(t, "k3", 2000, 1000, link, 4.0) - (0.008 + 0.004 + 0.003 + 0.002)) < 1e-12
