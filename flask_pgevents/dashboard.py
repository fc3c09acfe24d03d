"""The operator's dashboard: an optional blueprint, loaded only when an app asks for it.

:meth:`PGEvents.dashboard_blueprint <flask_pgevents.PGEvents.dashboard_blueprint>`
makes it. One page shows the triggers, the backlog, the live listeners and
the failed events; two forms retry and discard failed events. Every view
first asks the app's ``authorize(request)``; every form posts a CSRF token
kept in Flask's ``session``, and its ``Origin`` (or ``Referer``) must be this
host. Rows are user data: the template shows them through Jinja's
autoescaping, and the Content-Security-Policy allows no script at all.
"""
from __future__ import annotations

import dataclasses
import datetime
import hmac
import json
import secrets
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, g, redirect, render_template, request, session, url_for
from flask.blueprints import BlueprintSetupState
from werkzeug.wrappers import Response as WerkzeugResponse

from .errors import (
    ConfigurationError,
    DatabaseAccessError,
    DatabaseUnavailableError,
    DisabledError,
    MissingAuthorizationError,
)

if TYPE_CHECKING:
    from flask import Request

    from .extension import PGEvents
    from .stats import Stats

#: Who may use the dashboard: called with the request before every view.
Authorize = Callable[["Request"], bool]

#: Where the CSRF token is kept in Flask's session.
CSRF_SESSION_KEY = "_pgevents_csrf"

#: Failed events shown, oldest first; ``flask pgevents failed --limit`` lists more.
FAILED_SHOWN = 50


@dataclasses.dataclass(frozen=True)
class HandlerError:
    """One failing handler (or step) of a failed event."""

    handler: str
    error: str
    traceback: str


@dataclasses.dataclass(frozen=True)
class FailedEventView:
    """A failed event as the dashboard shows it: rows pretty-printed, errors sorted."""

    id: int
    table: str
    op: str
    timestamp: datetime.datetime
    attempt: int
    errors: list[HandlerError]
    old: Optional[str]
    new: Optional[str]


@dataclasses.dataclass(frozen=True)
class DashboardData:
    """Everything the page shows: :meth:`PGEvents.stats`, and the oldest failed events."""

    stats: Stats
    failed: list[FailedEventView]


def create_blueprint(
    pgevents: PGEvents, authorize: Optional[Authorize], *, name: str, url_prefix: Optional[str] = None
) -> Blueprint:
    """The dashboard blueprint over ``pgevents``; see :meth:`PGEvents.dashboard_blueprint`.

    :raises MissingAuthorizationError: if ``authorize`` is missing or cannot be called.
    """
    if authorize is None:
        raise MissingAuthorizationError(
            "The flask-pgevents dashboard needs an 'authorize' callback: it shows every"
            " event's row and can retry and discard events. Pass"
            " 'dashboard_blueprint(authorize=lambda request: ...)', returning True for the"
            " users who may operate it."
        )
    if not callable(authorize):
        raise MissingAuthorizationError(
            f"The dashboard's 'authorize' must be a callable taking the request and returning"
            f" a bool, not {authorize!r}."
        )
    blueprint = Blueprint(name, __name__, template_folder="templates", url_prefix=url_prefix)
    blueprint.record(_require_secret_key)

    @blueprint.before_request
    def guard() -> None:
        if not authorize(request):
            abort(403)
        if request.method == "POST":
            _check_csrf()
        g.pgevents_csp_nonce = secrets.token_urlsafe(16)

    blueprint.after_request(_secure_headers)

    @blueprint.get("/")
    def index() -> tuple[str, int]:
        notices = []
        retried = request.args.get("retried", type=int)
        if retried is not None:
            notices.append(f"{retried} event(s) queued again.")
        discarded = request.args.get("discarded", type=int)
        if discarded is not None:
            notices.append(f"{discarded} event(s) discarded.")
        try:
            data = load_dashboard(pgevents)
        except (DisabledError, DatabaseUnavailableError, DatabaseAccessError) as exc:
            return render_page(None, problem=str(exc), notices=notices), 503
        return render_page(data, notices=notices), 200

    @blueprint.post("/retry")
    def retry() -> WerkzeugResponse:
        if request.form.get("all") == "1":
            count = pgevents.retry_failed(event_ids=None)
        else:
            count = pgevents.retry_failed(event_ids=_event_ids())
        return redirect(url_for(".index", retried=count), 303)

    @blueprint.post("/discard")
    def discard() -> WerkzeugResponse:
        count = pgevents.discard_failed(_event_ids())
        return redirect(url_for(".index", discarded=count), 303)

    return blueprint


def load_dashboard(pgevents: PGEvents) -> DashboardData:
    """Read what the page shows, for the current app."""
    stats = pgevents.stats()
    failed = pgevents.failed_events(limit=FAILED_SHOWN) if stats.installed else []
    return DashboardData(stats, [failed_event_view(row) for row in failed])


def failed_event_view(row: dict[str, Any]) -> FailedEventView:
    """A row of :meth:`PGEvents.failed_events`, ready for the template."""
    return FailedEventView(
        id=row["id"], table=row["table"], op=row["op"], timestamp=row["timestamp"], attempt=row["attempt"],
        errors=[
            HandlerError(handler, str(error.get("error", "")), str(error.get("traceback", "")))
            for handler, error in sorted(row["errors"].items())
        ],
        old=pretty_json(row["old"]), new=pretty_json(row["new"]),
    )


def render_page(data: Optional[DashboardData], *, problem: Optional[str] = None, notices: list[str]) -> str:
    """The page; ``data`` is ``None`` when ``problem`` says why nothing could be read."""
    return render_template(
        "pgevents/dashboard.html", data=data, problem=problem, notices=notices, failed_shown=FAILED_SHOWN,
        csrf_token=csrf_token(), nonce=g.get("pgevents_csp_nonce", ""), format_age=format_age,
    )


def pretty_json(text: Optional[str]) -> Optional[str]:
    """A stored row, indented; its text as stored if it is not JSON."""
    if text is None:
        return None
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def format_age(seconds: Optional[float]) -> str:
    """``4.2 s``, ``3.5 min``, ``2.0 h`` or ``1.5 d``; ``-`` for none."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def csrf_token() -> str:
    """This session's CSRF token, made on first use."""
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def _check_csrf() -> None:
    """Refuse a POST whose token is not this session's, or that comes from another origin."""
    expected = session.get(CSRF_SESSION_KEY)
    sent = request.form.get("csrf_token", "")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(400, "The form's CSRF token is missing or has expired. Reload the dashboard and try again.")
    # Defence in depth: browsers send Origin with every form POST ("null" from
    # sandboxed or privacy-stripped contexts, refused here too).
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if source is not None and urlsplit(source).netloc != request.host:
        abort(400, "The form was posted from another site. Use the dashboard's own buttons.")


def _event_ids() -> list[int]:
    ids = request.form.getlist("event_id", type=int)
    if not ids:
        abort(400, "Name at least one event id.")
    return ids


def _secure_headers(response: Response) -> Response:
    """No caching of event data, no framing, and no script whatever a row holds."""
    nonce = g.get("pgevents_csp_nonce")
    style = f"'nonce-{nonce}'" if nonce else "'none'"
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src {style}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _require_secret_key(state: BlueprintSetupState) -> None:
    if not state.app.secret_key:
        raise ConfigurationError(
            "The flask-pgevents dashboard keeps its CSRF token in Flask's session, which"
            " needs a secret key. Set app.config['SECRET_KEY'] before registering the"
            " dashboard blueprint."
        )
