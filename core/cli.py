"""The `nad` command. Each subcommand imports what it needs only when it runs, so `nad keys` or `nad submit`
never pay for importing torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from core import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from core.database import Database
    from core.settings import Settings
    from core.storage import Storage


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals on one line as every other `nad` refusal is: its usage block, thirty lines
    for `nad sanitize`, buried the reason. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="nad", description="Remove backdoors from image classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_engine_commands(commands)
    _add_keys_command(commands)
    _add_tidy_command(commands)
    _add_expire_command(commands)
    _add_submit_command(commands)
    args = parser.parse_args(argv)
    return args.run(args)


def _add_engine_commands(commands: argparse._SubParsersAction) -> None:
    """sanitize, evaluate, attack, subset: the engine on local files."""
    from core.engine.commands import add_commands

    add_commands(commands)


def _add_keys_command(commands: argparse._SubParsersAction) -> None:
    """keys: API key management against the service's database."""
    parser = commands.add_parser("keys", help="create, list and revoke API keys (in NAD_DATABASE_URL)")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; the key itself is printed once, on the last line")
    create.add_argument("--name", required=True, type=_key_name, help="who or what the key is for")
    revoke = actions.add_parser("revoke", help="stop a key from working; its jobs stay, out of reach")
    revoke.add_argument("key_id", help="the key's id, as `nad keys list` shows it")
    actions.add_parser("list", help="every key: id, name, created, revoked")
    parser.set_defaults(run=_on_the_database(_keys))


