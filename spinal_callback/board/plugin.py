"""The SPINAL tab: a TensorBoard plugin, installed with the package through TensorBoard's
``tensorboard_plugins`` entry point (``pyproject.toml``), as the PyTorch profiler's plugin is.

It serves three routes under ``/data/plugin/spinal/``:

- ``index.js``: the tab (``static/index.js``, an ES module with no dependency, no network);
- ``runs``: the runs under the log dir that hold a trace history, with their state;
- ``run?run=<name>``: ``run_view`` of one of them (an unknown name is a 400, never a path).

Runs are found again at most every ``RESCAN_S`` seconds, so a live run that starts after
TensorBoard shows up, and every ``run`` request reads the run's files anew.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from spinal_callback.board.run_view import (
    EVENTS_FILE,
    REFERENCE_FILE,
    TRACES_FILE,
    find_runs,
    run_view,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PLUGIN_NAME = "spinal"
TAB_NAME = "SPINAL"
RESCAN_S = 10.0
"""Seconds between two scans of the log dir for runs."""


class SpinalPlugin(base_plugin.TBPlugin):
    """The SPINAL tab's backend.

    Args:
        context: TensorBoard's ``TBContext``; only its ``logdir`` is read (a ``--logdir_spec``
            of several folders leaves it empty, and the tab then shows nothing).
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = Path(context.logdir) if context.logdir else None
        self._runs: list[str] = []
        self._scanned_at = -float("inf")
        self._views: dict[str, tuple[tuple[float, ...], dict[str, Any]]] = {}

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": _wsgi(self._serve_js),
            "/runs": _wsgi(self._serve_runs),
            "/run": _wsgi(self._serve_run),
        }

    def is_active(self) -> bool:
        return bool(self._known_runs())

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name=TAB_NAME)

    def _known_runs(self, rescan: bool = False) -> list[str]:
        if self._logdir is None:
            return []
        now = time.monotonic()
        if rescan or now - self._scanned_at >= RESCAN_S:
            self._runs = find_runs(self._logdir)
            self._scanned_at = now
        return self._runs

    def _serve_js(self, request: wrappers.Request) -> wrappers.Response:
        script = resources.files("spinal_callback.board").joinpath("static/index.js")
        return http_util.Respond(request, script.read_text(encoding="utf-8"), "text/javascript")

    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        runs = []
        for name in self._known_runs(rescan=True):
            view = self._view(name)
            runs.append({"run": name, "state": view["status"]["state"]})
        return _json(request, {"runs": runs})

    def _serve_run(self, request: wrappers.Request) -> wrappers.Response:
        name = request.args.get("run", "")
        if name not in self._known_runs() and name not in self._known_runs(rescan=True):
            return http_util.Respond(
                request,
                f"no run {name!r} with a trace history under the log dir; ask /runs for them",
                "text/plain",
                code=400,
            )
        return _json(request, self._view(name))

    def _folder(self, name: str) -> Path:
        assert self._logdir is not None
        return self._logdir / name

    def _view(self, name: str) -> dict[str, Any]:
        """``run_view`` of a run, read again only when one of its files changed (the tab asks
        every few seconds, and a long run's trace history is large)."""
        folder = self._folder(name)
        stamp = tuple(
            value
            for file in (TRACES_FILE, EVENTS_FILE, REFERENCE_FILE)
            for value in _stamp(folder / file)
        )
        cached = self._views.get(name)
        if cached is not None:
            events = Path(cached[1]["event_log"])
            if cached[0] == (*stamp, *_stamp(events)):
                return cached[1]
        view = run_view(folder, name)
        self._views[name] = ((*stamp, *_stamp(Path(view["event_log"]))), view)
        return view


def _stamp(path: Path) -> tuple[float, float]:
    """A file's modification time and size, or zeros when it is missing."""
    try:
        status = path.stat()
    except OSError:
        return (0.0, 0.0)
    return (status.st_mtime, float(status.st_size))


def _wsgi(handler: Callable[[wrappers.Request], wrappers.Response]) -> WSGIApplication:
    """A WSGI application that answers with ``handler``'s response to the request."""

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return handler(wrappers.Request(environ))(environ, start_response)

    return application


def _json(request: wrappers.Request, payload: dict[str, Any]) -> wrappers.Response:
    body = json.dumps(payload, allow_nan=False)
    return http_util.Respond(request, body, "application/json")
