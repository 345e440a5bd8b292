"""``python -m asyncpgalloc``: run the demo or the benchmarks, draw or inspect a checkpoint.

Subcommands (``python -m asyncpgalloc COMMAND --help`` for each):

- ``demo [ARGS...]``: ``examples/sandbox_supervisor.py`` with ARGS;
- ``bench [--script NAME] [ARGS...]``: the scripts in ``benchmarks/`` with ARGS;
- ``map CHECKPOINT -o OUT.svg``: an SVG map of a checkpoint's pages;
- ``inspect CHECKPOINT [--no-data] [--pages-file PAGES]``: a checkpoint's header and a
  summary of its contents, after checking every checksum (page data too, unless
  ``--no-data``; in ``PAGES`` for a checkpoint saved with a shared pages file);
- ``restore CHECKPOINT [--no-progress] [--pages-file PAGES]``: load it with
  ``async_pages=True`` into a new memfd (a ``rich`` progress bar while the pages stream
  in), check the result, print a summary.

``python -m asyncpgalloc --version`` prints the version.

``examples/`` and ``benchmarks/`` are not installed with the package: ``demo`` and
``bench`` find them next to it, in a clone (or an editable install).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from . import __version__

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
#: The work itself failed: an unreadable checkpoint, a demo that did not get every
#: page back, a benchmark that crashed.
EXIT_FAILED = 1
#: Bad usage (argparse's own status), or the feature is not available here.
EXIT_USAGE = 2

_EPILOG = """\
exit status:
  0  success
  1  the work failed (e.g. a damaged checkpoint, or the demo did not get every page back)
  2  bad usage, or not available here (no examples/ or benchmarks/ next to the package)
  bench passes on the benchmark scripts' own status; demo the supervisor's (130: interrupted)
"""

#: The clone this package was imported from (examples/ and benchmarks/ live there).
_REPO = Path(__file__).resolve().parent.parent


def _fail(message: str, status: int) -> int:
    print(f"asyncpgalloc: {message}", file=sys.stderr)
    return status


def _pass_through(extra: list[str]) -> list[str]:
    # argparse keeps the "--" that separates our options from the script's.
    return extra[1:] if extra[:1] == ["--"] else extra


# ---------------------------------------------------------------------- demo


def _load_script(path: Path, name: str) -> ModuleType:
    """Import a script by path (examples/ is not a package, nor installed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses and pickling look the module up by name while it executes.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _demo(args: argparse.Namespace, extra: list[str]) -> int:
    script = _REPO / "examples" / "sandbox_supervisor.py"
    if not script.is_file():
        return _fail(
            f"demo: {script} not found: the demo ships with the source tree, not the "
            "package; run it from a clone (pip install -e '.[demo]')",
            EXIT_USAGE,
        )
    module = _load_script(script, "asyncpgalloc_sandbox_supervisor")
    entry = getattr(module, "main", None)
    if not callable(entry):
        return _fail(f"demo: {script} has no main(argv)", EXIT_USAGE)
    # The supervisor's own usage and errors then name the command that ran it.
    saved_argv = sys.argv
    sys.argv = ["python -m asyncpgalloc demo", *_pass_through(extra)]
    try:
        status = entry(_pass_through(extra))
        if asyncio.iscoroutine(status):
            status = asyncio.run(status)
    finally:
        sys.argv = saved_argv
    return EXIT_OK if status is None else int(status)


# --------------------------------------------------------------------- bench


def _bench_scripts() -> dict[str, Path]:
    """Benchmark scripts by name: ``run`` (the suite) and each ``bench_*.py`` by its stem."""
    directory = _REPO / "benchmarks"
    if not directory.is_dir():
        return {}
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(directory.glob("bench_*.py"))}
    if (directory / "run.py").is_file():
        scripts["run"] = directory / "run.py"
    return scripts


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    scripts = _bench_scripts()
    if not scripts:
        return _fail(
            f"bench: no benchmark scripts in {_REPO / 'benchmarks'}: they ship with the "
            "source tree, not the package; run from a clone",
            EXIT_USAGE,
        )
    if args.list:
        for name, path in scripts.items():
            print(f"{name:12} {path.relative_to(_REPO)}")
        return EXIT_OK
    if args.script:
        unknown = [n for n in args.script if n not in scripts]
        if unknown:
            return _fail(
                f"bench: no script {', '.join(unknown)} (have: {', '.join(scripts)})", EXIT_USAGE
            )
        chosen = [scripts[n] for n in args.script]
    elif "run" in scripts:
        # The suite runs every scenario the single scripts do, and more.
        chosen = [scripts["run"]]
    else:
        chosen = list(scripts.values())
    env = dict(os.environ)
    # Make the package importable from the scripts even without an install.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    status = EXIT_OK
    for path in chosen:
        print(f"== {path.relative_to(_REPO)} {' '.join(_pass_through(extra))}", flush=True)
        rc = subprocess.run([sys.executable, str(path), *_pass_through(extra)], env=env).returncode
        if rc and not status:
            # The first failure's status, but the other scripts still run.
            status = rc
    return status


