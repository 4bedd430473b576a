"""The SPINAL tab's backend: what it reads of a run folder, and what it serves to TensorBoard.

What a person sees in the browser is in ``tests/test_browser.py``; here, the facts behind it.
"""

from __future__ import annotations

import json
import logging
import math
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from board_runs import RUN_ID, alert, stop_record, synthetic_trace, write_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from werkzeug.test import Client

from spinal_callback.board.plugin import SpinalPlugin
from spinal_callback.board.run_view import find_runs, run_view
from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.outputs.tensorboard import (
    ALERTS_FRAGMENT,
    TAB_FRAGMENT,
    TraceBoard,
    custom_scalar_layout,
    views_hint,
)

# ---- finding runs ----------------------------------------------------------------------------


def test_runs_are_the_folders_with_a_trace_history_at_any_depth_below_the_log_dir(
    tmp_path: Path,
) -> None:
    write_run(tmp_path / "a" / "spinal")
    write_run(tmp_path / "b" / "2026" / "spinal")
    write_run(tmp_path / ".hidden" / "spinal")
    (tmp_path / "c").mkdir()
    assert find_runs(tmp_path) == ["a/spinal", "b/2026/spinal"]
    assert find_runs(tmp_path / "a" / "spinal") == ["."]
    assert find_runs(tmp_path / "missing") == []


# ---- the status line -------------------------------------------------------------------------


def test_a_stopped_run_says_where_why_and_where_to_resume_from(tmp_path: Path) -> None:
    cause = alert(40, "critical", "language_drift")
    stop = stop_record(40, cause, "/ckpt/checkpoint-20", 20)
    view = run_view(write_run(tmp_path, alerts=(alert(30, "warning", "trace_departure"), cause),
                              records=(stop,)))  # fmt: skip
    status = view["status"]
    assert status["state"] == "stopped"
    assert status["headline"] == "Stopped at step 40 by critical language_drift"
    assert (status["step"], status["rule"], status["level"]) == (40, "language_drift", "critical")
    assert (status["checkpoint"], status["checkpoint_step"]) == ("/ckpt/checkpoint-20", 20)
    assert status["detail"].startswith("Resume from /ckpt/checkpoint-20 (step 20)")
    assert [a["rule"] for a in view["alerts"]] == ["trace_departure", "language_drift"]


def test_a_stop_record_of_an_earlier_release_without_details_names_the_worst_alert(
    tmp_path: Path,
) -> None:
    cause = alert(20, "critical", "non_finite")
    old_stop = Alert(20, "critical", "training_stopped", "spinal/stop", math.nan, math.nan, "x")
    status = run_view(write_run(tmp_path, alerts=(cause,), records=(old_stop,)))["status"]
    assert status["headline"] == "Stopped at step 20 by critical non_finite"


def test_a_run_with_warnings_shows_its_worst_level_and_first_step_of_it(tmp_path: Path) -> None:
    alerts = (alert(10, "info", "probe_failed"), alert(20, "warning", "trace_departure"),
              alert(30, "warning", "language_drift"))  # fmt: skip
    status = run_view(write_run(tmp_path, alerts=alerts))["status"]
    assert status["state"] == "warning"
    assert status["headline"] == "Warning at step 20 by trace_departure"
    assert status["detail"] == "2 warning alerts; 5 probes up to step 40"


def test_a_quiet_run_is_healthy_and_says_how_far_it_was_watched(tmp_path: Path) -> None:
    status = run_view(write_run(tmp_path, alerts=(alert(10, "info", "probe_failed"),)))["status"]
    assert status["state"] == "healthy"
    assert status["headline"] == "Healthy: no warning"
    assert status["detail"] == "5 probes up to step 40; 1 info note"


def test_recoveries_are_listed_and_counted_in_the_status(tmp_path: Path) -> None:
    recovered = Alert(30, "warning", "recovered", "spinal/recoveries", 1.0, 3.0, "rewound",
                      details={"rewound_to": 10, "steps_lost": 20, "learning_rate": 1e-5,
                               "cause": "critical language_drift", "attempt": 1})  # fmt: skip
    view = run_view(write_run(tmp_path, records=(recovered,)))
    assert view["recoveries"] == [{"step": 30, "message": "rewound", "rewound_to": 10,
                                   "steps_lost": 20, "learning_rate": 1e-5,
                                   "cause": "critical language_drift", "attempt": 1}]  # fmt: skip
    assert "recovered 1 time (last at step 30)" in view["status"]["detail"]
    assert view["alerts"] == []


# ---- the scores ------------------------------------------------------------------------------


