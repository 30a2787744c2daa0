"""`tca`: the command line. Parses, then calls pipeline/; nothing else lives here."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from tca.openmp import configure_openmp

configure_openmp()  # before anything imports torch or Numba

from pipeline.runner import Project, human, find_root  # noqa: E402
from tca.errors import TcaError  # noqa: E402

set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a param for this invocation (repeatable), e.g. --set cf.loss=bce.")
params_option = click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                             help="A YAML file of param overrides, nested like stages.yaml `params:` (e.g. params/paper.yaml); --set wins over it.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="torch device for stages that compute: auto (a GPU if present), cpu, cuda, cuda:1, ...")


def project(overrides=(), device="auto", params_file=None) -> Project:
    return Project(find_root(Path.cwd()), overrides, device, params_file)


class Cli(click.Group):
    """Turns user errors into one clear line and Ctrl-C into a calm exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TcaError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # the runner lets a stage's swap and lock write finish first
            click.secho("interrupted: stages that finished are saved and locked; the interrupted stage's "
                        "previous outputs and stages.lock entry are untouched", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=Cli)
def main():
    """tca4rec: token-level collaborative alignment for LLM recommenders, as a staged pipeline."""


@main.command()
@set_option
@params_option
@device_option
@click.option("--force", is_flag=True, help="Rerun every stage, even up-to-date ones (bypasses the run cache).")
@click.option("--dry", is_flag=True, help="Only say what would run and why.")
def run(overrides, params_file, device, force, dry):
    """Run every stale stage, in order (and record the finished run for `tca report`)."""
    proj = project(overrides, device, params_file)
    ran = proj.run(None, force=force, dry=dry, log=click.echo)
    if not ran:
        click.echo("everything is up to date")
    if not dry and "eval" in proj.graph.stages:
        from pipeline.results import record

        name = " ".join([*([f"params={params_file.name}"] if params_file else []), *overrides]) or "defaults"
        path, _ = record(proj, "runs", name, list(overrides), list(overrides), params_file)
        click.echo(f"recorded for `tca report`: {path}")


@main.command("run-stage")
@click.argument("names", nargs=-1, required=True)
@set_option
@params_option
@device_option
@click.option("--force", is_flag=True, help="Run even if up to date (bypasses the run cache).")
@click.option("--upstream", is_flag=True, help="Also run stale upstream stages first.")
@click.option("--downstream", is_flag=True, help="Also run the stages downstream of NAME that become stale.")
@click.option("--dry", is_flag=True, help="Only say what would run and why.")
@click.option("--shard", metavar="I/N", default=None,
              help="Compute only shard I of N (0-based) of a shardable stage (cf_dist, eval) into artifacts/.shards/; join them with `tca merge`.")
def run_stage(names, overrides, params_file, device, force, upstream, downstream, dry, shard):
    """Run the named stage(s); refuses if an upstream stage is stale (unless --upstream).
    Under torchrun / accelerate launch, `train` runs data-parallel on every process."""
    proj = project(overrides, device, params_file)
    if shard is None:
        proj.run(list(names), force=force, upstream=upstream, downstream=downstream, dry=dry, log=click.echo)
        return
    index, _, count = shard.partition("/")
    if not (index.isdigit() and count.isdigit()) or len(names) != 1 or upstream or downstream or dry:
        raise TcaError(f"--shard {shard}: give one stage and I/N with integers 0 <= I < N (e.g. --shard 0/4), without --upstream, --downstream or --dry")
    proj.run_shard(names[0], int(index), int(count), force=force, log=click.echo)


@main.command()
@click.argument("name")
@set_option
@params_option
@device_option
def merge(name, overrides, params_file, device):
    """Join the shards of stage NAME (from `tca run-stage NAME --shard i/n`, same params) into its
    artifact and stages.lock entry, as one unsharded run writes them."""
    project(overrides, device, params_file).merge(name, log=click.echo)


@main.command()
@set_option
@params_option
def status(overrides, params_file):
    """Show each stale stage and exactly why it is stale (and what killed runs left behind)."""
    proj = project(overrides, params_file=params_file)
    stale = proj.status()
    for line in proj.idle_overrides():
        click.echo(f"note: {line}")
    if not stale:
        click.echo("everything is up to date")
    for name, reasons in stale.items():
        click.echo(f"{name}:")
        for reason in reasons:
            click.echo(f"    {reason}")
    holder = proj.running()
    if holder is not None:
        click.echo(f"note: {holder} is running now; what it writes shows when it finishes")
    elif leftovers := [(path, size) for path, size in proj.leftovers() if size]:  # an empty folder costs nothing
        click.echo("leftovers of killed runs (the next `tca run` or `tca gc` removes them):")
        for path, size in leftovers:
            click.echo(f"    {proj.label(path)} ({human(size)})")