# ------------------------------------------------------------ map and inspect


async def _map_checkpoint(path: str, out: str, width: int) -> None:
    from .memory_file import MemoryFile
    from .svgmap import render_svg, snapshot, write_svg

    # Loading copies the checkpoint's committed pages into a fresh memfd: the
    # price of reading it only through the public format reader.
    mf = await MemoryFile.load(path)
    try:
        snap = snapshot(mf)
    finally:
        await mf.aclose()
    text = render_svg(snap, width=width, title=f"checkpoint {os.path.basename(path)}")
    if out == "-":
        sys.stdout.write(text)
    else:
        write_svg(out, text)


def _map(args: argparse.Namespace, extra: list[str]) -> int:
    from .errors import AllocatorError

    try:
        asyncio.run(_map_checkpoint(args.checkpoint, args.output, args.width))
    except (AllocatorError, OSError) as e:
        # CheckpointError is an AllocatorError: a damaged or foreign file.
        return _fail(f"map: {args.checkpoint}: {e}", EXIT_FAILED)
    if args.output != "-":
        print(f"wrote {args.output}")
    return EXIT_OK


def _inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from .checkpoint_inspect import inspect_main

    pages = ["--pages-file", args.pages_file] if args.pages_file else []
    return inspect_main([args.checkpoint, *(["--no-data"] if args.no_data else []), *pages])


