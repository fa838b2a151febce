"""The portal's ASGI application (Starlette): the look-up form, the look-up
itself and the account page, health, static files.

Security properties held here (README "Customer portal"):
- no enumeration: an unknown account and a wrong phone factor get the same
  page and status (mis_adapter answers both NOT_FOUND alike), and every
  look-up answer takes at least `lookup_min_response_s`;
- attempt limits per client address and per account (limiter.py);
- CSRF: a signed double-submit token on the form (asgi-csrf), SameSite=Strict;
- headers and body bound: security.py; nothing is stored server-side."""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from asgi_csrf import asgi_csrf
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from portal import chart, i18n
from portal.limiter import AttemptLimiter
from portal.security import BodyLimit, SecurityHeaders
from portal.settings import PortalSettings
from portal.upstream import BadInput, NoMatch, Overview, Unavailable, Upstream
from yindian_common import fields
from yindian_common.errors import InvalidField

log = logging.getLogger("portal")

HERE = Path(__file__).parent
FORM_FIELD_MAX = 32  # longer input is malformed whatever it is
PHONE_LAST4_LEN = 4

LOOKUPS = Counter("yindian_portal_lookups", "Portal look-ups by outcome.", ["outcome"])
LOOKUP_SECONDS = Histogram("yindian_portal_lookup_seconds", "Portal look-up response time (padded).",
                           buckets=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0))


def masked_account(account_no: str) -> str:
    """For logs: enough to correlate, not enough to look anyone up."""
    return account_no[:2] + "******" + account_no[-2:] if len(account_no) == 10 else "-"


