"""`xencr vhd ...`: the engine's tools for users.

Each command is one coarse engine call; this module only parses arguments, picks outputs and
renders reports. Errors become one ``xencr: error: ...`` line and exit code 1 (see ``errors``).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping
from enum import StrEnum
from typing import IO, Annotated, Any, Literal

import typer

from xencr.cli.errors import CliError, describe, reported
from xencr.cli.progress import Progress
from xencr.cli.render import ranges, render_info
from xencr.units import human_bytes

vhd_app = typer.Typer(
    help="Inspect, check, convert, stream and merge VHD files.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


class FromFormat(StrEnum):
    auto = "auto"
    raw = "raw"
    vhd = "vhd"


class ToFormat(StrEnum):
    raw = "raw"
    dynamic = "dynamic"
    fixed = "fixed"


class TargetFormat(StrEnum):
    auto = "auto"
    raw = "raw"
    vhd = "vhd"


Parents = Annotated[
    list[str] | None,
    typer.Option(
        "--parent",
        "-p",
        metavar="P",
        help="Ancestor of a differencing disk, nearest first (repeat for each). "
        "Default: found through the parent locators.",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]


def detect_format(path: str) -> Literal["raw", "vhd"]:
    """``vhd`` when the file carries a VHD footer cookie at its start or end, else ``raw``."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = f.seek(0, os.SEEK_END)
        tail = b""
        if size >= 512:
            f.seek(size - 512)
            tail = f.read(8)
    return "vhd" if b"conectix" in (head, tail) else "raw"


def parse_size(text: str) -> int:
    """``64K``, ``2M``, ``1G`` or a plain byte count (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a size such as 64K or 2M") from None
    return n


def parse_power_of_two(text: str, what: str = "the granularity") -> int:
    n = parse_size(text)
    if n < 512 or n & (n - 1):
        raise typer.BadParameter(f"{text!r}: {what} must be a power of two of at least 512 bytes")
    return n


def _binary_stdout() -> IO[bytes]:
    if sys.stdout.isatty():
        raise typer.BadParameter("refusing to write binary data to a terminal; use -o FILE or a redirect")
    return sys.stdout.buffer


def _stdout_fd() -> int | None:
    """The real stdout file descriptor, or None when stdout is not a file (tests, IDEs)."""
    try:
        sys.stdout.flush()
        return sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


@vhd_app.command()
@reported
def info(
    file: Annotated[str, typer.Argument(metavar="FILE", help="A VHD file (fixed, dynamic or differencing).")],
    parent: Parents = None,
    as_json: JsonFlag = False,
) -> None:
    """Show every footer and header field, the parent locators, BAT statistics and the chain.

    Example:  xencr vhd info child.vhd --parent base.vhd --json
    """
    from xencr import _engine as eng

    report = eng.info(file, parent)
    typer.echo(json.dumps(report, indent=2, sort_keys=False) if as_json else render_info(report))


@vhd_app.command()
@reported
def check(
    files: Annotated[list[str], typer.Argument(help="VHD files to validate.", metavar="FILE...")],
    parent: Parents = None,
    file_only: Annotated[
        bool, typer.Option("--file-only", help="Do not require a differencing disk's parents.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Validate VHD files: exit 0 when all are valid, 1 with one line per problem otherwise.

    Checks cookies, versions, both checksums, the footer copy, BAT bounds and overlaps, the block
    size, the table size and the parent locators, then that a differencing disk's chain opens
    (its parents found and their UUIDs matching), unless --file-only.

    Example:  xencr vhd check base.vhd child.vhd
    """
    from xencr import _engine as eng

    results: dict[str, list[str]] = {}
    for path in files:
        problems: list[str] = []
        try:
            problems = list(eng.check(path, parent))
            if not problems and not file_only:
                # A valid file whose parent is missing or wrong is not a usable disk.
                eng.chain(path, parent)
        except (OSError, eng.VhdError) as err:
            problems.append(describe(err))
        results[path] = problems
    if as_json:
        typer.echo(json.dumps({p: {"valid": not pr, "problems": pr} for p, pr in results.items()}, indent=2))
    else:
        for path, problems in results.items():
            if problems:
                for problem in problems:
                    # A missing file is its own whole line: "no such file: PATH".
                    typer.echo(problem if problem == f"no such file: {path}" else f"{path}: {problem}")
            else:
                typer.echo(f"{path}: ok")
    if any(results.values()):
        raise typer.Exit(1)


