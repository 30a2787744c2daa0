"""`tca`: the command line. Parses, then calls pipeline/; nothing else lives here."""
from __future__ import annotations

import os
import sys

# torch's bundled OpenMP and the system one Numba loads would otherwise busy-wait against each
# other (measured: CF scoring up to 20x slower on 2 loaded cores). Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import click

from pipeline.runner import Project, find_root
from tca.errors import TcaError

set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a param for this invocation (repeatable), e.g. --set train.alpha=0.3.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="torch device for stages that compute: auto (a GPU if present), cpu, cuda, cuda:1, ...")


def project(overrides=(), device="auto") -> Project:
    return Project(find_root(Path.cwd()), overrides, device)


class Cli(click.Group):
    """Turns user errors into one clear line and Ctrl-C into a calm exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TcaError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted: the previous outputs and stages.lock are untouched", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=Cli)
def main():
    """tca4rec: token-level collaborative alignment for LLM recommenders, as a staged pipeline."""


@main.command()
@set_option
@device_option
@click.option("--force", is_flag=True, help="Rerun every stage, even up-to-date ones (bypasses the run cache).")
@click.option("--dry", is_flag=True, help="Only say what would run and why.")
def run(overrides, device, force, dry):
    """Run every stale stage, in order."""
    ran = project(overrides, device).run(None, force=force, dry=dry, log=click.echo)
    if not ran:
        click.echo("everything is up to date")


@main.command("run-stage")
@click.argument("names", nargs=-1, required=True)
@set_option
@device_option
@click.option("--force", is_flag=True, help="Run even if up to date (bypasses the run cache).")
@click.option("--upstream", is_flag=True, help="Also run stale upstream stages first.")
@click.option("--downstream", is_flag=True, help="Also run the stages downstream of NAME that become stale.")
@click.option("--dry", is_flag=True, help="Only say what would run and why.")
def run_stage(names, overrides, device, force, upstream, downstream, dry):
    """Run the named stage(s); refuses if an upstream stage is stale (unless --upstream)."""
    project(overrides, device).run(list(names), force=force, upstream=upstream, downstream=downstream, dry=dry, log=click.echo)


@main.command()
@set_option
def status(overrides):
    """Show each stale stage and exactly why it is stale."""
    stale = project(overrides).status()
    if not stale:
        click.echo("everything is up to date")
    for name, reasons in stale.items():
        click.echo(f"{name}:")
        for reason in reasons:
            click.echo(f"    {reason}")


@main.command()
def gc():
    """Remove run-cache entries that stages.lock does not reference."""
    removed, kept = project().gc()
    click.echo(f"removed {removed} cached run(s), kept {kept}")


@main.command()
@click.argument("stage")
@set_option
def inspect(stage, overrides):
    """Print a readable summary of a stage's artifacts."""
    proj = project(overrides)
    path = proj.artifact(stage)
    describe = getattr(proj.module(proj.graph.stages[stage]), "inspect", None)
    if describe is None:
        raise TcaError(f"stage `{stage}` has no inspect view; its files are in {path}")
    click.echo(describe(path, proj.params))


@main.command()
@click.option("--history", "titles", multiple=True, metavar="TITLE",
              help='A title the person interacted with, oldest first (repeatable; an exact title or a unique part of one).')
@click.option("--user", type=int, default=None, help="Use this user's latest interactions (a user id of the data stage) instead.")
@click.option("--top-k", default=10, show_default=True, help="How many recommendations to print.")
@set_option
@device_option
def recommend(titles, user, top_k, overrides, device):
    """Print the trained LLM's top-k items after a history, with their scores."""
    from pipeline.recommend import recommend as top_items

    click.echo(top_items(project(overrides, device), list(titles), user, top_k))

if __name__ == "__main__":
    main()
