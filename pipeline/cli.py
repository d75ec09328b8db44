"""Command line: `python -m pipeline run|validate CONFIG`.

Exit codes: 0 success, 1 a stage failed, 2 bad input (config, data, checkpoint, workdir,
manifest), 3 a gate failed, 130 interrupted. User mistakes print one line, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from pipeline import config as config_mod
from pipeline.config import ConfigError
from pipeline.ui import console, setup_logging

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="MGD edge-compression pipeline.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of stage failures)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (resumes; cached stages are skipped)")
    run.add_argument("config", help="path to pipeline.toml")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage (earlier ones must be done)")
    run.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage")
    run.add_argument("--only", action="append", default=[], metavar="STAGE", help="run only this stage (repeatable)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage even if cached (repeatable)")

    val = sub.add_parser("validate", help="check a config (schema, data, models, checkpoints) without running")
    val.add_argument("config", help="path to pipeline.toml")
    return p


def _run(args: argparse.Namespace) -> int:
    from pipeline.report import summary_table
    from pipeline.runner import Runner, RunOptions

    cfg = config_mod.load(args.config)
    opts = RunOptions(from_stage=args.from_stage, until_stage=args.until_stage, only=set(args.only), force=set(args.force))
    runner = Runner(cfg, opts)
    outcome = runner.run()
    console.print(summary_table(outcome.manifest, outcome.visited))
    for name in outcome.visited:  # warnings again, also for cached stages: they still apply
        rec = outcome.manifest.stages.get(name)
        for w in rec.warnings if rec else ():
            console.print(f"[yellow]warning ({name}):[/] {escape(w)}", highlight=False, soft_wrap=True)
    for msg in outcome.messages:
        console.print(("[red]" if outcome.code else "[yellow]") + escape(msg), highlight=False, soft_wrap=True)
    console.print(f"manifest: {outcome.manifest.path}")
    return outcome.code


def _validate(args: argparse.Namespace) -> int:
    from pipeline.runner import preflight

    cfg = config_mod.load(args.config)
    preflight(cfg)
    print(f"{args.config}: valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return {"run": _run, "validate": _validate}[args.command](args)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and epochs are saved; run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
