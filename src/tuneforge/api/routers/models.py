"""/v1/models: the base models (built-in and registered), the tenant's fine-tuned models and their kept
checkpoints (ft:...:ckpt-step-N, as OpenAI lists them); delete a fine-tuned model (its row and version,
its adapter and its job's checkpoints on disk) unless an alias or a job not finished yet uses it, and, with an
admin key, a registered base model unless a job not finished yet or a live adapter uses it."""

from __future__ import annotations

from fastapi import APIRouter

from tuneforge.api.dependencies import Db, JobsCaller, Reader
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import model_object
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.home import tuneforge_home
from tuneforge.registry.models import (
    BASE_MODEL_OWNER,
    CHECKPOINT_SUFFIX,
    RegistryError,
    all_base_models,
    checkpoint_models,
    delete_base_model,
    delete_model_and_version,
    remove_model_files,
)
from tuneforge.spec.api import ListObject, ModelDeleted, ModelObject
from tuneforge.spec.job import BUILTIN_BASE_MODELS

router = APIRouter(prefix="/v1/models", tags=["models"])
BASE_MODEL_CREATED = 1_735_689_600  # 2025-01-01: built-in models have no upload time


def _base_objects(session) -> list[ModelObject]:
    registered = {row.name: row.created_at for row in version_rows.list_base_models(session)}
    return [ModelObject(id=name, created=registered.get(name, BASE_MODEL_CREATED), owned_by=BASE_MODEL_OWNER)
            for name in all_base_models(session)]


@router.get("", response_model=ListObject)
def list_models(caller: Reader, db: Db) -> ListObject:
    with db.session() as session:
        rows = model_rows.list_models(session, tenant_id=caller.tenant_id)
        checkpoints = [ModelObject(id=model_id, created=created, owned_by=owner)
                       for model_id, created, owner in checkpoint_models(session, models=rows)]
        return ListObject(data=_base_objects(session) + [model_object(row) for row in rows] + checkpoints)


@router.get("/{model_id}", response_model=ModelObject)
def get_model(model_id: str, caller: Reader, db: Db) -> ModelObject:
    with db.session() as session:
        for base in _base_objects(session):
            if base.id == model_id:
                return base
        parent = model_id.split(CHECKPOINT_SUFFIX)[0] if CHECKPOINT_SUFFIX in model_id else model_id
        row = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=parent)
        if row is None:
            raise not_found("model", model_id, param="model")
        if parent == model_id:
            return model_object(row)
        for checkpoint_id, created, owner in checkpoint_models(session, models=[row]):
            if checkpoint_id == model_id:
                return ModelObject(id=checkpoint_id, created=created, owned_by=owner)
        raise not_found("model", model_id, param="model")


@router.delete("/{model_id}", response_model=ModelDeleted)
def delete_model(model_id: str, caller: JobsCaller, db: Db) -> ModelDeleted:
    with db.session() as session:
        if model_id in all_base_models(session):
            return _delete_base_model(session, model_id, caller)
        row = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=model_id)
        if row is None:
            raise not_found("model", model_id, param="model")
        try:
            delete_model_and_version(session, model=row)
        except RegistryError as exc:
            raise ApiError(exc.status, exc.message, param="model", code=exc.code) from None
        location = row.location
    # After the commit: a failed removal leaves files behind, never a listed model without them.
    remove_model_files(location=location, home=tuneforge_home())
    return ModelDeleted(id=model_id)


def _delete_base_model(session, model_id: str, caller) -> ModelDeleted:
    """A registered base model is every tenant's: only an admin key deletes one, by the registry's rules."""
    builtin = model_id in BUILTIN_BASE_MODELS
    if builtin or not caller.admin:
        why = ("a built-in base model: it ships with tuneforge" if builtin
               else "a registered base model: only an admin key can delete it")
        raise ApiError(403, f"{model_id} is {why}", param="model", code="forbidden", type="permission_error")
    try:
        delete_base_model(session, name=model_id)
    except RegistryError as exc:
        raise ApiError(exc.status, exc.message, param="model", code=exc.code) from None
    return ModelDeleted(id=model_id)
