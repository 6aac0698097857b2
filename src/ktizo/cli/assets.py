"""``ktizo assets …``: Talos kernel and initramfs for network boot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ktizo.cli.common import fail, print_json, print_table, reports_errors, state
from ktizo.services.context import Actor

if TYPE_CHECKING:
    from ktizo.services.assets import AssetService

app = typer.Typer(help="Talos boot assets (vmlinuz, initramfs.xz).", no_args_is_help=True)


def _service(ctx: typer.Context) -> AssetService:
    from ktizo.services.assets import AssetService

    st = state(ctx)
    return AssetService(st.services().db, st.settings.assets_dir, st.settings.assets_base_url)


class _Bars:
    """One progress bar per file, on stderr so that stdout stays the command's result."""

    def __init__(self) -> None:
        self.label: str | None = None
        self.bar: Any = None
        self.shown = 0

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if label != self.label:
            self.close()
            self.label = label
            self.bar = typer.progressbar(length=total, label=label, file=sys.stderr)
            self.bar.__enter__()
            self.shown = 0
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@app.command()
@reports_errors
def fetch(
    ctx: typer.Context,
    talos_version: Annotated[
        str, typer.Option("--talos-version", metavar="VERSION", help="Talos release, e.g. v1.13.0")
    ],
    arch: Annotated[str, typer.Option(metavar="ARCH,…", help="Comma-separated: amd64, arm64")] = "amd64,arm64",
    checksums: Annotated[
        Path | None,
        typer.Option(help="A sha256sum listing (e.g. a release's sha256sum.txt) to verify against", exists=True),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Image factory URL with schematic [default: KTIZO_ASSETS_BASE_URL]"),
    ] = None,
) -> None:
    """Download vmlinuz and initramfs.xz from the image factory.

    An interrupted download resumes where it stopped."""
    from ktizo.pxe.assets import AssetError, parse_sums

    service = _service(ctx)
    if base_url:
        service.factory_url = base_url
    sums = parse_sums(checksums.read_text()) if checksums else None
    bars = _Bars()
    try:
        stored = service.fetch(Actor.cli(), talos_version, arch.split(","), checksums=sums, progress=bars)
    except AssetError as exc:
        bars.close()
        fail(str(exc))
        return
    bars.close()
    for f in stored:
        resumed = f" (resumed at {f.resumed_from} bytes)" if f.resumed_from else ""
        typer.echo(f"{f.path}  {f.size} bytes  sha256 {f.sha256}{resumed}")


@app.command("import")
@reports_errors
def import_(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Where the files are")],
    talos_version: Annotated[
        str | None,
        typer.Option("--talos-version", metavar="VERSION", help="Release of a flat directory (vmlinuz-amd64 …)"),
    ] = None,
) -> None:
    """Import assets copied from elsewhere.

    For sites without internet access."""
    from ktizo.pxe.assets import AssetError

    try:
        stored = _service(ctx).import_dir(Actor.cli(), directory, talos_version)
    except AssetError as exc:
        fail(str(exc))
        return
    for f in stored:
        typer.echo(f"{f.path}  {f.size} bytes  sha256 {f.sha256}")


@app.command("list")
@reports_errors
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """The Talos releases and architectures Ktizo can netboot."""
    sets = _service(ctx).inventory()
    if as_json:
        print_json(
            [
                {
                    "version": s.version,
                    "arch": s.arch,
                    "complete": s.complete,
                    "files": {n: {"size": f.size, "sha256": f.sha256} for n, f in s.files.items()},
                }
                for s in sets
            ]
        )
        return
    if not sets:
        typer.echo("no boot assets yet: `ktizo assets fetch --talos-version V` or `ktizo assets import DIR`")
        return
    rows = [
        (s.version, s.arch, "yes" if s.complete else "no", sum(f.size for f in s.files.values()), ", ".join(s.files))
        for s in sets
    ]
    print_table(("version", "arch", "complete", "bytes", "files"), rows)
