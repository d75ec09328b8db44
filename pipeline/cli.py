"""Command line: `python -m pipeline run|validate CONFIG`, `python -m pipeline report|status RUN_DIR`,
plus the commands stages declare (e.g. `build-engine RUN_DIR`). Installed, the same command is
`mgd-pipeline`.

Exit codes: 0 success, 1 a stage failed, 2 bad input (config, data, checkpoint, workdir,
manifest), 3 a gate failed, 130 interrupted. User mistakes print one line, no traceback.
Logs and progress go to stderr; what a command produces (`status`, `validate`, `--version`) to
stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from rich.markup import escape

from pipeline import config as config_mod
from pipeline.errors import LibraryError, UserError
from pipeline.stage import load_stages, targets
from pipeline.ui import console, out, setup_logging

log = logging.getLogger(__name__)


CONSOLE_SCRIPT = "mgd-pipeline"  # [project.scripts] in pyproject.toml


def _prog() -> str:
    """How the user called us, for --help and usage lines: the console script or `python -m`."""
    return CONSOLE_SCRIPT if Path(sys.argv[0]).name == CONSOLE_SCRIPT else "python -m pipeline"


def _version() -> str:
    """This package's version and the runtimes' that decide what a build is and how fast it runs."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    runtimes = ", ".join(f"{name} {version(name)}" for name in ("torch", "onnxruntime", "openvino", "tensorrt"))
    return f"edge-mgd-pipeline {version('edge-mgd-pipeline')} ({runtimes}; Python {sys.version.split()[0]})"


