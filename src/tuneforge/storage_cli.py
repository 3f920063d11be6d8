"""`tuneforge storage rotate-key|shred|seal-artifacts|fetch-outputs|register-dataset`: storage, as its operator.

These talk to the database, the artifact folder and the store this machine's TUNEFORGE_* variables name
(TUNEFORGE_ARTIFACTS_DIR, TUNEFORGE_STORE_URL, TUNEFORGE_KEYS_DIR). Rotation re-wraps every data key of the
tenant (objects in the store and sealed blobs in the artifact folder) under a new key version (`rotate-key
--base-models`: of the registered base models' objects, whose owner is no tenant); shredding
destroys the tenant's keys, after which its objects and sealed uploads cannot be read by anyone;
seal-artifacts seals the plaintext uploads, model registry files and ended jobs' directories of an install from
before sealing;
register-dataset makes an s3:// object a tenant's file without copying it (docs/storage.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_storage(args: argparse.Namespace) -> int:
    from tuneforge.cli import UserError
    from tuneforge.control_plane_cli import _check_tenant_name, _database
    from tuneforge.registry.storage.jobs import StoreUnavailable, fetch_outputs
    from tuneforge.registry.storage.tenant_store import open_tenant_store

    settings, db = _database()
    if args.base_models:
        args.tenant = _base_models_owner(args)
    elif args.tenant is None and args.action != "seal-artifacts":
        either = " (or --base-models: the registered base models' key)" if args.action == "rotate-key" else ""
        raise UserError(f"{args.action} needs --tenant NAME{either}")
    elif args.tenant is not None:
        _check_tenant_name(args.tenant)
    if args.action in ("rotate-key", "shred", "seal-artifacts") and not settings.encrypt_at_rest:
        raise UserError("encryption at rest is off (TUNEFORGE_ENCRYPT_AT_REST=false): there are no tenant keys")
    if args.action in ("rotate-key", "shred"):  # the store's objects and the artifact folder's sealed blobs alike
        from tuneforge.registry.storage.keys import FolderKeyProvider
        from tuneforge.registry.storage.tenant_keys import TenantKeys

        keys = TenantKeys(db, FolderKeyProvider(Path(settings.keys_dir)))
    if args.action == "rotate-key":
        version = keys.rotate(args.tenant)
        whose = "registered base models" if args.base_models else f"tenant {args.tenant}"
        print(f"{whose}: data keys re-wrapped under key version {version}; older versions destroyed", file=sys.stderr)
        return 0
    if args.action == "shred":
        if not args.yes:
            raise UserError(f"shred destroys every key of tenant {args.tenant}: its uploaded files, stored datasets and "
                            "models become unreadable for good. Add --yes to do it")
        keys.shred(args.tenant)
        print(f"tenant {args.tenant}: keys destroyed; its sealed uploads and its objects in the store can no longer be "
              "read", file=sys.stderr)
        return 0
    if args.action == "seal-artifacts":
        from tuneforge.home import tuneforge_home
        from tuneforge.registry.artifacts import LocalArtifactStore
        from tuneforge.registry.storage.reseal import DamagedBlob, seal_ended_job_dirs, seal_plaintext_uploads

        store = LocalArtifactStore.from_settings(settings)
        try:
            report = seal_plaintext_uploads(db, store, tenant_id=args.tenant,
                                            registry_root=tuneforge_home() / "registry")
        except DamagedBlob as exc:
            raise UserError(str(exc)) from None
        print(f"sealed {report.sealed} tenant copies of plaintext uploads and model files; removed "
              f"{report.plaintext_removed} plaintext blobs, kept {report.plaintext_kept} still in use (the collector "
              f"removes them later); {report.missing} named by rows but not in this artifact folder; removed "
              f"{report.copies_removed} plaintext copies of sealed model versions"
              + (f", kept {report.copies_kept} while a job runs (run it again later)" if report.copies_kept else ""),
              file=sys.stderr)
        jobs = seal_ended_job_dirs(db, store.keys, settings.jobs_dir, tenant_id=args.tenant)
        print(f"sealed {jobs.files} plaintext files ({jobs.bytes / 1e6:.1f} MB) in {jobs.jobs_sealed} ended jobs' "
              f"directories; {jobs.already_sealed} ended jobs had nothing plaintext left"
              + (f"; removed {jobs.leftovers_removed} half-written leftovers" if jobs.leftovers_removed else "")
              + (f"; skipped {len(jobs.skipped)} jobs:" if jobs.skipped else ""), file=sys.stderr)
        for job_id, why in jobs.skipped:
            print(f"  skipped {job_id} ({why})", file=sys.stderr)
        return 0
    store = open_tenant_store(db, settings)
    if store is None:
        raise UserError("no object store is configured (TUNEFORGE_STORE_URL=s3://bucket/prefix or file:///folder)")
    if args.action == "register-dataset":
        from tuneforge.registry.storage.registered import NotRegistrable, register_dataset_uri

        if not args.uri:
            raise UserError("register-dataset needs --uri s3://bucket/key")
        try:
            row = register_dataset_uri(store, tenant_id=args.tenant, uri=args.uri, purpose=args.purpose)
        except (NotRegistrable, StoreUnavailable, LookupError) as exc:
            raise UserError(str(exc)) from None
        print(row.id)
        print(f"registered {args.uri} as {row.id} of tenant {args.tenant}: {row.status} "
              f"({(row.report or {}).get('summary', '')}); it stays where it is", file=sys.stderr)
    else:
        if not args.job or not args.out:
            raise UserError("fetch-outputs needs --job JOB_ID and --out DIR")
        try:
            names = fetch_outputs(store, tenant_id=args.tenant, job_id=args.job, dest=args.out)
        except (StoreUnavailable, LookupError, ValueError) as exc:
            raise UserError(f"{args.job}: {exc}") from None
        if not names:
            raise UserError(f"{args.job}: tenant {args.tenant} has no published outputs of that job")
        for name in names:
            print(name)
    return 0


def _base_models_owner(args: argparse.Namespace) -> str:
    """The store-only owner of the registered base models' objects, for rotate-key --base-models."""
    from tuneforge.cli import UserError
    from tuneforge.registry.storage.jobs import BASE_MODELS_TENANT

    if args.action != "rotate-key":
        raise UserError(f"--base-models names the registered base models' key for rotate-key only, not {args.action}")
    if args.tenant is not None:
        raise UserError("rotate-key: give --tenant NAME or --base-models, not both")
    return BASE_MODELS_TENANT


