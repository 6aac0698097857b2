"""``ktizo gitops …``: the GitOps repository (KTIZO_GITOPS_REPO) every change to a machine is committed to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ktizo.cli.common import fail, print_json, reports_errors_without_transaction, safe, state
from ktizo.services.context import Actor

if TYPE_CHECKING:
    from ktizo.services.gitops import GitopsService

app = typer.Typer(
    help="The GitOps repository: Tinkerbell Hardware manifests and Ktizo Device documents, a commit per change "
    "(set KTIZO_GITOPS_REPO, and KTIZO_GITOPS_REMOTE to push).",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]


def _gitops(ctx: typer.Context) -> GitopsService:
    gitops = state(ctx).services().gitops
    if gitops is None:
        fail("no GitOps repository: set KTIZO_GITOPS_REPO to a local path (Ktizo runs `git init` there if it is empty)")
        raise AssertionError("unreachable")
    return gitops


@app.command("sync")
@reports_errors_without_transaction
def sync(ctx: typer.Context) -> None:
    """Rewrite the whole tree from the database; commit (as `cli`) only if something changed, then push."""
    result = _gitops(ctx).sync(Actor.cli())
    for line in result.changes:
        typer.echo(f"  {safe(line)}")
    if result.commit is None:
        typer.echo("the repository already matches the database: no commit")
    else:
        typer.echo(f"committed {result.commit[:12]} ({len(result.changes)} file(s) changed)")
    if result.error:
        typer.secho(f"warning: not pushed, will retry: {safe(result.error)}", err=True, fg="yellow")
    elif result.pushed:
        typer.echo("pushed")


@app.command("status")
@reports_errors_without_transaction
def status(ctx: typer.Context, as_json: Json = False) -> None:
    """The repository, its head, what the remote has, the pending changes and the last push error."""
    st = _gitops(ctx).status()
    if as_json:
        print_json(
            {
                "repo": st.repo,
                "remote": st.remote,
                "branch": st.branch,
                "head": st.head,
                "pushed": st.pushed,
                "unpushed": st.unpushed,
                "pending_events": st.pending_events,
                "last_error": st.last_error,
                "updated_at": st.updated_at.isoformat() if st.updated_at else None,
            }
        )
        return
    typer.echo(f"repository: {safe(st.repo)} (branch {safe(st.branch)})")
    typer.echo(f"head:       {st.head or '(no commit yet)'}")
    if st.remote is None:
        typer.echo("remote:     (none: KTIZO_GITOPS_REMOTE not set)")
    else:
        typer.echo(f"remote:     {safe(st.remote)}")
        typer.echo(f"pushed:     {st.pushed or '(nothing yet)'}")
        lag = "unknown" if st.unpushed is None else str(st.unpushed)
        typer.echo(f"unpushed:   {lag} commit(s)")
    typer.echo(f"pending:    {st.pending_events} change(s) not yet committed")
    if st.updated_at:
        typer.echo(f"updated:    {st.updated_at:%Y-%m-%d %H:%M:%S} UTC")
    if st.last_error:
        typer.echo(f"last error: {safe(st.last_error)}")