async def _restore_checkpoint(path: str, show_progress: bool, pages_path: str | None = None) -> str:
    """Load ``path`` (its pages from the pages file ``pages_path`` if given) with async
    page loading, wait for every page (with a progress bar if ``show_progress`` and
    ``rich`` is installed), check the invariants; the summary."""
    import time

    from .memory_file import MemoryFile
    from .pages_file import PagesFile

    t0 = time.perf_counter()
    pages = None if pages_path is None else await PagesFile.open(pages_path)
    try:
        mf = await MemoryFile.load(path, async_pages=True, pages_file=pages)
    finally:
        if pages is not None:
            pages.close()  # the load reads through a description of its own
    returned = time.perf_counter() - t0
    try:
        done = asyncio.ensure_future(mf.wait_loaded())
        progress = mf.load_progress()
        if show_progress and progress is not None and not done.done():
            try:
                from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
            except ImportError:
                rich_progress = None
            else:
                rich_progress = Progress(
                    *Progress.get_default_columns(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(),
                    transient=True,
                )
            if rich_progress is not None:
                with rich_progress:
                    bar = rich_progress.add_task("loading pages", total=progress.total_bytes)
                    while not done.done():
                        await asyncio.wait([done], timeout=0.1)
                        p = mf.load_progress()
                        assert p is not None
                        rich_progress.update(bar, completed=p.loaded_bytes + p.dropped_bytes)
        await done
        total = time.perf_counter() - t0
        mf.check_invariants()
        st = mf.stats()
        p = mf.load_progress()
    finally:
        await mf.aclose()
    loaded = 0 if p is None else p.loaded_bytes
    rate = loaded / total / 2**20 if total else 0.0
    return (
        f"restored {path}: {st.total_size >> 20} MiB file, {st.used_bytes >> 20} MiB used, "
        f"{st.known_committed_bytes >> 20} MiB committed\n"
        f"  load() returned after {returned * 1e3:.1f} ms; every page in after "
        f"{total * 1e3:.1f} ms ({loaded >> 20} MiB read and checked, {rate:.0f} MiB/s)\n"
        "  checksums and invariants OK\n"
    )


def _restore(args: argparse.Namespace, extra: list[str]) -> int:
    from .errors import AllocatorError

    try:
        summary = asyncio.run(
            _restore_checkpoint(
                args.checkpoint,
                not args.no_progress and sys.stderr.isatty(),
                args.pages_file,
            )
        )
    except (AllocatorError, OSError) as e:
        return _fail(f"restore: {args.checkpoint}: {e}", EXIT_FAILED)
    sys.stdout.write(summary)
    return EXIT_OK


# ---------------------------------------------------------------------- main


def _width(text: str) -> int:
    n = int(text)
    if n & (n - 1) or not 64 <= n <= 8192:
        raise argparse.ArgumentTypeError("must be a power of two from 64 to 8192")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m asyncpgalloc`` (one subparser per command)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m asyncpgalloc",
        description="asyncpgalloc: gVisor's page allocator for asyncio. Run the demo or the "
        "benchmarks, draw or inspect a checkpoint.",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"asyncpgalloc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the sandbox-supervisor demo (examples/sandbox_supervisor.py)",
        description="Run examples/sandbox_supervisor.py: simulated sandboxes sharing one "
        "MemoryFile. Every argument after 'demo' goes to the supervisor (e.g. --duration 1, "
        "--sandboxes 8, --map out.svg); 'demo -- --help' shows its options.",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    demo.set_defaults(parser=demo, run=_demo, passes_args=True)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark scripts in benchmarks/",
        description="Run the benchmarks: benchmarks/run.py (the suite) if present, else every "
        "benchmarks/bench_*.py. Other arguments (e.g. --quick, --reps 7) go to each script; "
        "put them after '--' if they clash with the options below.",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    bench.add_argument(
        "--script",
        action="append",
        metavar="NAME",
        help="run only this script (repeatable): 'run' or a bench_NAME.py's NAME; see --list",
    )
    bench.add_argument("--list", action="store_true", help="list the scripts and exit")
    bench.set_defaults(parser=bench, run=_bench, passes_args=True)

    map_ = sub.add_parser(
        "map",
        help="draw a checkpoint's pages as an SVG map",
        description="Load a checkpoint written by MemoryFile.save() and draw its chunks and "
        "page states (used, sub-released, free; known-committed strip) as an SVG.",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    map_.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file")
    map_.add_argument(
        "-o", "--output", required=True, metavar="OUT.svg", help="where to write ('-': stdout)"
    )
    map_.add_argument(
        "--width",
        type=_width,
        default=1024,
        help="pixel columns per 1 GiB chunk (power of two, 64-8192; default 1024)",
    )
    map_.set_defaults(parser=map_, run=_map, passes_args=False)

    inspect = sub.add_parser(
        "inspect",
        help="print a checkpoint's header and a summary of its contents",
        description="Print a checkpoint's header and a summary of its contents. Checks the "
        "header and metadata checksums and, unless --no-data, every page data block's "
        "(a sequential read of the whole file).",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    inspect.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file")
    inspect.add_argument(
        "--no-data",
        action="store_true",
        help="check only the header and metadata, not the page data's checksums",
    )
    inspect.add_argument(
        "--pages-file", metavar="PAGES", help="the pages file holding the checkpoint's pages"
    )
    inspect.set_defaults(parser=inspect, run=_inspect, passes_args=False)

    restore = sub.add_parser(
        "restore",
        help="restore a checkpoint (async page loading) and check it",
        description="Load a checkpoint with MemoryFile.load(..., async_pages=True) into a new "
        "memfd, show the pages streaming in (a rich progress bar on a terminal), wait for "
        "every page, check every checksum and invariant, and print a summary.",
        epilog=_EPILOG,
        formatter_class=formatter,
        allow_abbrev=False,
    )
    restore.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file")
    restore.add_argument("--no-progress", action="store_true", help="no progress bar")
    restore.add_argument(
        "--pages-file", metavar="PAGES", help="the pages file holding the checkpoint's pages"
    )
    restore.set_defaults(parser=restore, run=_restore, passes_args=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    # demo and bench pass unknown arguments on to their scripts; argparse's
    # REMAINDER cannot take a first argument that looks like an option.
    args, extra = parser.parse_known_args(argv)
    if extra and not args.passes_args:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        status: int = args.run(args, extra)
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return _fail(f"{args.command} failed", EXIT_FAILED)
    return status


if __name__ == "__main__":
    sys.exit(main())
