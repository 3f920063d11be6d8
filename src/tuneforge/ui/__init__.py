"""The web dashboard: static files (HTML, CSS, plain JS modules, a vendored uPlot) that the API serves at /ui.

Everything the page shows it reads from the public API with the user's key, so the dashboard adds no
server code path of its own; its pages are served with a strict Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parent / "static"
MOUNT_PATH = "/ui"

# Scripts and styles from this origin only (no inline script, no eval, no CDN), no framing, no plugins,
# and fetch() only back to the API that served the page.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate (ETag) on every load, so an upgraded server never runs an old script beside a new one.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """StaticFiles with the dashboard's security headers on every answer (404s included)."""

    async def get_response(self, path, scope):
        try:
            response = await super().get_response(path, scope)
        except HTTPException as exc:  # a missing file (404) or a method other than GET / HEAD (405)
            response = PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_dashboard(app) -> None:
    """Serve the dashboard at /ui/ (index.html for /ui/) and send a browser that opens / there."""
    app.mount(MOUNT_PATH, DashboardFiles(directory=ASSETS, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def dashboard_redirect() -> RedirectResponse:
        return RedirectResponse(MOUNT_PATH + "/", status_code=307)
