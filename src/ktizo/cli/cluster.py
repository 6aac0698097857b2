"""``ktizo cluster …``: settings, generation, secrets, base configs, talosconfig."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from ktizo.cli.common import choices, print_json, reports_errors, state, warn
from ktizo.domain.devices import Role
from ktizo.services.context import Actor

app = typer.Typer(help="Cluster settings, config generation, secrets and base configs.", no_args_is_help=True)
secrets_app = typer.Typer(help="The cluster's secrets bundle (`talosctl gen secrets` format).", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")

ReadableFile = Annotated[Path, typer.Argument(metavar="FILE", exists=True, dir_okay=False, readable=True)]
RoleArg = Annotated[Role, typer.Argument(**choices(Role, "ROLE"))]


@app.command()
@reports_errors
def show(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Cluster settings, secrets and base configs in place."""
    view = asdict(state(ctx).services().cluster.settings())
    if as_json:
        print_json(view)
        return
    bases = view.pop("bases")
    for key, value in view.items():
        shown = ", ".join(value) if isinstance(value, list) else ("" if value is None else value)
        typer.echo(f"{key + ':':<22}{shown}")
    for role, info in bases.items():
        where = f"{info['source']}" if info["present"] else "missing"
        typer.echo(f"{'base ' + role + ':':<22}{where}")


@app.command("set")
@reports_errors
def set_(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option("--name", metavar="NAME", help="Cluster name")] = None,
    endpoint: Annotated[
        str | None, typer.Option(metavar="URL", help="Control plane endpoint, https://HOST:6443")
    ] = None,
    talos_version: Annotated[str | None, typer.Option(metavar="VERSION", help="v1.11, v1.12 or v1.13")] = None,
    kubernetes_version: Annotated[str | None, typer.Option(metavar="VERSION", help="e.g. 1.33.0")] = None,
    install_disk: Annotated[str | None, typer.Option(metavar="DISK", help="e.g. /dev/sda")] = None,
    install_image: Annotated[str | None, typer.Option(metavar="IMAGE", help="Installer image reference")] = None,
    pod_subnet: Annotated[
        list[str] | None, typer.Option(metavar="CIDR", help="Pod CIDR (repeat for dual stack)")
    ] = None,
    service_subnet: Annotated[
        list[str] | None, typer.Option(metavar="CIDR", help="Service CIDR (repeat for dual stack)")
    ] = None,
    dns_domain: Annotated[
        str | None, typer.Option(metavar="DOMAIN", help="Kubernetes cluster DNS domain [default: cluster.local]")
    ] = None,
    cert_san: Annotated[
        list[str] | None, typer.Option(metavar="NAME|IP", help="Extra certificate SAN (repeatable)")
    ] = None,
    gateway: Annotated[str | None, typer.Option(metavar="IP", help="Default gateway for static IPs")] = None,
    nameserver: Annotated[
        list[str] | None, typer.Option(metavar="IP", help="Nameserver for static IPs (repeatable)")
    ] = None,
) -> None:
    """Change cluster settings; options not given stay."""
    given: dict[str, Any] = {
        "cluster_name": name,
        "endpoint": endpoint,
        "talos_version": talos_version,
        "kubernetes_version": kubernetes_version,
        "install_disk": install_disk,
        "install_image": install_image,
        "pod_subnets": pod_subnet,
        "service_subnets": service_subnet,
        "dns_domain": dns_domain,
        "cert_sans": cert_san,
        "gateway": gateway,
        "nameservers": nameserver,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if not changes:
        typer.echo("nothing to change; see `ktizo cluster set --help`")
        raise typer.Exit(2)
    cluster = state(ctx).services().cluster
    before = cluster.settings().revision
    view = cluster.update(Actor.cli(), changes)
    if view.revision == before:
        typer.echo(f"cluster settings unchanged (revision {view.revision}): they already had those values")
    else:
        typer.echo(f"cluster settings updated (revision {view.revision})")


@app.command()
@reports_errors
def generate(
    ctx: typer.Context,
    rotate_secrets: Annotated[
        bool, typer.Option("--rotate-secrets", help="Make a new secrets bundle: a NEW cluster identity")
    ] = False,
) -> None:
    """Generate the controlplane and worker base configs.

    From the cluster settings; the secrets bundle is made on first use."""
    if rotate_secrets:
        typer.confirm(
            "Rotating secrets makes a new cluster identity: nodes configured with the old one will not join it. "
            "Continue?",
            abort=True,
        )
    typer.echo("generating base configs (a new RSA-4096 service-account key takes a moment)…", err=True)
    sizes = state(ctx).services().cluster.generate(Actor.cli(), rotate_secrets=rotate_secrets)
    for role, size in sizes.items():
        typer.echo(f"{role} base config generated ({size} bytes)")


@app.command("import-base")
@reports_errors
def import_base(ctx: typer.Context, role: RoleArg, file: ReadableFile) -> None:
    """Install a Talos config as the base config for ROLE.

    It is validated first (e.g. a config from `talosctl gen config`)."""
    services = state(ctx).services()
    services.cluster.put_base(Actor.cli(), role, file.read_bytes())
    typer.echo(f"{role.value} base config installed")


@app.command("export-base")
@reports_errors
def export_base(ctx: typer.Context, role: RoleArg) -> None:
    """Print the base config of ROLE.

    A controlplane config holds the cluster's CA keys."""
    sys.stdout.write(state(ctx).services().cluster.get_base(role).decode())


@app.command()
@reports_errors
def talosconfig(ctx: typer.Context) -> None:
    """Print a talosconfig for `talosctl`.

    With a fresh admin certificate, and the approved control planes' IPs as endpoints."""
    text = state(ctx).services().cluster.talosconfig(Actor.cli())
    sys.stdout.write(text)
    document = yaml.safe_load(text)
    if not document["contexts"][document["context"]].get("endpoints"):
        warn(
            "no approved control plane with an IP yet, so the talosconfig has no endpoints: approve one "
            "(`ktizo devices approve MAC --role controlplane --ip CIDR`) and run this again, or add them with "
            "`talosctl config endpoint IP`"
        )


@secrets_app.command("import")
@reports_errors
def secrets_import(
    ctx: typer.Context,
    file: ReadableFile,
    rotate_secrets: Annotated[bool, typer.Option("--rotate-secrets", help="Replace a stored bundle")] = False,
) -> None:
    """Adopt an existing cluster's secrets (from `talosctl gen secrets`)."""
    state(ctx).services().cluster.import_secrets(Actor.cli(), file.read_bytes(), replace=rotate_secrets)
    typer.echo("secrets bundle imported; run `ktizo cluster generate` to render base configs from it")


@secrets_app.command("export")
@reports_errors
def secrets_export(ctx: typer.Context) -> None:
    """Print the secrets bundle in `talosctl gen secrets` format."""
    sys.stdout.write(state(ctx).services().cluster.export_secrets(Actor.cli()))
