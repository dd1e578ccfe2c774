"""``specstream acls``: least-privilege ACLs for one run, printed for ``kafka-acls`` or applied.

The role -> ACL table is ``pipeline.transport.acls``; this command only chooses the output.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pipeline.app.cli_common import BootstrapOption, OptionalConfig, RunIdOption, console, load, run_transport
from pipeline.core.errors import OptionError
from pipeline.transport.acls import kafka_acls_args, render_shell, run_bindings

__all__ = ("acls",)


def _user(role: str) -> object:
    return typer.Option(f"--{role}", help=f"The {role} principal's SASL user (User:NAME or NAME).")


def acls(
    run_id: RunIdOption = None,
    config: OptionalConfig = None,
    bootstrap: BootstrapOption = None,
    source: Annotated[Optional[str], _user("source")] = None,
    generate: Annotated[Optional[str], _user("generate")] = None,
    train: Annotated[Optional[str], _user("train")] = None,
    read_only: Annotated[Optional[str], _user("read-only")] = None,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply", help="Create the ACLs through the admin API (the config's user must be an admin)."
        ),
    ] = False,
) -> None:
    """Each role's least privilege on one run: print `kafka-acls` arguments, one call a line
    (infra/acls.sh runs them), or --apply them with the config's (admin) credentials."""
    users = {role: user for role, user in
             (("source", source), ("generate", generate), ("train", train), ("read-only", read_only)) if user}  # fmt: skip
    if not users:
        raise OptionError(
            "--source", "no role is given", "name at least one of --source, --generate, --train, --read-only"
        )
    if not apply:
        if run_id is None and config is None:
            raise OptionError("--run-id", "is missing", "pass --run-id or --config")
        name = run_id or load(config).run_id  # type: ignore[arg-type]
        typer.echo(render_shell(kafka_acls_args(run_bindings(name, users))), nl=False)
        return
    name, transport = run_transport(run_id, config, bootstrap)
    bindings = run_bindings(name, users)
    with transport.admin() as admin:
        admin.create_acls(bindings)  # type: ignore[attr-defined]
    console.print(
        f"run {name}: {len(bindings)} ACL bindings for {', '.join(f'{r} {u}' for r, u in users.items())}"
    )
