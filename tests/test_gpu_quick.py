"""make gpu-quick's planning (tools/gpu_quick.py), with an injected runner and clock: the
parts run in order within the budget, one that would overrun is skipped and says so, a
failed build stops the rest, and without a GPU the command says so and exits 2."""
import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
import gpu_quick  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(budget, durations, outcomes=None, skip=()):
    """Run the default parts with each taking durations[name] seconds of the fake clock."""
    clock, calls, said = FakeClock(), [], []
    outcomes = outcomes or {}

    def runner(argv, allowed):
        name = next(p.name for p in gpu_quick.default_parts() if p.argv(allowed) == list(argv))
        calls.append((name, allowed, list(argv)))
        clock.now += durations.get(name, 0)
        return outcomes.get(name, "ok")

    rows = gpu_quick.run_parts(gpu_quick.default_parts(), budget, skip, runner, clock,
                               said.append)
    return rows, calls, said


def test_every_part_runs_in_order_and_the_evidence_takes_the_rest():
    rows, calls, said = _run(450, {"build": 100, "smoke": 40, "kernels": 20, "tune": 100})
    assert [r[0] for r in rows] == ["build", "smoke", "kernels", "tune", "evidence", "report"]
    assert all(r[1] == "ok" for r in rows)
    allowed = {name: a for name, a, _ in calls}
    assert allowed["build"] == 150 * 1.5 and allowed["tune"] == 180
    assert allowed["evidence"] == 450 - 260 - 20  # the rest, the report's share kept
    evidence = calls[4][2]
    assert evidence[evidence.index("--budget-s") + 1] == "170"
    assert any("=== tune: ok in 100 s (260 s elapsed)" == line for line in said)


def test_a_part_that_would_overrun_is_skipped_and_says_so():
    rows, calls, _ = _run(300, {"build": 200})
    outcome = dict((r[0], r[1]) for r in rows)
    assert outcome["smoke"] == "ok" and outcome["kernels"] == "ok"  # 60 + 40 of 100 left
    assert outcome["tune"].startswith("skipped (needs 120 s, 100 s left)")
    assert outcome["evidence"] == "ok" and outcome["report"] == "ok"
    assert [c[0] for c in calls] == ["build", "smoke", "kernels", "evidence", "report"]


def test_a_failed_build_stops_everything_after_it():
    rows, calls, _ = _run(450, {}, {"build": "failed (exit 1)"})
    assert [c[0] for c in calls] == ["build"]
    assert all(r[1] == "skipped (build failed)" for r in rows[1:])


def test_a_failed_part_does_not_stop_the_evidence():
    rows, calls, _ = _run(450, {}, {"smoke": "failed (exit 1)"}, skip=("tune",))
    assert [c[0] for c in calls] == ["build", "smoke", "kernels", "evidence", "report"]
    assert dict((r[0], r[1]) for r in rows)["tune"] == "skipped (--skip)"


def test_without_a_gpu_it_says_so_and_exits_2(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_quick.main([]) == 2
    assert capsys.readouterr().out.strip().startswith("gpu-quick: no GPU here")
    assert gpu_quick.main(["--dry-run"]) == 0
    assert "evidence: 60 s planned (the rest of the budget)" in capsys.readouterr().out
