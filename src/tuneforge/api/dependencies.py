"""What routers get from the app: the database, the artifact store, the settings, and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tuneforge.api.auth import Principal, RequireScope
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.settings import Settings


def database(request: Request) -> Database:
    return request.app.state.db


def artifact_store(request: Request) -> LocalArtifactStore:
    return request.app.state.store


def settings(request: Request) -> Settings:
    return request.app.state.settings


Db = Annotated[Database, Depends(database)]
Store = Annotated[LocalArtifactStore, Depends(artifact_store)]
Config = Annotated[Settings, Depends(settings)]
# The caller, with the scope the route needs. Caller: read for GET, jobs for a change; the others by name.
Caller = Annotated[Principal, Depends(RequireScope())]
Reader = Annotated[Principal, Depends(RequireScope("read"))]
JobsCaller = Annotated[Principal, Depends(RequireScope("jobs"))]
FilesCaller = Annotated[Principal, Depends(RequireScope("files"))]
AdminCaller = Annotated[Principal, Depends(RequireScope("admin"))]