@vhd_app.command()
@reported
def cat(
    file: Annotated[str, typer.Argument(metavar="FILE", help="A VHD file; its chain is read through.")],
    parent: Parents = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", metavar="OUT", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Write the virtual content (read sector-exactly through the chain) as raw bytes.

    Example:  xencr vhd cat child.vhd -o disk.raw
    """
    from xencr import _engine as eng

    size = int(eng.virtual_size(file))
    if output is not None:
        with Progress(f"cat {file}", size, watch=output) as p:
            p.done(int(eng.cat(file, output, parent)))
        return
    out = _binary_stdout()
    fd = _stdout_fd()
    with Progress(f"cat {file}", size) as p:
        if fd is not None:
            out.flush()
            p.done(int(eng.cat(file, fd, parent)))
        else:
            chunk = 4 << 20
            for off in range(0, size, chunk):
                out.write(eng.read(file, off, min(chunk, size - off), parent))
            out.flush()
            p.done(size)


@vhd_app.command()
@reported
def convert(
    src: Annotated[str, typer.Argument(metavar="IN", help="Source: a raw image or a VHD.")],
    dst: Annotated[str, typer.Argument(metavar="OUT", help="Destination (overwritten).")],
    from_format: Annotated[
        FromFormat, typer.Option("--from", help="Source format; auto looks for a VHD footer.")
    ] = FromFormat.auto,
    to_format: Annotated[ToFormat, typer.Option("--to", help="Destination format.")] = ToFormat.dynamic,
    parent: Parents = None,
    block_size: Annotated[
        str,
        typer.Option("--block-size", metavar="SIZE", help="Block size of a dynamic output (power of two)."),
    ] = "2M",
    as_json: JsonFlag = False,
) -> None:
    """Convert between raw images and fixed or dynamic VHDs (zero blocks are never allocated).

    A differencing source is read through its chain, so this also flattens a chain.

    Example:  xencr vhd convert disk.raw disk.vhd --to dynamic
    """
    src_format: Literal["raw", "vhd"] = (
        detect_format(src)
        if from_format is FromFormat.auto
        else ("raw" if from_format is FromFormat.raw else "vhd")
    )
    dst_format: Literal["raw", "dynamic", "fixed"] = (
        "raw" if to_format is ToFormat.raw else "fixed" if to_format is ToFormat.fixed else "dynamic"
    )
    bs = parse_power_of_two(block_size, "the block size")
    from xencr import _engine as eng

    size = os.stat(src).st_size if src_format == "raw" else int(eng.virtual_size(src))
    with Progress(f"convert {src}", size, watch=dst) as p:
        report = eng.convert(
            src, dst, src_format=src_format, dst_format=dst_format, parents=parent, block_size=bs
        )
        p.done(int(report.get("bytes_written", 0)))
    details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"converted {src} ({src_format}) -> {dst} ({to_format.value}): {details}")


def _stream_summary(report: Mapping[str, Any]) -> str:
    kind = "delta" if report.get("disk_type") == "differencing" else "full"
    return (
        f"{kind} stream: {report['bytes_out']} bytes, {report['blocks']} blocks"
        f" ({report['zero_blocks_dropped']} zero blocks dropped), virtual size {report['virtual_size']}"
    )


@vhd_app.command()
@reported
def stream(
    node: Annotated[str, typer.Argument(metavar="NODE", help="The VHD (chain leaf) to export.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base", "-b", metavar="BASE", help="Export only what changed since this node (delta stream)."
        ),
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", metavar="OUT", help="Write here instead of stdout.")
    ] = None,
    parent: Parents = None,
    base_parent: Annotated[
        list[str] | None, typer.Option("--base-parent", metavar="P", help="Ancestors of BASE, nearest first.")
    ] = None,
    skip_zero_blocks: Annotated[
        bool, typer.Option("--skip-zero-blocks", help="Leave all-zero blocks out of a full stream.")
    ] = False,
    rate_limit: Annotated[
        str | None, typer.Option("--rate-limit", metavar="RATE", help="Bytes per second, e.g. 100M.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write an XAPI-style VHD export stream (what /export_raw_vdi?format=vhd sends): full, or a
    delta against --base.

    Example:  xencr vhd stream child.vhd --base base.vhd -o delta.vhd
    """
    from xencr import _engine as eng

    limit = parse_size(rate_limit) if rate_limit else None
    kwargs: dict[str, Any] = {
        "parents": parent,
        "base_parents": base_parent,
        "skip_zero_blocks": skip_zero_blocks,
    }
    total = int(eng.stream_length(node, base, **kwargs))
    dst: int | str
    if output is not None:
        dst = output
    else:
        _binary_stdout()
        fd = _stdout_fd()
        if fd is None:
            raise CliError("stdout is not a file descriptor; use -o OUT")
        dst = fd
    with Progress(f"stream {node}", total, watch=output) as p:
        report = eng.export_stream(node, dst, base, rate_limit=limit, **kwargs)
        p.done(int(report["bytes_out"]))
    # The summary goes to stderr when the stream itself is on stdout.
    typer.echo(json.dumps(report, indent=2) if as_json else _stream_summary(report), err=output is None)


@vhd_app.command()
@reported
def apply(
    stream_path: Annotated[str, typer.Argument(metavar="STREAM", help="A VHD stream file, or - for stdin.")],
    target: Annotated[str, typer.Argument(metavar="TARGET", help="Raw file or VHD leaf to write into.")],
    target_format: Annotated[
        TargetFormat, typer.Option("--format", help="Target format; auto looks for a VHD footer.")
    ] = TargetFormat.auto,
    require_full_bitmaps: Annotated[
        bool,
        typer.Option("--require-full-bitmaps", help="Reject partial bitmaps, as XAPI exports have none."),
    ] = False,
    parent: Parents = None,
    as_json: JsonFlag = False,
) -> None:
    """Apply a VHD stream with XAPI import semantics: only sectors whose bitmap bit is set are
    written, at their virtual offsets. All metadata is validated before the first write.

    Example:  xencr vhd apply delta.vhd replica.raw --format raw
    """
    fmt: Literal["raw", "vhd"]
    if target_format is TargetFormat.auto:
        fmt = detect_format(target) if os.path.exists(target) else "raw"
    else:
        fmt = "raw" if target_format is TargetFormat.raw else "vhd"
    src: int | str = 0 if stream_path == "-" else stream_path
    total = None if stream_path == "-" else os.stat(stream_path).st_size
    from xencr import _engine as eng

    with Progress(f"apply {stream_path}", total) as p:
        report = eng.apply_stream(
            src, target, target_format=fmt, require_full_bitmaps=require_full_bitmaps, parents=parent
        )
        p.done(int(report["bytes_in"]))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"applied {report['bytes_in']} bytes, {report['blocks']} blocks, "
        f"{report['sectors_written']} sectors written to {target} ({fmt})"
    )


