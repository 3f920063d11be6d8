"""/v1/models: the built-in base models and the tenant's fine-tuned models; delete a fine-tuned model
(its row, and its adapter and its job's checkpoints on disk)."""

from __future__ import annotations

from fastapi import APIRouter

from tuneforge.api.dependencies import Db, JobsCaller, Reader
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import model_object
from tuneforge.db import models as model_rows
from tuneforge.home import tuneforge_home
from tuneforge.registry.models import BASE_MODEL_OWNER, base_models, remove_model_files
from tuneforge.spec.api import ListObject, ModelDeleted, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])
BASE_MODEL_CREATED = 1_735_689_600  # 2025-01-01: built-in models have no upload time


@router.get("", response_model=ListObject)
def list_models(caller: Reader, db: Db) -> ListObject:
    base = [ModelObject(id=name, created=BASE_MODEL_CREATED, owned_by=BASE_MODEL_OWNER) for name in base_models()]
    with db.session() as session:
        tuned = [model_object(row) for row in model_rows.list_models(session, tenant_id=caller.tenant_id)]
    return ListObject(data=base + tuned)


@router.get("/{model_id}", response_model=ModelObject)
def get_model(model_id: str, caller: Reader, db: Db) -> ModelObject:
    if model_id in base_models():
        return ModelObject(id=model_id, created=BASE_MODEL_CREATED, owned_by=BASE_MODEL_OWNER)
    with db.session() as session:
        row = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=model_id)
        if row is None:
            raise not_found("model", model_id, param="model")
        return model_object(row)


@router.delete("/{model_id}", response_model=ModelDeleted)
def delete_model(model_id: str, caller: JobsCaller, db: Db) -> ModelDeleted:
    if model_id in base_models():
        raise ApiError(403, f"{model_id} is a built-in base model and cannot be deleted", param="model",
                       code="forbidden", type="permission_error")
    with db.session() as session:
        row = model_rows.get_model(session, tenant_id=caller.tenant_id, model_id=model_id)
        if row is None:
            raise not_found("model", model_id, param="model")
        model_rows.delete_model(session, model=row)
        location = row.location
    # After the commit: a failed removal leaves files behind, never a listed model without them.
    remove_model_files(location=location, home=tuneforge_home())
    return ModelDeleted(id=model_id)