class _PrintVersion(argparse.Action):
    """`--version`: one unwrapped line on stdout (argparse's own action wraps it to the terminal)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_prog(), description="MGD edge-compression pipeline.")
    p.add_argument("--version", action=_PrintVersion, nargs=0, help="show the versions and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of stage failures)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (resumes; cached stages are skipped)")
    run.add_argument("config", help="path to pipeline.toml")
    run.add_argument("--from", dest="from_stage", metavar="STAGE",
                     help="start at this stage (the stages before it must have finished in this workdir)")
    run.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage")
    run.add_argument("--only", action="append", default=[], metavar="STAGE", help="run only this stage (repeatable)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="re-run this stage even if cached, and every selected stage after it (repeatable)")
    run.add_argument("--target", choices=targets(),
                     help="run only the stages this deployment target needs")
    run.add_argument("--rebuild-manifest", action="store_true",
                     help="set a corrupt manifest.json aside (kept) and start a fresh one")

    val = sub.add_parser("validate", help="check a config (schema, data, models, checkpoints) without running")
    val.add_argument("config", help="path to pipeline.toml")

    rep = sub.add_parser("report", help="write report.html and report.md into a run directory")
    rep.add_argument("run_dir", help="the run's workdir (holding manifest.json), or the pipeline.toml naming it")
    st = sub.add_parser("status", help="show a run's manifest: stages, cache keys, unavailable parts, gate failures")
    st.add_argument("run_dir", help="the run's workdir (holding manifest.json), or the pipeline.toml naming it")
    st.add_argument("--json", action="store_true", help="print the summary as JSON (stages, metrics, gates, ship)")
    for stage in load_stages():  # commands the stages declare (e.g. build-engine)
        for command in stage.commands:
            extra = sub.add_parser(command.name, help=command.help)
            extra.add_argument("run_dir", help="the run's workdir (holding manifest.json), or the pipeline.toml naming it")
    return p


def _write_report(workdir: Path, manifest=None) -> None:
    """Write the run's report; best effort: a report problem never changes a run's exit code."""
    from pipeline import dist
    from pipeline.manifest import MANIFEST_NAME, Manifest
    from pipeline.report import write_report

    if not dist.is_main():  # under torchrun rank 0 alone writes files
        return
    try:
        if manifest is None:
            if not (Path(workdir) / MANIFEST_NAME).is_file():
                return
            manifest = Manifest.load(workdir)
        html_path, md_path = write_report(manifest)
    except Exception as exc:  # ConfigError included: a corrupt manifest is reported by the next run
        log.warning("report not written: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return
    console.print(f"report: {html_path} and {md_path.name}", highlight=False, soft_wrap=True)


def _run(args: argparse.Namespace) -> int:
    from pipeline.report import summary_table
    from pipeline.runner import Runner, RunOptions

    cfg = _load_config(args.config, args.command)
    opts = RunOptions(from_stage=args.from_stage, until_stage=args.until_stage, only=set(args.only),
                      force=set(args.force), target=args.target, rebuild_manifest=args.rebuild_manifest,
                      config_file=Path(args.config))
    runner = Runner(cfg, opts)
    try:
        outcome = runner.run()
    except KeyboardInterrupt:
        _write_report(cfg.workdir)  # what finished is in the manifest on disk; report it
        raise
    console.print(summary_table(outcome.manifest, outcome.visited))
    for name in outcome.visited:  # warnings again, also for cached stages: they still apply
        rec = outcome.manifest.stages.get(name)
        for w in rec.warnings if rec else ():
            console.print(f"[yellow]warning ({name}):[/] {escape(w)}", highlight=False, soft_wrap=True)
    for target, choice in outcome.manifest.model.ship.items():
        art = choice.get("artifact")
        head = f"[green]ship ({target}):[/] {art}" if art else f"[yellow]ship ({target}):[/] nothing"
        console.print(f"{head} — {escape(str(choice.get('reason', '')))}", highlight=False, soft_wrap=True)
    for msg in outcome.messages:
        console.print(("[red]" if outcome.code else "[yellow]") + escape(msg), highlight=False, soft_wrap=True)
    console.print(f"manifest: {outcome.manifest.path}")
    _write_report(outcome.manifest.workdir, outcome.manifest)
    return outcome.code


def _load_config(arg: str, command: str):
    """Load the config named on the command line; a run directory there is a one-line error that
    names the config file recorded in its manifest."""
    from pipeline.manifest import MANIFEST_NAME

    path = Path(arg)
    if path.is_dir():
        hint = "pass the pipeline's .toml file (e.g. pipeline.toml)"
        try:
            recorded = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))["pipeline"]["config_file"]
            config = os.path.abspath(path / recorded)
            shown = os.path.relpath(config) if config.startswith(os.getcwd() + os.sep) else config
            hint = f"pass the config that made it: {_prog()} {command} {shown}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        kind = "a run directory" if (path / MANIFEST_NAME).is_file() else "a directory"
        raise config_mod.ConfigError(f"{arg} is {kind}, not a config file; {hint} "
                                     "(status and report take the run directory)")
    return config_mod.load(path)


def _validate(args: argparse.Namespace) -> int:
    from pipeline.runner import preflight

    cfg = _load_config(args.config, args.command)
    preflight(cfg, create=False)  # a check: nothing is written, not even the workdir
    print(f"{args.config}: valid")
    return 0


def _run_dir(arg: str) -> Path:
    """A run directory, or a config file whose `[pipeline] workdir` is one."""
    path = Path(arg)
    if path.is_file() and path.suffix == ".toml":
        return config_mod.load(path).workdir
    return path


def _report(args: argparse.Namespace) -> int:
    from pipeline.report import load_run, write_report

    manifest = load_run(_run_dir(args.run_dir))
    html_path, md_path = write_report(manifest)
    console.print(f"report: {html_path} and {md_path.name}", highlight=False, soft_wrap=True)
    return 0


def status_summary(manifest) -> dict:
    """What `status --json` prints: per stage its status, whether the last run re-used it, key,
    times, reason, output paths, metrics, warnings, unavailable parts and failed gates; then the
    build to ship per target. Plain JSON types only."""
    from pipeline.report.rows import cached_state, ordered_stages, ship_choices

    p = manifest.model.pipeline
    task = p.get("task")
    stages = {}
    for name, rec in ordered_stages(manifest):
        stages[name] = {
            "status": rec.status,
            "cached": cached_state(rec, str(p.get("updated", "")), p.get("last_run"), name),
            "key": rec.key, "started": rec.started, "ended": rec.ended, "seconds": rec.seconds,
            "reason": rec.reason,
            "outputs": {art: a.path for art, a in rec.outputs.items()},
            "metrics": rec.metrics,
            "warnings": rec.warnings,
            "unavailable": rec.unavailable,
            "gate_failures": [g.model_dump(mode="json") for g in rec.gates if g.passed is False],
        }
    return {
        "workdir": str(manifest.workdir), "name": p.get("name"),
        "task": task.get("name") if isinstance(task, dict) else task, "updated": p.get("updated"),
        "stages": stages, "ship": ship_choices(manifest),
    }


def _status(args: argparse.Namespace) -> int:
    from pipeline.report import load_run, status_view

    manifest = load_run(_run_dir(args.run_dir))
    if args.json:
        print(json.dumps(status_summary(manifest), indent=2, default=str))
    else:
        out.print(status_view(manifest))
    return 0


def _stage_command(args: argparse.Namespace) -> int:
    command = next(c for s in load_stages() for c in s.commands if c.name == args.command)
    console.print(command.run(_run_dir(args.run_dir)), highlight=False, soft_wrap=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        commands = {"run": _run, "validate": _validate, "report": _report, "status": _status}
        return commands.get(args.command, _stage_command)(args)
    except UserError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except LibraryError as exc:  # not the user's mistake: say which library, and that it is not a config error
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # The manifest is written atomically: the one on disk is still the previous, valid one.
        console.print(f"[red]error:[/] disk full ({escape(str(exc.filename or exc))}); free space and run the same "
                      "command again: finished stages are kept", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and epochs are saved; run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