class Portal:
    def __init__(self, settings: PortalSettings, upstream: Upstream | None = None) -> None:
        self.settings = settings
        self.upstream = upstream or Upstream(settings)
        self.limiter = AttemptLimiter(settings.limit_per_client, settings.limit_per_account,
                                      settings.limit_keys_max)
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))

    # ---- rendering ----
    def page(self, request: Request | None, name: str, lang: str, status: int = 200, **context: Any) -> HTMLResponse:
        t = i18n.MESSAGES[lang]
        other = "en" if lang == "zh" else "zh"
        token = request.scope["csrftoken"]() if request is not None and "csrftoken" in request.scope else ""
        html = self.env.get_template(name).render(t=t, lang=lang, other_lang=other, csrftoken=token, **context)
        return HTMLResponse(html, status_code=status)

    def overview_context(self, o: Overview, lang: str) -> dict[str, Any]:
        t = i18n.MESSAGES[lang]
        bills = []
        for b in o.bills:
            channel = b.channel or ("PREPAID" if b.prepaid_applied_fen and b.status != "UNPAID" else "")
            bills.append({
                "period": i18n.month(b.period, lang), "kwh": f"{b.kwh:,}", "amount": i18n.money(b.amount_fen, lang),
                "late_fee": i18n.money(b.late_fee_due_fen + b.late_fee_paid_fen, lang),
                "status": t["status_" + b.status], "status_class": b.status.lower(),
                "due_date": i18n.date(b.due_date, lang), "paid_date": i18n.date(b.paid_date, lang),
                "channel": t["channel_" + channel] if channel else "—"})
        months = [chart.Month(i18n.month(b.period, lang, short=True), b.kwh, b.amount_fen,
                              f"{i18n.month(b.period, lang)}: {b.kwh:,} kWh, {i18n.money(b.amount_fen, lang)}")
                  for b in reversed(o.bills)]
        svg = chart.consumption_svg(months, title=t["chart_title"], legend_kwh=t["legend_kwh"],
                                    legend_charge=t["legend_charge"]) if months else ""
        last = o.last_payment
        return {
            "o": o, "bills": bills, "chart": Markup(svg),  # noqa: S704 (built from escaped parts)
            "arrears": i18n.money(o.arrears_fen, lang), "late_fee": i18n.money(o.late_fee_fen, lang),
            "prepaid": i18n.money(o.prepaid_fen, lang), "total_due": i18n.money(o.total_due_fen, lang),
            "as_of": i18n.date(o.as_of, lang), "earliest_due": i18n.date(o.earliest_unpaid_due_date, lang),
            "last_payment": (f"{i18n.date(last.date, lang)} · {i18n.money(last.amount_fen, lang)} · "
                             f"{t['channel_' + last.channel] if last.channel else '—'}") if last else "",
        }

    # ---- routes ----
    async def form(self, request: Request) -> Response:
        return self.page(request, "form.html", i18n.lang_of(request.query_params.get("lang")))

    async def lookup(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        started = loop.time()
        form = await request.form(max_files=0, max_fields=8, max_part_size=FORM_FIELD_MAX * 4)
        lang = i18n.lang_of(str(form.get("lang", "")))
        account_no = str(form.get("account_no", "")).strip()[:FORM_FIELD_MAX + 1]
        phone_last4 = str(form.get("phone_last4", "")).strip()[:FORM_FIELD_MAX + 1]
        client = request.client.host if request.client else "unknown"
        outcome, response = await self.decide(request, lang, client, account_no, phone_last4)
        # Pad every answer to the same minimum time: found, not found, limited or unavailable.
        await asyncio.sleep(max(0.0, started + self.settings.lookup_min_response_s - loop.time()))
        LOOKUPS.labels(outcome).inc()
        LOOKUP_SECONDS.observe(loop.time() - started)
        log.info("event=lookup outcome=%s status=%d account=%s client=%s", outcome, response.status_code,
                 masked_account(account_no), client)
        return response

    async def decide(self, request: Request, lang: str, client: str, account_no: str, phone_last4: str
                     ) -> tuple[str, Response]:
        t = i18n.MESSAGES[lang]

        def again(outcome: str, status: int, error: str) -> tuple[str, Response]:
            return outcome, self.page(request, "form.html", lang, status, error=t[error], account_no=account_no)

        if not self.limiter.allow_client(client):
            return again("limited_client", 429, "limited")
        try:
            fields.account_no(account_no)
        except InvalidField:
            return again("bad_account", 400, "bad_account")
        if len(phone_last4) != PHONE_LAST4_LEN or not phone_last4.isascii() or not phone_last4.isdigit():
            return again("bad_phone", 400, "bad_phone")
        if not self.limiter.allow_account(account_no):
            return again("limited_account", 429, "limited")
        try:
            overview = await self.upstream.overview(account_no, phone_last4)
        except NoMatch:
            return again("no_match", 404, "no_match")
        except BadInput:
            return again("bad_account", 400, "bad_account")
        except Unavailable:
            return "unavailable", self.page(request, "unavailable.html", lang, 503)
        return "found", self.page(request, "overview.html", lang, **self.overview_context(overview, lang))

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def not_found(self, request: Request, exc: Exception) -> Response:
        lang = i18n.lang_of(request.query_params.get("lang"))
        return self.page(request, "message.html", lang, 404, message=i18n.MESSAGES[lang]["not_found_page"])

    async def csrf_failed(self, scope: Any, send: Any, message_id: Any) -> None:
        resp = self.page(None, "message.html", i18n.DEFAULT_LANG, 403,
                         message=f"{i18n.MESSAGES['zh']['expired']} / {i18n.MESSAGES['en']['expired']}")
        await resp(scope, _no_receive, send)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.upstream.open()
        try:
            yield
        finally:
            await self.upstream.close()

    def asgi(self) -> Any:
        app = Starlette(routes=[
            Route("/", self.form, methods=["GET"]),
            Route("/lookup", self.lookup, methods=["POST"]),
            Route("/healthz", self.health, methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ], exception_handlers={404: self.not_found}, lifespan=self.lifespan)
        protected = asgi_csrf(app, signing_secret=self.settings.csrf_secret or secrets.token_hex(32),
                              always_protect={"/lookup"}, cookie_secure=self.settings.https,
                              cookie_samesite="Strict", send_csrf_failed=self.csrf_failed)
        return SecurityHeaders(BodyLimit(protected, self.settings.request_body_max_bytes))


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
