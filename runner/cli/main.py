"""``runner``: submit a task over many shards, watch it, and get one combined result.

The commands live in :mod:`runner.cli.run`, :mod:`runner.cli.manage` and
:mod:`runner.cli.remove`, the shared options and helpers in :mod:`runner.cli.common`; this module
is the console-script entry.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped

# Loading the CLI is most of a short command's life (0.15 s): Ctrl-C then is an exit, not a
# traceback from whichever import it landed in.
try:
    import typer

    # Typer vendors click; its exception types are only reachable here.
    from typer._click import exceptions as click_exc

    from runner.cli import manage, remove, run  # noqa: F401 - importing them registers commands
    from runner.cli.common import EXIT_ERROR, EXIT_OK, app, err
    from worker.defaults import LOG_FORMAT, log_level, no_log_level
    from worker.errors import CFlowError
except KeyboardInterrupt:
    sys.exit(EXIT_INTERRUPTED)

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: a usage error or a CFlowError is one line on stderr and exit 2;
    Ctrl-C that no command handles (while the CLI starts, say) exits 130, quietly."""
    try:
        _main(argv)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    finally:
        # The process ends here: spare it the garbage collector's passes over every object at
        # interpreter exit (about 40 ms after a run, a tenth of a short run's fixed cost).
        gc.freeze()


def _main(argv: list[str] | None) -> None:
    level = os.environ.get("CFLOW_LOG_LEVEL")
    if level:  # the runner's own log on stderr (its scaling, say), as the workers read it
        number = log_level(level)
        if number is None:
            err.print(no_log_level(level), markup=False)
            sys.exit(EXIT_ERROR)
        logging.basicConfig(format=LOG_FORMAT)  # other libraries' warnings and worse
        logging.getLogger("cflow").setLevel(number)
    try:
        code = app(args=argv, prog_name="runner", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:  # plain `runner`: the help, not an error
        if exc.ctx is not None:
            typer.echo(exc.ctx.get_help(), err=True)
        sys.exit(EXIT_OK)
    except click_exc.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "runner"
        err.print(f"error: {exc.format_message()} (see `{command} --help`)", markup=False)
        sys.exit(EXIT_ERROR)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except CFlowError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_ERROR)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        err.print(f"error: {extra[1]}: pip install 'cflow[{extra[0]}]' ({exc})", markup=False)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


# Packages the runner loads only for some commands, and the extra that installs each: a local
# install (`.[runner]`) has none of them.
_EXTRAS = {
    "google": ("gcp", "Google Cloud needs its client libraries"),
    "matplotlib": ("report", "`runner report` draws with matplotlib"),
}
