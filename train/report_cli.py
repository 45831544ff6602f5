"""``avcl-report``: tables and plots from run directories."""
from __future__ import annotations

import click

from train.report import DEFAULT_METRICS, METRICS, ReportError, make_report


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "Example:\n\n"
        "  avcl-report runs/ave-4x7 runs/vs100-10x10 --out reports/table1 "
        "--metrics mean_accuracy,average_forgetting,last_accuracy"
    ),
)
@click.argument("rundirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for table.md, table.csv and the PNG plots (created if missing).")
@click.option("--metrics", default=",".join(DEFAULT_METRICS), show_default=True,
              help=f"Comma-separated table columns per protocol; any of: {', '.join(METRICS)}.")
@click.option("--published", is_flag=True,
              help="Also print the papers' published numbers (manifests/published) beside ours, per method and "
                   "protocol, marking which of ours ran with the paper's settings; written to published.md.")
def main(rundirs: tuple[str, ...], out_dir: str, metrics: str, published: bool) -> None:
    """Aggregate run directories into a results table and plots.

    RUNDIRS are run directories (holding metrics.json, config.json,
    acc_matrix.csv) or folders searched recursively for them. Each table cell
    is mean ± std over seeds in percent, the best per column in bold, with the
    paired t-test p-value against that column's best method. Prints the
    Markdown table and the paths written.
    """
    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}", param_hint="--metrics"
        )
    try:
        report = make_report(rundirs, out_dir, chosen)
    except ReportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(report.markdown)
    click.echo(f"table: {report.table_md}")
    click.echo(f"table: {report.table_csv}")
    for p in report.plots:
        click.echo(f"plot: {p}")
    if published:
        from pathlib import Path

        from train.published import compare, find_runs

        text = compare(find_runs(rundirs), only_with_ours=True)
        path = Path(out_dir) / "published.md"
        path.write_text(text)
        click.echo(text)
        click.echo(f"published: {path}")


if __name__ == "__main__":
    main()
