"""The FastAPI application: OpenAI-compatible fine-tuning and Evals endpoints, tuneforge's own, and error shapes.

`create_app()` reads the settings from the environment; it migrates nothing and starts nothing (the
server command does that), so the app can be built in tests and in any ASGI server.
"""

from __future__ import annotations

from fastapi import FastAPI

from tuneforge.api.audit import AuditLog
from tuneforge.api.auth import KeyCache, document_scopes
from tuneforge.api.errors import install_error_handlers
from tuneforge.api.limits import BodyLimit
from tuneforge.api.rate_limit import RateLimiter
from tuneforge.api.routers import admin, evals, files, jobs, models
from tuneforge.api.streams import EventStreams
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.settings import Settings


def create_app(settings: Settings | None = None, *, db: Database | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = FastAPI(title="tuneforge", version="0.1.0",
                  description="Self-hosted fine-tuning with an OpenAI-compatible API.")
    app.state.settings = settings
    app.state.db = db or Database(settings.database_url, pool_size=10)
    app.state.store = LocalArtifactStore(settings.artifacts_dir)
    app.state.key_cache = KeyCache()
    app.state.rate_limiter = RateLimiter.for_settings(settings, app.state.db)
    app.state.streams = EventStreams(app.state.db, max_per_key=settings.max_streams_per_key)
    install_error_handlers(app)
    # JSON bodies are small; uploads stream under TUNEFORGE_MAX_UPLOAD_BYTES in the files router.
    app.add_middleware(BodyLimit, exempt=(("POST", "/v1/files"),))
    # Outside the body limit, so its refusals are audited too.
    app.add_middleware(AuditLog, db=app.state.db)
    for router in (files.router, jobs.router, evals.router, models.router, admin.router):
        app.include_router(router)

    document_scopes(app)

    @app.get("/health", include_in_schema=False)
    def health() -> dict:
        return {"status": "ok"}

    return app