def test_every_block_score_is_the_logged_value_and_the_reference_sits_beside_it(
    tmp_path: Path,
) -> None:
    view = run_view(write_run(tmp_path, steps=(0, 10, 20)))
    assert view["blocks"] == [f"L{i}" for i in range(20, 30)]
    assert view["steps"] == [0, 10, 20]
    logged = [synthetic_trace(step, list(range(20, 30)), shift=step / 100) for step in (0, 10, 20)]
    for block in range(10):
        assert view["contraction"][block] == [t.contraction[block].item() for t in logged]
    for block in range(9):
        assert view["transport"][block] == [t.transport[block].item() for t in logged]
    assert view["transport"][9] is None  # the deepest block has no next block
    reference = synthetic_trace(0, list(range(20, 30)))
    assert view["reference"]["contraction"] == reference.contraction.tolist()
    assert view["reference"]["transport"] == [*reference.transport.tolist(), None]


def test_a_torn_last_line_of_a_live_run_is_skipped(tmp_path: Path) -> None:
    write_run(tmp_path, steps=(0, 10))
    with open(tmp_path / "spinal_traces.jsonl", "a", encoding="utf-8") as file:
        file.write('{"run": "run-under-test", "segment": 0, "trace": {"step": 2')
    with open(tmp_path / "spinal_events.jsonl", "a", encoding="utf-8") as file:
        file.write('{"step": 20, "lev')
    view = run_view(tmp_path)
    assert view["steps"] == [0, 10]
    assert view["status"]["state"] == "healthy"


def test_an_event_log_elsewhere_is_read_where_the_reference_file_names_it(tmp_path: Path) -> None:
    cause = alert(20, "critical", "non_finite")
    folder = write_run(
        tmp_path / "run", alerts=(cause,), records=(stop_record(20, cause, None, None),)
    )
    moved = tmp_path / "logs" / "events.jsonl"
    moved.parent.mkdir()
    (folder / "spinal_events.jsonl").rename(moved)
    assert run_view(folder)["status"]["state"] == "healthy"  # no event log beside the traces
    path = folder / "spinal_reference.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "event_log": str(moved)}))
    assert run_view(folder)["status"]["headline"] == "Stopped at step 20 by critical non_finite"


def test_another_runs_reference_file_is_not_drawn(tmp_path: Path) -> None:
    write_run(tmp_path)
    path = tmp_path / "spinal_reference.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "run": "other"}))
    assert run_view(tmp_path)["reference"] is None


def test_traces_before_a_probe_change_leave_the_view(tmp_path: Path) -> None:
    write_run(tmp_path, steps=(0, 10))
    with open(tmp_path / "spinal_traces.jsonl", "a", encoding="utf-8") as file:
        changed = synthetic_trace(20, list(range(20, 30)), probe="other texts")
        line = {"run": RUN_ID, "segment": 0, "trace": changed.to_dict()}
        file.write(json.dumps(line) + "\n")
    assert run_view(tmp_path)["steps"] == [20]


def test_non_finite_values_are_served_as_null(tmp_path: Path) -> None:
    write_run(tmp_path, steps=(0,))
    trace = synthetic_trace(10, list(range(20, 30)))
    trace.contraction[3] = math.nan
    with open(tmp_path / "spinal_traces.jsonl", "a", encoding="utf-8") as file:
        file.write(json.dumps({"run": RUN_ID, "segment": 0, "trace": trace.to_dict()}) + "\n")
    view = run_view(tmp_path)
    assert view["contraction"][3][0] == pytest.approx(2.9)
    assert view["contraction"][3][1] is None
    json.dumps(view, allow_nan=False)


# ---- the neutral-text health -----------------------------------------------------------------


def test_neutral_health_is_the_perplexity_ratio_and_departure_at_each_probe(
    tmp_path: Path,
) -> None:
    neutral = run_view(write_run(tmp_path, steps=(0, 10)))["neutral"]
    assert neutral["shown"] and neutral["reason"] is None
    assert neutral["steps"] == [0, 10]
    assert neutral["perplexity_ratio"] == pytest.approx([1.0, math.exp(0.1)])
    assert neutral["departure"][0] == pytest.approx(0.0)
    assert neutral["departure"][1] > 0


def test_neutral_health_is_hidden_with_its_reason_for_a_model_with_no_language(
    tmp_path: Path,
) -> None:
    neutral = run_view(write_run(tmp_path, neutral_nll=9.5))["neutral"]
    assert not neutral["shown"]
    assert "no better than chance" in neutral["reason"]
    assert "language_drift and trace_departure are off" in neutral["reason"]


def test_neutral_health_is_hidden_with_its_reason_without_neutral_texts(tmp_path: Path) -> None:
    neutral = run_view(write_run(tmp_path, neutral_nll=None))["neutral"]
    assert not neutral["shown"]
    assert "neutral_texts=None" in neutral["reason"]


