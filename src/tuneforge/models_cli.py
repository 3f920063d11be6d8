"""`tuneforge models list|show|lineage|register|alias|delete|download`: the model registry from the command line.

Like `keys` and `tenants`, these talk to the database (TUNEFORGE_DATABASE_URL) and the artifact store of
the machine they run on, as its operator: a tenant's models are named with --tenant. `register --base`
is the only way a local directory becomes a model (an API request never names a server path), and
`download` writes a version's files where the user asks and checks every file against the manifest.
"""

from __future__ import annotations

import argparse
import json
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
    from tuneforge.control_plane_cli import _database
    from tuneforge.spec.jobdir import EXIT_BAD_INPUT

    handlers = {"list": _list, "show": _show, "lineage": _lineage, "register": _register, "alias": _alias,
                "delete": _delete, "download": _download}
    if args.action != "list" and args.action != "register" and not args.ref:
        raise UserError(f"models {args.action} needs a model: NAME, NAME@vN or NAME:ALIAS")
    settings, db = _database()
    try:
        return handlers[args.action](args, settings, db)
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
    from tuneforge.registry.models import lineage_chain

    with db.session() as session:
        chain = lineage_chain(session, version=_version(session, args))
    for depth, step in enumerate(chain):
        base = step["base_model"]
        if "name" not in step:
            print(f"{'  ' * depth}base model {base.get('ref')} ({base.get('kind')})")
            continue
        data = ", ".join(f"{d['filename'] or d['file_id']} sha256:{(d['sha256'] or '?')[:12]}"
                         for d in step.get("datasets") or [])
        print(f"{'  ' * depth}{step['name']} {step['version']} ({step['kind']}, {step['model']}) from job "
              f"{step['job_id']}, seed {step['seed']}, data: {data or '-'}, trained on {base.get('ref')}")
    return 0


def _register(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.registry.models import RegistryError, register_base_model

    if not args.base:
        raise UserError("models register needs --base NAME DIR (the name, and the Hugging Face model directory)")
    name, directory = args.base
    with db.session() as session:
        try:
            row = register_base_model(session, _store(settings), name=name, directory=Path(directory))
        except (RegistryError, ValueError) as exc:
            raise UserError(getattr(exc, "message", str(exc))) from None
        print(f"registered base model {row.name}: {len(row.manifest['files'])} files, sha256:{row.manifest_sha256}",
              file=sys.stderr)
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


def _download(args, settings, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.registry.versions import ManifestMismatch, verify_directory, write_files

    if not args.out:
        raise UserError("models download needs --out DIR (a directory that does not exist yet)")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out}: exists already; name a new directory")
    with db.session() as session:
        version = _version(session, args)
        manifest, label = version.manifest, f"{version.name} v{version.version}"
    try:
        write_files(_store(settings), manifest, out)
    except (ManifestMismatch, OSError) as exc:
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
    models.add_argument("ref", nargs="?", help="the model: NAME (newest version), NAME@vN or NAME:ALIAS")
    models.add_argument("alias", nargs="?", help="alias: the alias to point at the version")
    models.add_argument("--tenant", help="whose models")
    models.add_argument("--base", nargs=2, metavar=("NAME", "DIR"),
                        help="register: the base model's name and the local Hugging Face directory to copy in")
    models.add_argument("--remove", action="store_true", help="alias: remove the alias instead")
    models.add_argument("--out", metavar="DIR", help="download: the new directory to write the files to")
    models.set_defaults(handler=cmd_models)
