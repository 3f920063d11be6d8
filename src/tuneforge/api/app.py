"""The FastAPI application: OpenAI-compatible fine-tuning and Evals endpoints, tuneforge's own, and error shapes.

`create_app()` reads the settings from the environment; it migrates nothing and starts nothing (the
server command does that), so the app can be built in tests and in any ASGI server.
"""

from __future__ import annotations

from fastapi import FastAPI

from tuneforge.api.audit import AuditLog
from tuneforge.api.auth import KeyCache, document_scopes
from tuneforge.api.errors import install_error_handlers
from tuneforge.api.health import router as health_router
from tuneforge.api.limits import BodyLimit
from tuneforge.api.metrics import RequestMetrics
from tuneforge.api.metrics import router as metrics_router
from tuneforge.api.rate_limit import AddressLimit, RateLimiter
from tuneforge.api.routers import admin, evals, files, jobs, models
from tuneforge.api.routers import uploads as upload_routes
from tuneforge.api.routers import usage as usage_routes
from tuneforge.api.routers import evaluation as evaluation_routes
from tuneforge.api.routers import registry as registry_routes
from tuneforge.api.routers import datasets as dataset_routes
from tuneforge.api.routers import sweeps as sweep_routes
from tuneforge.api.routers import exports as export_routes
from tuneforge.api.routers import inference as inference_routes
from tuneforge.api.playground_pool import PlaygroundPool
from tuneforge.api.streams import EventStreams
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.settings import Settings
from tuneforge.ui import mount_dashboard


def create_app(settings: Settings | None = None, *, db: Database | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = FastAPI(title="tuneforge", version="0.1.0",
                  description="Self-hosted fine-tuning with an OpenAI-compatible API.")
    app.state.settings = settings
    app.state.db = db or Database(settings.database_url, pool_size=10)
    app.state.store = LocalArtifactStore.from_settings(settings)  # uploads sealed at rest (docs/storage.md)
    app.state.key_cache = KeyCache()
    app.state.rate_limiter = RateLimiter.for_settings(settings, app.state.db)
    app.state.streams = EventStreams(app.state.db, max_per_key=settings.max_streams_per_key)
    app.state.playground = PlaygroundPool(settings)  # starts a process on the first request for a model, not here
    install_error_handlers(app)
    # Requests without a valid key spend their client address's bucket (429 once empty): key guessing is bounded.
    app.add_middleware(AddressLimit, limiter=app.state.rate_limiter, key_cache=app.state.key_cache)
    # JSON bodies are small; uploads stream under TUNEFORGE_MAX_UPLOAD_BYTES in the files router.
    # The parts of /v1/uploads stream under their upload's declared size (api/routers/uploads.py).
    app.add_middleware(BodyLimit, exempt=(("POST", "/v1/files"), ("POST", "/v1/uploads/*/parts")))
    # Outside the body limit, so its refusals are audited too.
    app.add_middleware(AuditLog, db=app.state.db)
    # Outermost: request latency includes the audit write and the body limit (api/metrics.py).
    app.add_middleware(RequestMetrics)
    for router in (files.router, jobs.router, evals.router, models.router, admin.router):
        app.include_router(router)
    app.include_router(upload_routes.router)
    app.include_router(usage_routes.router)  # cost: usage, prices, budgets
    app.include_router(evaluation_routes.router)  # a job's evaluation report and human eval
    app.include_router(registry_routes.router)  # model names, versions, lineage, aliases, tags
    app.include_router(dataset_routes.router)  # dataset names, versions (uploaded files), aliases, tags
    app.include_router(sweep_routes.router)  # hyperparameter sweeps (scheduler/sweeps.py)
    app.include_router(export_routes.router)  # exports of fine-tuned models, as export jobs
    app.include_router(inference_routes.router)  # chat / completions from the tenant's models (the playground)
    app.include_router(health_router)  # /healthz, /readyz (api/health.py)
    app.include_router(metrics_router)  # Prometheus /metrics (api/metrics.py)

    document_scopes(app)

    @app.get("/health", include_in_schema=False)
    def health() -> dict:
        return {"status": "ok"}

    # The web dashboard (static files with their CSP) at /ui/; / redirects there.
    mount_dashboard(app)

    return app
