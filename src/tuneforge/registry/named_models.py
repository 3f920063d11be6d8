"""The registered models a job spec names besides its base (reward and judge models, the model an eval run
evaluates or an export exports), checked against the caller's tenant the way its base model is resolved.

Every door that makes a job from a request (the jobs router, a sweep's creation and each of its trials) runs the
same check, so a kept checkpoint (ft:...:ckpt-step-N) is a reward or judge model exactly where it is a base model.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from tuneforge.registry.checkpoints import parse_checkpoint_id
from tuneforge.registry.models import RegistryError, resolve_base_reference
from tuneforge.spec.job import JobSpec
from tuneforge.spec.openai_jobs import registered_models

# Where a spec names a model the recipe only reads (scores with, asks), so a kept checkpoint serves as well as the
# model. An eval run and an export report on and ship a model: they take the model itself.
NO_CHECKPOINT = ("eval_run.model", "export_run.model")


class NamedModelError(RegistryError):
    """A named model the caller cannot use; where is its place in the spec (rollout.reward_model, ...)."""

    def __init__(self, where: str, error: RegistryError):
        super().__init__(f"{where}: {error.message}", status=error.status, code=error.code)
        self.where = where


def check_named_models(session: Session, *, tenant_id: str, spec: JobSpec) -> None:
    """Raise NamedModelError for the first registered model (other than the base, which the caller pins with
    resolve_base_reference) that is not the tenant's: another tenant's model or checkpoint answers like a missing
    one, a step the retention policy pruned like a missing model. An ft: id, a checkpoint's too, pins as it is."""
    for where, model_id in registered_models(spec):
        if where == "model.base_model":
            continue
        if where in NO_CHECKPOINT and parse_checkpoint_id(model_id) is not None:
            raise NamedModelError(where, RegistryError(
                f"{model_id!r} is a checkpoint; {where.split('.')[0].replace('_', ' ')} takes the model itself",
                status=400, code="invalid_value"))
        try:
            resolve_base_reference(session, tenant_id=tenant_id, ref=model_id)
        except RegistryError as exc:
            raise NamedModelError(where, exc) from None
