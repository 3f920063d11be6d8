"""`tuneforge models list|show|lineage|register|alias|delete|download`: the model registry from the command line.

Like `keys` and `tenants`, these talk to the database (TUNEFORGE_DATABASE_URL) and the artifact store of
the machine they run on, as its operator: a tenant's models are named with --tenant. `register --base`
is the only way a local directory becomes a model (an API request never names a server path; with an object
store configured the files go there too, for workers on other machines), and
`download` writes a version's files where the user asks and checks every file against the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _store(settings):
    from tuneforge.registry.artifacts import LocalArtifactStore

    return LocalArtifactStore(settings.artifacts_dir)


def _version(session, args):
    from tuneforge.cli import UserError
    from tuneforge.registry.models import RegistryError, find_reference

    if not args.tenant:
        raise UserError(f"models {args.action} needs --tenant NAME (whose model {args.ref} is)")
    try:
        return find_reference(session, tenant_id=args.tenant, ref=args.ref)
    except RegistryError as exc:
        raise UserError(f"{args.ref}: {exc.message} (tuneforge models list --tenant {args.tenant} shows them)") from None


def cmd_models(args: argparse.Namespace) -> int:
    from tuneforge.cli import UserError

    handlers = {"list": _list, "show": _show, "lineage": _lineage, "register": _register, "alias": _alias,
                "delete": _delete, "download": _download}
    if args.action == "delete" and args.base:  # a registered base model, every tenant's: no --tenant, no ref
        return _run(_delete_base, args)
    if args.action != "list" and args.action != "register" and not args.ref:
        raise UserError(f"models {args.action} needs a model: NAME, NAME@vN or NAME:ALIAS"
                        + (" (or an export's id)" if args.action == "lineage" else ""))
    return _run(handlers[args.action], args)


def _run(handler, args: argparse.Namespace) -> int:
    from tuneforge.cli import UserError
    from tuneforge.control_plane_cli import _database
    from tuneforge.spec.jobdir import EXIT_BAD_INPUT

    settings, db = _database()
    try:
        return handler(args, settings, db)
    except UserError as exc:  # printed here: under `python -m tuneforge.cli` main catches __main__'s UserError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _list(args, settings, db) -> int:
    from tuneforge.db import model_versions as version_rows
    from tuneforge.spec.job import BUILTIN_BASE_MODELS

    with db.session() as session:
        for name in BUILTIN_BASE_MODELS:
            print(f"{name}\tbase (built-in)")
        for row in version_rows.list_base_models(session):
            print(f"{row.name}\tbase (registered)\tsha256:{row.manifest_sha256[:12]}")
        if args.tenant:
            for name, latest, count, _ in version_rows.list_names(session, tenant_id=args.tenant):
                aliases = version_rows.aliases(session, tenant_id=args.tenant, name=name)
                shown = ", ".join(f"{alias}=v{n}" for alias, n in aliases.items()) or "-"
                print(f"{name}\tv{latest}\t{count} version(s)\taliases: {shown}")
    return 0


def _show(args, settings, db) -> int:
    from tuneforge.api.routers.registry import version_object

    with db.session() as session:
        print(json.dumps(version_object(session, _version(session, args)).model_dump(mode="json"), indent=2))
    return 0


def _lineage(args, settings, db) -> int:
    from tuneforge.db import model_versions as version_rows
    from tuneforge.registry.exports import exports_of_version
    from tuneforge.registry.models import lineage_chain

    store = _store(settings)
    with db.session() as session:
        if args.ref.startswith("export_"):  # an export: what it was made from, then that version's own lineage
            artifact = _export(session, store, args)
            source = artifact["lineage"]["source"]
            _print_export(artifact, depth=0, with_source=True)
            version = (version_rows.version_of_model(session, tenant_id=args.tenant, model_id=source["model"])
                       if "version_id" in source else None)
            chain = lineage_chain(session, version=version) if version is not None else []
            exports, depth0 = [], 1
        else:
            version = _version(session, args)
            chain = lineage_chain(session, version=version)
            exports, depth0 = exports_of_version(session, store, version=version), 0
    for depth, step in enumerate(chain, start=depth0):
        base = step["base_model"]
        if "name" not in step:
            print(f"{'  ' * depth}base model {base.get('ref')} ({base.get('kind')})")
            continue
        data = ", ".join(f"{d['filename'] or d['file_id']} sha256:{(d['sha256'] or '?')[:12]}"
                         + (f" (dataset {d['dataset']} v{d['version']})" if d.get("dataset") else "")
                         for d in step.get("datasets") or [])
        print(f"{'  ' * depth}{step['name']} {step['version']} ({step['kind']}, {step['model']}) from job "
              f"{step['job_id']}, seed {step['seed']}, data: {data or '-'}, trained on {base.get('ref')}")
    if exports:
        print("exported as:")
        for artifact in exports:
            _print_export(artifact, depth=1, with_source=False)
    return 0


def _export(session, store, args) -> dict:
    from tuneforge.cli import UserError
    from tuneforge.db import exports as export_rows
    from tuneforge.registry.exports import export_artifact

    if not args.tenant:
        raise UserError(f"models lineage needs --tenant NAME (whose export {args.ref} is)")
    export = export_rows.get_export_any_model(session, tenant_id=args.tenant, export_id=args.ref)
    if export is None:
        raise UserError(f"{args.ref}: tenant {args.tenant} has no export with this id")
    artifact = export_artifact(session, store, export=export)
    if artifact is None or artifact["lineage"] is None:
        raise UserError(f"{args.ref}: not recorded in the registry (its export job has not succeeded)")
    return artifact


def _print_export(artifact: dict, *, depth: int, with_source: bool) -> None:
    lineage = artifact["lineage"] or {}
    source = lineage.get("source") or {}
    made_from = (f"{source['name']} {source['version']} ({source['model']})" if "version" in source
                 else source.get("model", "?"))
    fallback = f", fell back from {lineage['deploy'].get('format')}" if lineage.get("fallback_from") else ""
    line = (f"{'  ' * depth}export {artifact['export_id']} ({lineage.get('format')} for {lineage.get('target')}"
            f"{fallback}, {lineage.get('files')} files, sha256:{(lineage.get('manifest_sha256') or '?')[:12]}) "
            f"by job {lineage.get('job_id')}")
    print(line + (f", made from {made_from}" if with_source else ""))


def _register(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.registry.models import RegistryError, register_base_model, register_published_base_model
    from tuneforge.registry.storage.tenant_store import open_tenant_store

    if not args.base or len(args.base) != 2:
        raise UserError("models register needs --base NAME DIR (the name, and the Hugging Face model directory)")
    name, directory = args.base
    object_store = open_tenant_store(db, settings)  # TUNEFORGE_STORE_URL: workers elsewhere read the model there
    try:
        if object_store is not None:
            manifest, digest = register_published_base_model(db, _store(settings), object_store, name=name,
                                                             directory=Path(directory))
        else:
            with db.session() as session:
                row = register_base_model(session, _store(settings), name=name, directory=Path(directory))
                manifest, digest = row.manifest, row.manifest_sha256
    except (RegistryError, ValueError, OSError) as exc:
        raise UserError(getattr(exc, "message", None) or str(exc)) from None
    where = f", published to {settings.store_url}" if object_store is not None else ""
    print(f"registered base model {name}: {len(manifest['files'])} files, sha256:{digest}{where}", file=sys.stderr)
    return 0


def _alias(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.db import model_versions as version_rows
    from tuneforge.registry.models import ALIAS

    if not args.alias or not ALIAS.fullmatch(args.alias):
        raise UserError("models alias NAME@vN ALIAS: the alias is lowercase letters, digits and dashes")
    with db.session() as session:
        version = _version(session, args)
        if args.remove:
            if not version_rows.delete_alias(session, tenant_id=version.tenant_id, name=version.name, alias=args.alias):
                raise UserError(f"{version.name} has no alias {args.alias!r}")
            print(f"removed alias {version.name}:{args.alias}", file=sys.stderr)
        else:
            version_rows.set_alias(session, version=version, alias=args.alias)
            print(f"{version.name}:{args.alias} -> v{version.version}", file=sys.stderr)
    return 0


def _delete(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.db import models as model_rows
    from tuneforge.home import tuneforge_home
    from tuneforge.registry.models import RegistryError, delete_model_and_version, remove_model_files

    with db.session() as session:
        version = _version(session, args)
        model = model_rows.get_model(session, tenant_id=version.tenant_id, model_id=version.model_id)
        try:
            delete_model_and_version(session, model=model)
        except RegistryError as exc:
            raise UserError(exc.message) from None
        label, location = f"{version.name} v{version.version}", model.location
    remove_model_files(location=location, home=tuneforge_home())
    print(f"deleted {label}", file=sys.stderr)
    return 0


def _delete_base(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.registry.models import RegistryError, delete_base_model

    if len(args.base) != 1 or args.ref or args.tenant:
        raise UserError("models delete --base NAME: only the registered base model's name (it is every tenant's)")
    with db.session() as session:
        try:
            delete_base_model(session, name=args.base[0])
        except RegistryError as exc:
            raise UserError(exc.message) from None
    print(f"deleted base model {args.base[0]}; the blob collector removes its files (and its objects in the store) "
          "once nothing else holds them", file=sys.stderr)
    return 0


def _download(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.registry.versions import ManifestMismatch, file_contents, verify_directory, write_files

    if not args.out:
        raise UserError("models download needs --out DIR (a directory that does not exist yet)")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out}: exists already; name a new directory")
    store = LocalArtifactStore.from_settings(settings)  # with the tenant keys: a sealed version is decrypted
    with db.session() as session:
        version = _version(session, args)
        manifest, label = version.manifest, f"{version.name} v{version.version}"
        contents = file_contents(session, store, manifest, tenant_id=version.tenant_id, holder=version.job_id)
    try:
        write_files(store, manifest, out, contents=contents)
    except (ManifestMismatch, OSError) as exc:
        shutil.rmtree(out, ignore_errors=True)  # no partial copy
        raise UserError(f"{label}: {exc}") from None
    problems = verify_directory(manifest, out)
    if problems:
        raise UserError(f"{out}: does not match the manifest of {label}: {'; '.join(problems)}")
    print(f"wrote {label} to {out}: {len(manifest['files'])} files, each matching the manifest's sha256",
          file=sys.stderr)
    return 0


def add_models_command(commands) -> None:
    models = commands.add_parser(
        "models", help="the model registry: versions, lineage, aliases, base models",
        description="List, inspect, alias, delete and download registered model versions (NAME, NAME@vN or "
        "NAME:ALIAS of a tenant), and register a local Hugging Face directory as a base model (admin).")
    models.add_argument("action", choices=("list", "show", "lineage", "register", "alias", "delete", "download"))
    models.add_argument("ref", nargs="?", help="the model: NAME (newest version), NAME@vN or NAME:ALIAS; lineage also "
                        "takes an export's id (export_...)")
    models.add_argument("alias", nargs="?", help="alias: the alias to point at the version")
    models.add_argument("--tenant", help="whose models")
    models.add_argument("--base", nargs="+", metavar=("NAME", "DIR"),
                        help="register: the base model's name and the local Hugging Face directory to copy in (and "
                        "into the object store when TUNEFORGE_STORE_URL is set; the same files again publish them); "
                        "delete: the name of a registered base model (refused while a job not finished yet or a live "
                        "adapter uses it)")
    models.add_argument("--remove", action="store_true", help="alias: remove the alias instead")
    models.add_argument("--out", metavar="DIR", help="download: the new directory to write the files to")
    models.set_defaults(handler=cmd_models)
