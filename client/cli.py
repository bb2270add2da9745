"""The `krasis` command: every subcommand speaks to krasisd through krasis.client only.

Errors reach the user as one line, ``Error: ...``, with exit status 1; a daemon that is not
running gets a line saying how to start it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from . import service
from .client import Client, ConnectError, KrasisError, ResponseError
from .display import (
    format_show,
    human_bytes,
    prefix_cache_cell,
    processor_split,
    table,
    time_ago,
    time_until,
)
from .progress import Progress
from .repl import Repl, format_stats, stream_text

SYSTEM_SOCKET_DIR = "/run/krasis/"


def client_version() -> str:
    """The installed krasis version."""
    try:
        return metadata.version("krasis")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def start_hint(address: str) -> str:
    """How to start the daemon expected at ``address``."""
    if address.startswith(SYSTEM_SOCKET_DIR):
        return "start it with `sudo systemctl start krasisd` (or `krasis serve`)"
    return "start it with `krasis serve` or `systemctl --user start krasisd`"


# -- models ------------------------------------------------------------------------------------

def cmd_pull(args: argparse.Namespace) -> int:
    """Download a model and build its caches, with progress bars."""
    _pull(Client(), args.model, args.insecure)
    return 0


def _pull(client: Client, model: str, insecure: bool = False) -> None:
    with Progress() as progress:
        for event in client.pull(model, insecure=insecure):
            progress.update(event)


def cmd_create(args: argparse.Namespace) -> int:
    """Register a model from a local folder of safetensors and config files."""
    folder = Path(args.from_dir).expanduser()
    if not folder.is_dir():
        raise KrasisError(f"--from {args.from_dir}: no such directory")
    with Progress() as progress:
        for event in Client().create(args.model, folder):
            progress.update(event)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List the models on disk."""
    rows = [[m.get("name") or m.get("model", ""), _short_digest(m.get("digest")),
             human_bytes(m.get("size")), time_ago(m.get("modified_at"))]
            for m in Client().list()]
    print(table(["NAME", "ID", "SIZE", "MODIFIED"], rows))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    """List the loaded models: size, GPU/CPU split and when they unload."""
    rows = [[m.get("name") or m.get("model", ""), _short_digest(m.get("digest")),
             human_bytes(m.get("size")), processor_split(m.get("size"), m.get("size_vram")),
             prefix_cache_cell(m.get("prefix_cache")), time_until(m.get("expires_at"))]
            for m in Client().ps()]
    print(table(["NAME", "ID", "SIZE", "PROCESSOR", "CACHE", "UNTIL"], rows))
    return 0


def _short_digest(digest: str | None) -> str:
    return (digest or "").removeprefix("sha256:")[:12] or "-"


def cmd_show(args: argparse.Namespace) -> int:
    """Show a model's details (or one part of them)."""
    info = Client().show(args.model)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    for part in ("parameters", "template", "system", "license"):
        if getattr(args, part):
            print(info.get(part) or f"No {part} was specified for this model.")
            return 0
    print(format_show(info))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete models from disk."""
    client = Client()
    for model in args.models:
        client.delete(model)
        print(f"deleted '{model}'")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Unload a running model now."""
    client = Client()
    loaded = {name for m in client.ps() for name in (m.get("name"), m.get("model")) if name}
    if not {args.model, f"{args.model}:latest"} & loaded:
        raise KrasisError(f"model '{args.model}' is not loaded (see `krasis ps`)")
    client.stop(args.model)
    return 0


# -- run ---------------------------------------------------------------------------------------

def keep_alive_value(text: str | None) -> int | float | str | None:
    """--keepalive as the API takes it: seconds as a number, else a duration like '10m'."""
    if text is None:
        return None
    from krasisd.config import parse_duration_s

    try:
        parse_duration_s(text)
    except ValueError:
        raise KrasisError(f"invalid --keepalive {text!r}: use a duration like 10m, 1h30m, "
                          "0 (unload at once) or -1 (keep loaded)") from None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


