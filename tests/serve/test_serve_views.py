"""The page helpers: the token colour scale, plots that escape what they show, the progress record."""

from __future__ import annotations

import pytest

from lmscope.serve.engine import Engine, Progress
from lmscope.serve.views import act_alpha, act_colour, show_token, svg_frontier, svg_histogram


def test_token_blue_grows_with_the_activation_and_saturates() -> None:
    alphas = [act_alpha(a, 4.0) for a in (-1.0, 0.0, 1.0, 2.0, 4.0, 9.0)]
    assert alphas == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert act_colour(2.0, 4.0) == "rgba(37, 99, 235, 0.5)"
    assert act_alpha(float("nan"), 1.0) == 0.0 and act_alpha(1.0, 0.0) == 0.0


def test_invisible_tokens_are_shown() -> None:
    assert show_token("\n") == "↵" and show_token("\t") == "⇥" and show_token("") == "∅"
    assert show_token(" the") == " the"


def test_plots_escape_names_and_link_each_sae() -> None:
    entry = {"name": "<b>x</b>", "kind": "resid_post", "layer": 3,
             "metrics": {"l0": 50.0, "fvu": 0.2}}  # fmt: skip
    svg = svg_frontier([entry, {**entry, "name": "y", "metrics": {"l0": 100.0, "fvu": 0.1}}], "fvu")
    assert "<b>x</b>" not in svg and "&lt;b&gt;x&lt;/b&gt;" in svg
    assert svg.count("<circle") == 2 + 1  # two SAEs and one legend mark
    assert 'href="/sae/y"' in svg
    assert "no fvu measured" in svg_frontier([{**entry, "metrics": {}}], "fvu")
    hist = svg_histogram([0.0, 1.0, 2.0], [3, 1], xlabel="<i>")
    assert hist.count('class="bar"') == 2 and "<i>" not in hist
    assert "no histogram" in svg_histogram([0.0, 1.0], [1, 2])


def test_progress_counts_steps_and_waiters(tiny_suite) -> None:  # type: ignore[no-untyped-def]
    from lmscope.suite import Suite

    engine = Engine(Suite.open(tiny_suite))
    seen = []
    with engine.task("demo", steps=2) as step:
        step("one")
        seen.append(engine.progress.snapshot())
        step("two")
        seen.append(engine.progress.snapshot())
    assert [(s["busy"], s["task"], s["step"], s["steps"], s["message"]) for s in seen] == [
        (True, "demo", 1, 2, "one"), (True, "demo", 2, 2, "two")]  # fmt: skip
    assert engine.progress.snapshot()["busy"] is False


def test_progress_snapshot_is_idle_at_first() -> None:
    assert Progress().snapshot() == pytest.approx(
        {"busy": False, "task": None, "step": 0, "steps": 0, "message": "idle", "waiting": 0, "elapsed_s": 0.0})  # fmt: skip