def _on_the_database(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`command`, where a NAD_ setting or the database it cannot use is said in one line, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError
        from sqlalchemy.exc import SQLAlchemyError

        from core.engine.commands import fail

        try:
            return command(args)
        except (ValidationError, SQLAlchemyError) as error:
            return fail(setup_refused(error))
        except NotTheServices as error:
            return fail(str(error))

    return run


def _folders(count: int, kind: str = "") -> str:
    return f"{count} {kind}folder{'' if count == 1 else 's'}"


def _add_tidy_command(commands: argparse._SubParsersAction) -> None:
    """tidy: what NAD_STORAGE_DIR holds that no job of NAD_DATABASE_URL owns or will remove."""
    parser = commands.add_parser(
        "tidy", help="list (and with --remove, remove) job folders whose job the database no longer has, and "
                     "output folders their finished job did not record",
        description="A job is removed from the database before its files (DELETE /jobs/{id}, a submission "
                    "refused after it was recorded), so a process killed between the two leaves a folder "
                    "that no job owns, as does a worker's run that outlived its deleted job. A worker's "
                    "process killed at the hard time limit while it wrote a checkpoint may leave an output "
                    "folder that its job, finished, did not record. This lists both, with their sizes; "
                    "--remove removes them. Run it with the API's NAD_DATABASE_URL and NAD_STORAGE_DIR: "
                    "every folder is judged by that database.")
    parser.add_argument("--remove", action="store_true", help="remove the folders listed")
    parser.set_defaults(run=_on_the_database(_tidy))


def _tidy(args: argparse.Namespace) -> int:
    """List, or remove, the job folders without a job and the output folders their finished job did not record.
    Never against a database that cannot be the API's, where every folder would be ownerless: a SQLite file
    that is not there (a relative path read from another folder) is not made, one without the jobs table is
    not migrated, unlike in `nad keys`, and one without any job while folders exist is not believed."""
    from sqlalchemy import func, select

    from core import jobs
    from core.engine.commands import fail
    from core.settings import get_settings
    from core.storage import Storage

    settings = get_settings()
    storage = Storage(settings.storage_dir)
    # Listed before the jobs are read: a job's folder is made only once its job is recorded, so a listed folder
    # whose job is not found has lost it, and is never the folder of a job being submitted.
    listed = storage.job_ids()
    database, url = _services_database(settings.database_url)
    try:
        with database.session() as session:
            if listed and not session.scalar(select(func.count()).select_from(jobs.Job)):
                return fail(f"it has no job at all, and {storage.root / 'jobs'} holds {_folders(len(listed), 'job ')}: "
                            f"{_not_the_services(url)}")
            ownerless = jobs.unrecorded(session, listed)
            finished = jobs.finished_outputs(session, listed)
    finally:
        database.dispose()
    found = [storage.job_dir(job_id) for job_id in ownerless]
    unkept = [folder for job_id, keep in sorted(finished.items()) for folder in storage.unkept_outputs(job_id, keep)]
    where = f"{_folders(len(listed), 'job ')} in {storage.root / 'jobs'} read against {url}"
    return _list_and_remove(storage.root / "jobs", found, unkept, where, remove=args.remove)


class NotTheServices(Exception):
    """NAD_DATABASE_URL names a database that cannot be the API's (`nad tidy`, `nad expire`): said in one line,
    as `_on_the_database` says a setting it cannot use."""


def _not_the_services(url: str) -> str:
    return f"{url} is not the service's database (NAD_DATABASE_URL must be the API's); nothing was removed"


def _services_database(database_url: str) -> tuple[Database, str]:
    """The database of NAD_DATABASE_URL and its URL with the password hidden, for the commands that remove
    files by what it records. Raises NotTheServices, saying why, where it cannot be the API's: a SQLite file
    that is not there (a relative path read from another folder) is not made, and one without the jobs table
    is not migrated, unlike in `nad keys`."""
    from pathlib import Path

    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from core import jobs
    from core.database import Database

    parsed = make_url(database_url)
    url = parsed.render_as_string(hide_password=True)
    path = Path(parsed.database or ":memory:")
    if parsed.get_backend_name() == "sqlite" and not path.is_file():
        looked = "" if path.is_absolute() else f" (read from {Path.cwd()}, as a relative path is)"
        raise NotTheServices(f"there is no SQLite file at {parsed.database!r}{looked}: {_not_the_services(url)}")
    database = Database(database_url)
    try:
        with database.session() as session:
            if inspect(session.connection()).has_table(jobs.Job.__tablename__):
                return database, url
    except BaseException:
        database.dispose()
        raise
    database.dispose()
    raise NotTheServices(f"it has no jobs table: {_not_the_services(url)}")


def _add_expire_command(commands: argparse._SubParsersAction) -> None:
    """expire: delete every key's jobs that finished long enough ago, with their files."""
    parser = commands.add_parser(
        "expire", help="list (and with --remove, delete) every key's jobs that finished more than --days days "
                       "ago, with their files",
        description="A finished job keeps its uploads and its checkpoint until its owner deletes it (DELETE "
                    "/jobs/{id}). This lists the jobs of every key that succeeded, failed or were cancelled "
                    "more than --days days ago by the database's clock, oldest first, with the size of their "
                    "files; --remove deletes each as DELETE /jobs/{id} does, its record and then its files. "
                    "Queued and running jobs are never touched. Run it with the API's NAD_DATABASE_URL and "
                    "NAD_STORAGE_DIR, by hand or from cron.")
    parser.add_argument("--days", required=True, type=_days, help="how long ago a job must have finished")
    parser.add_argument("--remove", action="store_true", help="delete the jobs listed")
    parser.set_defaults(run=_on_the_database(_expire))


def _days(text: str) -> float:
    """A positive number of days (a fraction is part of a day)."""
    try:
        days = float(text)
    except ValueError:
        days = float("nan")
    if not 0 < days < 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days above 0 and below 100000")
    return days


def _expire(args: argparse.Namespace) -> int:
    """List, or delete, the jobs that finished before `--days` days ago, as their owners' DELETE would."""
    from datetime import timedelta

    from core import jobs
    from core.engine.commands import fail
    from core.settings import get_settings
    from core.storage import Storage, size_of

    settings = get_settings()
    storage = Storage(settings.storage_dir)
    database, url = _services_database(settings.database_url)
    try:
        with database.session() as session:
            cutoff = jobs.clock(session) - timedelta(days=args.days)
            found = jobs.finished_before(session, cutoff)
        before = f"finished before {cutoff:%Y-%m-%d %H:%M} UTC"
        if found and not any(storage.job_dir(job_id).is_dir() for job_id, _, _ in found):
            # Every job has its folder from its submission on: none there is another storage than the API's.
            return fail(f"none of the {_jobs(len(found))} {before} has its folder in {storage.root / 'jobs'}: "
                        f"NAD_STORAGE_DIR must be the API's; nothing was deleted")
        sizes = {job_id: size_of(storage.job_dir(job_id)) for job_id, _, _ in found}
        for job_id, status, finished in found:
            print(f"{job_id}  {status:<9}  finished {finished:%Y-%m-%d %H:%M} UTC  {sizes[job_id]:>15,} bytes")
        deleted = _delete_finished(database, storage, [job_id for job_id, _, _ in found]) if args.remove else []
    finally:
        database.dispose()
    where = f"{url}, files in {storage.root / 'jobs'}"
    left = [job_id for job_id in deleted if storage.job_dir(job_id).exists()]
    if left:
        return fail(f"{len(left)} of the {_jobs(len(deleted))} deleted kept their files ({left[0]} first): check "
                    f"their owner and permissions, then `nad tidy --remove` ({where})")
    if not found:
        print(f"no job {before} ({where})")
    elif args.remove:
        print(f"deleted {_jobs(len(deleted))} {before}, {sum(sizes[job_id] for job_id in deleted):,} bytes "
              f"({where})")
    else:
        print(f"{_jobs(len(found))} {before}, {sum(sizes.values()):,} bytes ({where}); `nad expire --days "
              f"{args.days:g} --remove` deletes them")
    return 0


def _jobs(count: int) -> str:
    return f"{count} job{'' if count == 1 else 's'}"


def _delete_finished(database: Database, storage: Storage, job_ids: list[str]) -> list[str]:
    """Delete each job as DELETE /jobs/{id} does, its record and then its files: the ids of those this deleted.
    One its owner deleted meanwhile is left to the owner's DELETE, which removes its files too."""
    from core import jobs

    deleted = []
    for job_id in job_ids:
        with database.session() as session:
            if not jobs.forget_finished(session, job_id):
                continue
        storage.remove(job_id)
        deleted.append(job_id)
    return deleted


def _list_and_remove(jobs_dir: Path, found: list[Path], unkept: list[Path], where: str, *, remove: bool) -> int:
    """Print each folder `nad tidy` found with its size, remove it when asked, and sum up: the folders whose job
    is gone (`found`) and the output folders their finished job did not record (`unkept`). A folder still there
    after its removal fails the command, naming it."""
    import shutil

    from core.engine.commands import fail
    from core.storage import size_of

    sizes = {folder: size_of(folder) for folder in found + unkept}
    for folder in found + unkept:
        print(f"{folder.relative_to(jobs_dir)}  {sizes[folder]:>15,} bytes")
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
    left = [folder for folder in found + unkept if remove and folder.exists()]
    total = (f"{_folders(len(found))}, {sum(sizes[f] for f in found):,} bytes whose job is gone, and "
             f"{_folders(len(unkept), 'output ')}, {sum(sizes[f] for f in unkept):,} bytes their finished job "
             "did not record")
    if left:
        return fail(f"{len(left)} of {_folders(len(found) + len(unkept))} listed could not be removed "
                    f"({left[0]} first): check their owner and permissions ({where})")
    if remove:
        print(f"removed {total} ({where})")
    elif found or unkept:
        print(f"{total} ({where}); `nad tidy --remove` removes them")
    else:
        print(f"every folder has its job, and every finished job only the output it recorded ({where})")
    return 0


def _key_name(text: str) -> str:
    """1 to 100 printable characters (the database keeps 100): `nad keys list` shows each key on one line."""
    if not 0 < len(text) <= 100 or not text.isprintable():
        raise argparse.ArgumentTypeError("a key's name is 1 to 100 printable characters, on one line")
    return text


def setup_refused(error: Exception) -> str:
    """One line for what an operator must fix, said instead of a traceback (`nad keys`, `make up`): a NAD_
    setting pydantic refused (NAD_API_PORT=abc), named as the variable rather than pydantic's field, or the
    database NAD_DATABASE_URL names that cannot be used (a typo, a server down)."""
    from pydantic import ValidationError

    from core.engine.commands import validation_message

    if isinstance(error, ValidationError):
        return validation_message(error, lambda field: f"NAD_{field.upper()}")
    reason = str(getattr(error, "orig", None) or error).splitlines()[0]
    return f"cannot use the database of NAD_DATABASE_URL: {reason}"


def settings_or_exit(who: str) -> Settings:
    """The environment's settings for a process that starts from them (the worker, the API under uvicorn): one
    it cannot use stops it in one line, `who: NAD_...: why`, as `make up` says it."""
    from pydantic import ValidationError

    from core.settings import get_settings

    try:
        return get_settings()
    except ValidationError as error:
        sys.exit(f"{who}: {setup_refused(error)}")


def _keys(args: argparse.Namespace) -> int:
    from core import keys
    from core.database import Database
    from core.engine.commands import fail
    from core.settings import get_settings

    database = Database(get_settings().database_url)
    database.migrate()
    with database.session() as session:
        if args.action == "create":
            key, text = keys.create_key(session, args.name)
            print(f"created key {key.id} ({key.name}); it is shown only now:")
            print(text)
        elif args.action == "revoke":
            if not keys.revoke_key(session, args.key_id):
                return fail(f"no live key {args.key_id}")
            print(f"revoked key {args.key_id}")
        else:
            for key in keys.list_keys(session):
                revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
                print(f"{key.id}  {key.created_at:%Y-%m-%d %H:%M}  {revoked:<24}  {key.name}")
    return 0


def _add_submit_command(commands: argparse._SubParsersAction) -> None:
    """submit: the HTTP client of a running service."""
    from pathlib import Path

    parser = commands.add_parser(
        "submit", help="sanitize a checkpoint on a running service and download the result",
        description="Upload a job, follow it to its end, download the cleansed checkpoint and print the "
                    "before/after ACC and ASR. NAD_API_URL and NAD_API_KEY are the defaults of --url, --key.")
    parser.add_argument("model", type=Path, help="the suspect checkpoint (safetensors or torch.save)")
    parser.add_argument("clean_data", type=Path, help="clean labelled images: zip/tar(.gz) of folders or npz")
    parser.add_argument("--params", required=True,
                        help='job parameters as JSON or @file.json: {"arch": "wrn-16-1", "num_classes": 10}')
    parser.add_argument("--test-data", type=Path, help="labelled clean test images (default: a hold-out)")
    parser.add_argument("--poison-data", type=Path, help="triggered images with their true labels, for ASR")
    parser.add_argument("--teacher", type=Path, help="a ready teacher checkpoint")
    parser.add_argument("--out", type=Path, help="where to save the result (default: <job id>.safetensors)")
    parser.add_argument("--url", help="the service's base URL (default: NAD_API_URL or http://127.0.0.1:8000)")
    parser.add_argument("--key", help="API key (default: NAD_API_KEY)")

    def run(args: argparse.Namespace) -> int:
        from core.client import run_submit

        return run_submit(args)

    parser.set_defaults(run=run)


if __name__ == "__main__":
    sys.exit(main())