@vhd_app.command()
@reported
def merge(
    child: Annotated[str, typer.Argument(metavar="CHILD", help="A differencing VHD.")],
    parent: Annotated[
        str | None,
        typer.Option("--parent", "-p", metavar="P", help="Its parent (default: found through the locators)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Coalesce a differencing disk into its parent, sector-exactly and crash-safely; the merged
    disk takes the child's path and UUID. Run again to resume an interrupted merge.

    Example:  xencr vhd merge child.vhd
    """
    from xencr import _engine as eng

    with Progress(f"merge {child}") as p:
        report = eng.coalesce(child, parent)
        p.done(int(report["bytes_merged"]))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    resumed = " (resumed)" if report.get("resumed") else ""
    typer.echo(
        f"merged {report['child']} into {report['parent']}{resumed}: {report['blocks_merged']} blocks, "
        f"{report['sectors_merged']} sectors ({human_bytes(report['bytes_merged'])}); "
        f"result {report['result']}"
    )


@vhd_app.command()
@reported
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="First image (raw or VHD).")],
    b: Annotated[str, typer.Argument(metavar="B", help="Second image (raw or VHD).")],
    granularity: Annotated[
        str,
        typer.Option("--granularity", "-g", metavar="SIZE", help="Unit compared: 64K (as XAPI's CBT) or 2M."),
    ] = "2M",
    a_parent: Annotated[
        list[str] | None, typer.Option("--a-parent", metavar="P", help="Ancestors of A, nearest first.")
    ] = None,
    b_parent: Annotated[
        list[str] | None, typer.Option("--b-parent", metavar="P", help="Ancestors of B, nearest first.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Compare the virtual content of two images and list the units that differ.

    Exit code 0 whether or not they differ (1 is for failures).

    Example:  xencr vhd diff base.vhd child.vhd --granularity 64K --json
    """
    from xencr import _engine as eng

    g = parse_power_of_two(granularity)
    report = eng.diff(
        a,
        b,
        granularity=g,
        a_format=detect_format(a),
        b_format=detect_format(b),
        a_parents=a_parent,
        b_parents=b_parent,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    changed = report["changed"]
    typer.echo(
        f"{len(changed)} of {report['units']} units of {human_bytes(report['granularity'])} differ "
        f"({human_bytes(report['changed_bytes'])} changed of "
        f"{human_bytes(report['bytes_compared'])} compared)"
    )
    if changed:
        typer.echo(f"changed units: {ranges(changed)}")