def add_storage_command(commands) -> None:
    storage = commands.add_parser("storage", help="rotate or shred a tenant's keys; seal plaintext uploads and job "
                                  "directories; fetch a job's published outputs; register a dataset from s3:// "
                                  "without copying",
                                  description="Encryption at rest and the object store (TUNEFORGE_ARTIFACTS_DIR, "
                                              "TUNEFORGE_STORE_URL, TUNEFORGE_KEYS_DIR; docs/storage.md).")
    storage.add_argument("action", choices=("rotate-key", "shred", "seal-artifacts", "fetch-outputs", "register-dataset"))
    storage.add_argument("--tenant", help="the tenant (every action but seal-artifacts, which seals every tenant's "
                                          "plaintext uploads and ended jobs' directories without it)")
    storage.add_argument("--base-models", action="store_true",
                         help="rotate-key: rotate the key of the registered base models' objects in the store (owned by "
                         "no tenant) instead of a tenant's")
    storage.add_argument("--yes", action="store_true", help="shred: confirm that the tenant's data is to become unreadable")
    storage.add_argument("--job", help="fetch-outputs: the job whose outputs to fetch")
    storage.add_argument("--out", type=Path, help="fetch-outputs: where to write them (decrypted)")
    storage.add_argument("--uri", help="register-dataset: the s3://bucket/key of a dataset to use where it lies")
    storage.add_argument("--purpose", default="fine-tune", choices=("fine-tune", "evals"),
                         help="register-dataset: what the file is for (default fine-tune)")
    storage.set_defaults(handler=cmd_storage)
