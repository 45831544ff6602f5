"""``avcl-report``: tables and plots from run directories."""
from __future__ import annotations

import click

from train.report import (
    DEFAULT_METRICS,
    DEFAULT_SEG_METRICS,
    METRICS,
    SEG_SUMMARIES,
    ReportError,
    make_report,
    metric_info,
)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "Example:\n\n"
        "  avcl-report runs/ave-4x7 runs/vs100-10x10 --out reports/table1 "
        "--metrics mean_accuracy,average_forgetting,last_accuracy\n\n"
        "  avcl-report runs/synth-seg-cil --out reports/seg "
        "--seg-metrics map/average_accuracy,map/final_forgetting,maxf1/average_accuracy"
    ),
)
@click.argument("rundirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for table.md, table.csv and the PNG plots (created if missing).")
@click.option("--metrics", default=",".join(DEFAULT_METRICS), show_default=True,
              help=f"Comma-separated table columns per protocol; any of: {', '.join(METRICS)}.")
@click.option("--seg-metrics", default=",".join(DEFAULT_SEG_METRICS), show_default=True,
              help="Comma-separated columns of the segmentation table per protocol: <metric>/<summary>, "
                   "metric one of the run's matrices (map, maxf1 = Max-F with beta 1, fscore = AVSBench "
                   f"beta^2 0.3, miou, dice), summary one of: {', '.join(SEG_SUMMARIES)}.")
@click.option("--no-plots", is_flag=True, help="Write the tables only.")
@click.option("--published", is_flag=True,
              help="Also print the papers' published numbers (manifests/published) beside ours, per method and "
                   "protocol, marking which of ours ran with the paper's settings; written to published.md.")
def main(rundirs: tuple[str, ...], out_dir: str, metrics: str, seg_metrics: str, no_plots: bool,
         published: bool) -> None:
    """Aggregate run directories into a results table and plots.

    RUNDIRS are run directories (holding metrics.json, config.json,
    acc_matrix.csv) or folders searched recursively for them. Each table cell
    is mean ± std over seeds in percent, the best per column in bold, with the
    paired t-test p-value against that column's best method. Prints the
    Markdown table and the paths written.

    Segmentation runs ("problem": "segmentation" in config.json) get the
    CL-AVS tables (Avg mAP = AA, Avg For = F of the mAP matrix, and every
    metric per protocol), Max-F heatmaps, forward transfer vs. forgetting
    and mask overlays. Semantic segmentation runs ("problem": "semantic")
    get seed 003's table (mIoU over base / new / all classes after each
    step), all-class mIoU curves and per-class IoU heatmaps.
    """
    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}", param_hint="--metrics"
        )
    seg_chosen = [m.strip() for m in seg_metrics.split(",") if m.strip()]
    if not seg_chosen:
        raise click.BadParameter("give at least one column", param_hint="--seg-metrics")
    try:
        for m in seg_chosen:
            metric_info(m)
    except ReportError as e:
        raise click.BadParameter(str(e), param_hint="--seg-metrics") from e
    try:
        report = make_report(rundirs, out_dir, chosen, seg_chosen, plots=not no_plots)
    except ReportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(report.markdown)
    for f in report.files:
        click.echo(f"table: {f}")
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
