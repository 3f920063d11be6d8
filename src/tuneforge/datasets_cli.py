"""`tuneforge datasets list|show|register|alias|delete`: the dataset registry from the command line.

Like `tuneforge models`, these work on the database (TUNEFORGE_DATABASE_URL) of the machine they run on, as
its operator: whose datasets is named with --tenant. A version holds an uploaded file (its id, file-...);
nothing here reads a path or copies bytes.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_datasets(args: argparse.Namespace) -> int:
    from tuneforge.cli import UserError
    from tuneforge.control_plane_cli import _database
    from tuneforge.spec.jobdir import EXIT_BAD_INPUT

    handlers = {"list": _list, "show": _show, "register": _register, "alias": _alias, "delete": _delete}
    settings, db = _database()
    try:
        if not args.tenant:
            raise UserError(f"datasets {args.action} needs --tenant NAME (whose datasets)")
        if args.action != "list" and not args.ref:
            raise UserError(f"datasets {args.action} needs a dataset: NAME, NAME@vN or NAME:ALIAS")
        return handlers[args.action](args, db)
    except UserError as exc:  # printed here: under `python -m tuneforge.cli` main catches __main__'s UserError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        db.dispose()


def _version(session, args, ref: str | None = None):
    from tuneforge.cli import UserError
    from tuneforge.registry.dataset_versions import DatasetError, find_reference

    ref = ref or args.ref
    try:
        return find_reference(session, tenant_id=args.tenant, ref=ref)
    except DatasetError as exc:
        raise UserError(f"{ref}: {exc.message} (tuneforge datasets list --tenant {args.tenant} shows them)") from None


def _print(session, row) -> None:
    from tuneforge.api.routers.datasets import version_object

    print(json.dumps(version_object(session, row).model_dump(mode="json"), indent=2))


def _list(args, db) -> int:
    from tuneforge.db import dataset_versions as dataset_rows

    with db.read_session() as session:
        names, _ = dataset_rows.list_names(session, tenant_id=args.tenant, after=None, limit=1_000_000)
        for name, latest, count, _ in names:
            aliases = dataset_rows.aliases(session, tenant_id=args.tenant, name=name)
            shown = ", ".join(f"{alias}=v{n}" for alias, n in aliases.items()) or "-"
            print(f"{name}\tv{latest}\t{count} version(s)\taliases: {shown}")
    return 0


def _show(args, db) -> int:
    with db.read_session() as session:
        _print(session, _version(session, args))
    return 0


def _register(args, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.db import dataset_versions as dataset_rows
    from tuneforge.registry.dataset_versions import DatasetError, register_file

    if not args.file:
        raise UserError("datasets register needs --file FILE_ID (tuneforge's id of an uploaded, processed file)")
    with db.session() as session:
        file = dataset_rows.lock_live_file(session, tenant_id=args.tenant, file_id=args.file)
        if file is None:
            raise UserError(f"--file: tenant {args.tenant} has no file {args.file!r}")
        source = _version(session, args, args.source) if args.source else None
        try:
            row, created = register_file(session, file=file, name=args.ref, source_version=source)
        except DatasetError as exc:
            raise UserError(exc.message) from None
        if not created:
            print(f"{row.name} v{row.version} already holds this content (sha256 {row.sha256[:12]})", file=sys.stderr)
        _print(session, row)
    return 0


def _alias(args, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.db import dataset_versions as dataset_rows

    if not args.alias:
        raise UserError("datasets alias needs NAME@vN and the alias, e.g. support-chats@v2 clean")
    with db.session() as session:
        if args.remove:
            name = args.ref.partition("@")[0].partition(":")[0]
            if not dataset_rows.delete_alias(session, tenant_id=args.tenant, name=name, alias=args.alias):
                raise UserError(f"dataset {name!r} has no alias {args.alias!r}")
            print(f"removed alias {args.alias} of {name}")
            return 0
        from tuneforge.registry.dataset_versions import NAME

        if not NAME.fullmatch(args.alias):
            raise UserError(f"alias {args.alias!r}: expected lowercase letters, digits and '-' (e.g. production)")
        row = _version(session, args)
        dataset_rows.set_alias(session, version=row, alias=args.alias)
        print(f"{row.name}:{args.alias} -> v{row.version}")
    return 0


def _delete(args, db) -> int:
    from tuneforge.cli import UserError
    from tuneforge.registry.dataset_versions import DatasetError, delete_version

    with db.session() as session:
        row = _version(session, args)
        try:
            delete_version(session, version=row)
        except DatasetError as exc:
            raise UserError(exc.message) from None
        print(f"deleted {row.name} v{row.version} (file {row.file_id} is kept)")
    return 0


def add_datasets_command(commands) -> None:
    datasets = commands.add_parser(
        "datasets", help="the dataset registry: named versions of uploaded files, aliases",
        description="List, inspect, register, alias and delete dataset versions (NAME, NAME@vN or NAME:ALIAS of a "
        "tenant). A version holds an uploaded, processed file; deleting it keeps the file.")
    datasets.add_argument("action", choices=("list", "show", "register", "alias", "delete"))
    datasets.add_argument("ref", nargs="?", help="the dataset: NAME (newest version), NAME@vN or NAME:ALIAS; "
                          "register: the NAME to add a version to")
    datasets.add_argument("alias", nargs="?", help="alias: the alias to point at the version")
    datasets.add_argument("--tenant", help="whose datasets")
    datasets.add_argument("--file", metavar="FILE_ID", help="register: the processed file (file-...) to register")
    datasets.add_argument("--source", metavar="NAME@vN", help="register: the dataset version this one was derived from")
    datasets.add_argument("--remove", action="store_true", help="alias: remove the alias instead")
    datasets.set_defaults(handler=cmd_datasets)