@main.command()
def gc():
    """Remove run-cache entries that stages.lock does not reference (and what killed runs left)."""
    removed, kept = project().gc(log=click.echo)
    click.echo(f"removed {removed} cached run(s), kept {kept}")


@main.command()
@click.argument("stage")
@set_option
@params_option
def inspect(stage, overrides, params_file):
    """Print a readable summary of a stage's artifacts."""
    proj = project(overrides, params_file=params_file)
    path = proj.artifact(stage)
    describe = getattr(proj.module(proj.graph.stages[stage]), "inspect", None)
    if describe is None:
        raise TcaError(f"stage `{stage}` has no inspect view; its files are in {path}")
    try:
        text = describe(path, proj.params)
    except TcaError:
        raise
    except Exception as err:  # a damaged or foreign file in the artifact: any reader's error
        stale = proj.status().get(stage)
        why = f" (`tca status`: {'; '.join(stale)})" if stale else ""
        raise TcaError(f"cannot read {path}{why}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
                       f"recompute it with `tca run-stage {stage} --force`") from err
    click.echo(text)


@main.command()
@click.option("--history", "titles", multiple=True, metavar="TITLE",
              help='A title the person interacted with, oldest first (repeatable; an exact title or a unique part of one).')
@click.option("--user", type=int, default=None, help="Use this user's latest interactions (a user id of the data stage) instead.")
@click.option("--top-k", default=10, show_default=True, help="How many recommendations to print.")
@set_option
@params_option
@device_option
def recommend(titles, user, top_k, overrides, params_file, device):
    """Print the trained LLM's top-k items after a history, with their scores."""
    from pipeline.recommend import recommend as top_items

    click.echo(top_items(project(overrides, device, params_file), list(titles), user, top_k))


def _finish(outcomes) -> None:
    """Exit with an error naming the variants that did not run (the others have run)."""
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        names = "; ".join(f"{o.variant.name} ({o.error})" for o in failed)
        raise TcaError(f"{len(failed)} of {len(outcomes)} variant(s) did not run: {names}")


@main.command()
@click.argument("grid", nargs=-1, required=True, metavar="KEY=V1,V2,...")
@set_option
@params_option
@device_option
@click.option("--name", default="sweep", show_default=True, help="Record the points under artifacts/experiments/NAME/ (a section of `tca report`).")
@click.option("--dry", is_flag=True, help="Only list the points.")
def sweep(grid, overrides, params_file, device, name, dry):
    """Run every combination of the values, each point through the runner (cached stages are reused;
    rerun after an interruption to resume: finished points are restored, not recomputed)."""
    from pipeline.sweep import grid as expand
    from pipeline.sweep import run_variants

    _finish(run_variants(find_root(Path.cwd()), name, expand(grid), overrides, params_file, device, dry, click.echo))


@main.command()
@click.argument("name", required=False)
@click.option("--only", multiple=True, metavar="VARIANT", help="Run only this variant (repeatable).")
@set_option
@params_option
@device_option
@click.option("--dry", is_flag=True, help="Only list the variants and their overrides.")
def experiment(name, only, overrides, params_file, device, dry):
    """Run a named experiment of experiments.yaml (without NAME: list them). --set applies to
    every variant, after the experiment's shared overrides and before the variant's own."""
    from pipeline.experiments import experiment_file, load_experiments
    from pipeline.sweep import run_selected, run_variants

    root = find_root(Path.cwd())
    experiments = load_experiments(experiment_file(root))
    if name is None:
        for exp in experiments.values():
            click.echo(f"{exp.name:<10} {len(exp.variants):>2} variants  {exp.about}")
        return
    if name not in experiments:
        raise TcaError(f"unknown experiment `{name}`; {experiment_file(root)} defines: {', '.join(experiments)}")
    exp = experiments[name]
    unknown = sorted(set(only) - {v.name for v in exp.variants})
    if unknown:
        raise TcaError(f"--only {unknown[0]!r}: not a variant of `{name}`; its variants: {', '.join(v.name for v in exp.variants)}")
    variants = [v for v in exp.variants if not only or v.name in only]
    base = [*exp.shared, *overrides]
    if exp.select is not None:
        _finish(run_selected(root, exp.name, variants, exp.select, base, params_file, device, dry, click.echo))
        return
    _finish(run_variants(root, exp.name, variants, base, params_file, device, dry, click.echo))


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.md and the plots [default: artifacts/report/].")
def report(out):
    """Markdown tables of every recorded run (best per metric in bold) and PNG plots."""
    from pipeline.experiments import experiment_file, load_experiments
    from pipeline.report import write_report

    root = find_root(Path.cwd())
    path = experiment_file(root)
    files = write_report(root / "artifacts", out or root / "artifacts" / "report", load_experiments(path) if path.exists() else {})
    click.echo(files[0].read_text())
    click.echo("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