# ---- the plugin ------------------------------------------------------------------------------


class _Context:
    def __init__(self, logdir: Path | str) -> None:
        self.logdir = str(logdir)


def client(logdir: Path) -> Client:
    plugin = SpinalPlugin(_Context(logdir))  # type: ignore[arg-type]
    from werkzeug.routing import Map, Rule

    apps = plugin.get_plugin_apps()
    urls = Map([Rule(path, endpoint=path) for path in apps])

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        endpoint, _ = urls.bind_to_environ(environ).match()
        return apps[endpoint](environ, start_response)

    return Client(app)


def test_tensorboard_finds_the_tab_through_its_plugin_entry_point() -> None:
    names = {point.name: point.value for point in entry_points(group="tensorboard_plugins")}
    assert names["spinal"] == "spinal_callback.board.plugin:SpinalPlugin"
    plugin = SpinalPlugin(_Context(""))  # type: ignore[arg-type]
    assert plugin.frontend_metadata().tab_name == "SPINAL"
    assert plugin.frontend_metadata().es_module_path == "/index.js"
    assert not plugin.is_active()


def test_the_plugin_serves_the_runs_with_their_state_and_each_runs_view(tmp_path: Path) -> None:
    cause = alert(20, "critical", "non_finite")
    write_run(tmp_path / "stopped", alerts=(cause,), records=(stop_record(20, cause, None, None),))
    write_run(tmp_path / "quiet")
    served = client(tmp_path)
    runs = served.get("/runs").get_json()["runs"]
    assert runs == [{"run": "quiet", "state": "healthy"}, {"run": "stopped", "state": "stopped"}]
    view = served.get("/run?run=stopped").get_json()
    assert view["status"]["headline"] == "Stopped at step 20 by critical non_finite"
    assert SpinalPlugin(_Context(tmp_path)).is_active()  # type: ignore[arg-type]
    script = served.get("/index.js")
    assert script.status_code == 200 and "export async function render" in script.get_data(True)


def test_the_plugin_reads_a_run_again_when_its_files_change(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "live", steps=(0, 10))
    served = client(tmp_path)
    assert served.get("/run?run=live").get_json()["steps"] == [0, 10]
    assert served.get("/run?run=live").get_json()["steps"] == [0, 10]  # unchanged: cached
    with open(folder / "spinal_events.jsonl", "a", encoding="utf-8") as file:
        record = {**alert(10, "warning", "trace_departure").to_dict(), "run": RUN_ID}
        file.write(json.dumps(record) + "\n")
    assert served.get("/run?run=live").get_json()["status"]["state"] == "warning"


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["../etc", "/etc", "missing", "", "quiet/../../x"])
def test_a_run_name_that_is_not_a_listed_run_is_refused(tmp_path: Path, name: str) -> None:
    write_run(tmp_path / "quiet")
    response = client(tmp_path).get("/run", query_string={"run": name})
    assert response.status_code == 400
    assert "ask /runs" in response.get_data(True)


# ---- the standard views ----------------------------------------------------------------------


def test_the_console_hint_names_the_command_and_the_url_fragments() -> None:
    hint = views_hint("/out/runs/spinal", stopped=True)
    assert "`tensorboard --logdir /out/runs`" in hint
    assert f"http://localhost:6006/{TAB_FRAGMENT}" in hint
    assert f"http://localhost:6006/{ALERTS_FRAGMENT}" in hint
    assert "the stop" in hint


def test_the_console_points_to_the_views_at_begin_and_at_a_stop_which_is_charted_as_one_point(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    board = TraceBoard.open(str(tmp_path / "runs" / "spinal"))
    outputs = Outputs(board, owns_board=True)
    with caplog.at_level(logging.WARNING, logger="spinal_callback"):
        outputs.point_to_views()
        outputs.stopped(40, 3)
    outputs.close()
    begin, stop = (record.getMessage() for record in caplog.records)
    assert f"--logdir {tmp_path / 'runs'}`" in begin and TAB_FRAGMENT in begin
    assert "the stop, its cause and the checkpoint" in stop and ALERTS_FRAGMENT in stop
    events = EventAccumulator(str(tmp_path / "runs" / "spinal"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("spinal/stopped")] == [(40, 3.0)]


def test_custom_scalars_leave_out_the_neutral_charts_when_no_rule_reads_them() -> None:
    shown = custom_scalar_layout([4, 5, 6, 7])["SPINAL alerts"]
    hidden = custom_scalar_layout([4, 5, 6, 7], neutral=False)["SPINAL alerts"]
    assert any("perplexity" in title for title in shown)
    assert not any("neutral" in title for title in hidden)
    assert next(iter(hidden)).startswith("stopped:")