def ensure_pulled(client: Client, model: str, assume_yes: bool) -> None:
    """Offer to pull a model that is not on disk: ask on a terminal, pull with --yes."""
    try:
        client.show(model)
        return
    except ResponseError as exc:
        if exc.status_code != 404:
            raise
    if not assume_yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise KrasisError(f"model '{model}' not found; pull it with `krasis pull {model}` "
                              "or pass --yes to pull it now")
        answer = input(f"Model '{model}' is not pulled yet. Pull it now? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise KrasisError(f"model '{model}' not found; pull it with `krasis pull {model}`")
    _pull(client, model)


def cmd_run(args: argparse.Namespace) -> int:
    """Answer one prompt (argument or piped stdin), or start an interactive session."""
    client = Client()
    keep_alive = keep_alive_value(args.keepalive)
    ensure_pulled(client, args.model, args.yes)
    prompt = " ".join(args.prompt)
    interactive = not prompt and sys.stdin.isatty()
    if not sys.stdin.isatty():
        piped = sys.stdin.read().rstrip("\n")
        prompt = " ".join(text for text in (piped, prompt) if text)
    if interactive:
        _load_with_notice(client, args.model, keep_alive)
        return Repl(client, args.model, system=args.system, format=args.format,
                    keep_alive=keep_alive, verbose=args.verbose).run()
    if not prompt.strip():
        client.load(args.model, keep_alive)  # as ollama: no prompt just loads the model
        return 0
    parts = client.generate(args.model, prompt, system=args.system, format=args.format,
                            keep_alive=keep_alive)
    answer, final = stream_text(parts, sys.stdout, "response")
    if answer and not answer.endswith("\n"):
        print()
    if args.verbose and final:
        print(format_stats(final), file=sys.stderr)
    return 0


def _load_with_notice(client: Client, model: str, keep_alive) -> None:
    """Load the model before the first prompt, saying so while it takes."""
    notice = sys.stderr.isatty()
    if notice:
        sys.stderr.write(f"Loading {model}...")
        sys.stderr.flush()
    try:
        client.load(model, keep_alive)
    finally:
        if notice:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# -- daemon and service ------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """Run krasisd in the foreground."""
    try:
        from krasisd.__main__ import main as daemon_main
    except ImportError as exc:
        raise KrasisError(f"the daemon cannot start: {exc}") from None
    return daemon_main(args.daemon_args) or 0


def cmd_version(args: argparse.Namespace) -> int:
    """Print the daemon's and the client's versions."""
    mine = client_version()
    try:
        daemon = Client().version()
    except ConnectError:
        print("Warning: could not connect to a running krasisd")
        print(f"Warning: client version is {mine}")
        return 0
    print(f"krasisd version is {daemon}")
    if daemon != mine:
        print(f"Warning: client version is {mine}")
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    """Write the systemd unit files and print the commands that enable them."""
    dest = Path(args.dest).expanduser() if args.dest else None
    plan = service.plan_install(args.user, dest=dest, krasisd=args.krasisd)
    for path, text in plan.files.items():
        if args.dry_run:
            print(f"# {path}\n{text}")
    if not args.dry_run:
        service.write_files(plan)
        for path in plan.files:
            print(f"wrote {path}")
    for warning in plan.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    print("Then run:" if args.dry_run else "Now run:")
    for command in plan.commands:
        print(f"  {command}")
    return 0


# -- parser ------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose ``intermixed=True`` subcommands take options anywhere on the line
    (``krasis run MODEL --verbose hi``), as Ollama's do; ``--`` still ends the options."""

    def __init__(self, *args, intermixed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._intermixing:  # parse_known_intermixed_args calls back
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(prog="krasis", description="Run Mixture-of-Experts models with krasisd.")
    parser.add_argument("-v", "--version", action="store_true", help="show version information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, handler, help_text: str, aliases=(), **kwargs) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases,
                                 **kwargs)
        command.set_defaults(handler=handler)
        return command

    # serve: every argument after it is krasisd's (main() hands them on), --help included
    add("serve", cmd_serve, "run krasisd in the foreground", add_help=False)
    pull = add("pull", cmd_pull, "download a model and build its caches")
    pull.add_argument("model")
    pull.add_argument("--insecure", action="store_true", help="allow insecure downloads")
    create = add("create", cmd_create, "create a model from a local folder")
    create.add_argument("model")
    create.add_argument("-f", "--from", dest="from_dir", required=True, metavar="DIR",
                        help="folder with config.json, tokenizer and safetensors files")
    _add_run(add("run", cmd_run, "chat with a model, or answer one prompt", intermixed=True))
    add("list", cmd_list, "list models on disk", aliases=["ls"])
    add("ps", cmd_ps, "list loaded models")
    show = add("show", cmd_show, "show a model's details")
    show.add_argument("model")
    show.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    for part in ("parameters", "template", "system", "license"):
        show.add_argument(f"--{part}", action="store_true", help=f"show only the {part}")
    rm = add("rm", cmd_rm, "delete models from disk")
    rm.add_argument("models", nargs="+", metavar="model")
    stop = add("stop", cmd_stop, "unload a running model now")
    stop.add_argument("model")
    add("version", cmd_version, "show the daemon's and the client's versions")
    _add_service(sub)
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="a prompt; without one, piped stdin or a chat "
                     "(options may come anywhere; after --, everything is prompt)")
    run.add_argument("--verbose", action="store_true", help="show timings and token rates")
    run.add_argument("--format", choices=["json"], help="answer in JSON")
    run.add_argument("--keepalive", metavar="DURATION",
                     help="how long the model stays loaded (e.g. 10m, -1 for ever)")
    run.add_argument("--system", help="system message")
    run.add_argument("-y", "--yes", action="store_true",
                     help="pull the model without asking when it is missing")


def _add_service(sub) -> None:
    service_parser = sub.add_parser("service", help="install the systemd units",
                                    description="install the systemd units")
    actions = service_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser("install", help="write the unit files (never runs sudo)",
                                 description="write the unit files (never runs sudo)")
    install.set_defaults(handler=cmd_service_install)
    install.add_argument("--user", action="store_true",
                         help="user units in ~/.config/systemd/user (default: system units)")
    install.add_argument("--dry-run", action="store_true", help="print the files, write nothing")
    install.add_argument("--dest", metavar="DIR", help="write the units to DIR instead")
    install.add_argument("--krasisd", metavar="COMMAND",
                         help="the ExecStart command (default: this installation's krasisd)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `krasis` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        args.daemon_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version and not args.command:
        return cmd_version(args)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except ConnectError as exc:
        print(f"Error: {exc}; {start_hint(exc.address)}", file=sys.stderr)
    except KrasisError as exc:
        print(f"Error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  the reader went away (| head)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
