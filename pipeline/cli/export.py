"""CLI commands for export and parity: `export`, `validate`, `bench`.

    edgekiln export my.yaml --precision int8 --triton-repo triton/   # bundle + INT8 + Triton repository
    edgekiln validate my.yaml                                        # parity gate on every artifact
    edgekiln validate --bundle runs/my/bundle                        # golden-image self-test, no config
    edgekiln bench runs/my/bundle                                    # the table, JSON and a PNG chart
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import bundle_argument, cli, config_argument, load, set_option
from pipeline.cli.errors import fail, handle_errors


def _print_gate(gate) -> None:
    for key, r in gate.reports.items():
        mark = "✅" if r.passed else "❌"
        line = (f"{mark} {key} ({r.artifact}, {r.precision}): accuracy {r.artifact_accuracy:.4f} "
                f"(pytorch {r.reference_accuracy:.4f}, Δ {r.accuracy_delta * 100:+.2f} pts) | "
                f"agreement {r.agreement:.2%} | max |Δlogit| {r.max_abs_logit_diff:.2e} | "
                f"KL {r.kl_divergence:.2e} | {r.n_images} images, agreement on {r.agreement_n}"
                + (f" | drop 95% CI [{r.drop_stats['low'] * 100:+.2f}, {r.drop_stats['high'] * 100:+.2f}] pts"
                   if r.drop_stats else "")
                + (f" | decisions (label or unknown) {r.decision_agreement:.2%}, unknown {r.unknown_counts['artifact']}"
                   f" (pytorch {r.unknown_counts['pytorch']})" if r.decision_agreement is not None else ""))
        click.echo(line)
        for f in r.failures:
            click.echo(f"   FAILED {key}: {f}")
        if r.flipped:
            shown = ", ".join(str(f["image"]) for f in r.flipped[:10])
            more = f" and {len(r.flipped) - 10} more" if len(r.flipped) > 10 else ""
            click.echo(f"   flipped ({len(r.flipped)}): {shown}{more}")
    g = gate.golden
    if g.get("checked"):
        click.echo(f"golden self-test: {g['images']} images, " + ("OK" if not g["failures"] else "FAILED"))


def _print_int8_side_by_side(bundle_dir: Path) -> None:
    """Our onnxruntime INT8 guard and NNCF's, when the bundle has both."""
    from exporters.openvino import int8_side_by_side
    from runtime.bundle import read_bundle

    rows = int8_side_by_side(read_bundle(bundle_dir, verify=False))
    for r in rows if len(rows) > 1 else []:
        click.echo(f"  int8 {r['tool']} ({r['artifact']}, {r['method']}): val drop "
                   f"{(r['val_accuracy_drop'] or 0) * 100:+.2f} pts (budget {(r['budget'] or 0) * 100:.2f}), test Δ "
                   f"{(r['test_accuracy_delta'] or 0) * 100:+.2f} pts, agreement {r['agreement'] or 0:.2%}, "
                   f"{r['kept_in_float']} node(s) kept in float")


@cli.command()
@config_argument
@click.option("--model", "role", type=click.Choice(["teacher", "student"]), default=None,
              help="Which checkpoint to export (default: student when distillation is enabled).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle directory (default: runs/<name>/bundle).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp16", "int8"]),
              help="Also write this ONNX precision (repeatable; adds to export.precisions). FP32 is always written.")
@click.option("--tensorrt", "tensorrt", is_flag=True, default=False,
              help="Also build a TensorRT engine (needs tensorrt 10.x and a CUDA GPU).")
@click.option("--openvino", "openvino", multiple=True, type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
              help="Also write this OpenVINO artifact (repeatable; adds to export.openvino.precisions; "
                   "needs pip install 'edgekiln[openvino]').")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a Triton model repository here (<model>/config.pbtxt, <model>/1/model.onnx).")
@click.option("--triton-artifact", default="onnx", show_default=True,
              help="The bundle artifact the Triton repository serves (openvino, openvino_int8, ...: Triton's "
                   "OpenVINO backend).")
@handle_errors
def export(config: Path, overrides: tuple[str, ...], role: str | None, out: Path | None, precisions: tuple[str, ...], tensorrt: bool,
           openvino: tuple[str, ...], triton_repo: Path | None, triton_artifact: str) -> None:
    """Export every candidate model (the teacher, and the student when distillation adopted it;
    or just --model) with FP32 ONNX, the precisions asked for (default fp32 + int8, + fp16 with a
    GPU), golden images and the parity of every artifact; measure every artifact on every backend
    here and ship the best within the config's `deploy` budgets as the bundle's default artifact.
    Exits 1, with every candidate's figures, when none passed its gate and met the budgets.

    Example: edgekiln export my.yaml --precision fp16 --triton-repo triton/
    """
    from exporters.deploy import DeployError
    from pipeline.report import print_deploy, trust_lines, verdict
    from pipeline.stages import run_export

    cfg = load(config, overrides)
    if precisions:
        from exporters.config import resolved_precisions

        cfg.export.precisions = list(dict.fromkeys([*resolved_precisions(cfg.export), *precisions]))
    if tensorrt:
        cfg.export.tensorrt.enabled = True
    if openvino:
        cfg.export.openvino.precisions = list(dict.fromkeys([*cfg.export.openvino.precisions, *openvino]))
    try:
        r = run_export(cfg, role=role, out=out, triton_repo=triton_repo if triton_artifact == "onnx" else None)
    except DeployError as e:
        click.echo(e.table, err=True)
        fail(str(e), e.exit_code)
    if triton_repo and triton_artifact != "onnx":
        from exporters.triton import write_triton_repo

        r.triton_model = str(write_triton_repo(Path(r.bundle), triton_repo, artifact=triton_artifact))
    metrics = cfg.run.read_metrics()
    print_deploy(metrics["deploy"])
    click.echo(verdict(metrics))
    click.echo(f"bundle {r.bundle}: default artifact {r.default_artifact} on {r.default_backend}; FP32 model "
               f"{r.size_mb:.2f} MB, agreement {r.agreement:.2%}, max |Δlogit| {r.max_abs_logit_diff:.2e}; "
               f"export took {r.seconds:.0f} s")
    for key, a in r.artifacts.items():
        ci = f", 95% CI [{a.drop_interval[0] * 100:+.2f}, {a.drop_interval[1] * 100:+.2f}]" if a.drop_interval else ""
        click.echo(f"  {'✅' if a.passed else '❌'} {key}: {a.file} {a.size_mb:.2f} MB, accuracy "
                   f"{a.accuracy:.4f} (Δ {a.accuracy_delta * 100:+.2f} pts{ci}; n={a.n_images}), "
                   f"agreement {a.agreement:.2%} (n={a.agreement_n})")
    if r.int8 is not None:
        cal, guard = r.int8["calibration"], r.int8["guard"]
        click.echo(f"  int8 calibration: {cal['images']} train images, per class "
                   + ", ".join(f"{k}:{v}" for k, v in cal["per_class"].items())
                   + f"; {len(guard['excluded_nodes'])} node(s) kept in float")
    _print_int8_side_by_side(r.bundle)
    for line in trust_lines(metrics.get("trust") or {}):
        click.echo(line)
    if r.triton_model:
        click.echo(f"triton model: {r.triton_model}")
    if not r.passed:
        fail("parity check failed: " + "; ".join(r.failures), 1)


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@set_option
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle to check (default: runs/<name>/bundle). Without CONFIG: golden-image self-test only.")
@handle_errors
def validate(config: Path | None, overrides: tuple[str, ...], bundle_dir: Path | None) -> None:
    """Check every artifact of a bundle against its PyTorch checkpoint on the test split
    (accuracy, agreement, |Δlogit|, KL, per-class delta, flipped images), plus the golden images.

    Without CONFIG, `--bundle DIR` runs the self-test on the bundle's golden images alone
    (no training side needed). Exits 1 when a threshold of the config's `validate` section
    is violated, naming the check and the artifact.

    Example: edgekiln validate my.yaml   (or: edgekiln validate --bundle runs/my/bundle)
    """
    if config is None:
        if bundle_dir is None:
            raise click.UsageError("give a CONFIG, or --bundle DIR for the golden-image self-test")
        from exporters.golden import self_test
        from runtime.bundle import read_bundle

        b = read_bundle(bundle_dir, verify=True)
        res = self_test(b)
        for key, a in res.get("artifacts", {}).items():
            if "skipped" in a:
                click.echo(f"— {key}: skipped ({a['skipped']})")
                continue
            click.echo(f"{'✅' if a['passed'] else '❌'} {key}: max |Δlogit| {a['max_abs_logit_diff']:.2e}, "
                       f"agreement {a['agreement']:.0%}" + ("" if a["strict"] else " (reported, not gated)"))
        if res["failures"]:
            fail("self-test failed: " + "; ".join(res["failures"]), 1)
        click.echo(f"self-test: OK ({res['images']} golden images)")
        return
    from pipeline.stages import run_validate

    gate = run_validate(load(config, overrides), bundle_dir)
    r = gate.primary
    click.echo(
        f"pytorch accuracy {r.reference_accuracy:.4f} | onnx accuracy {r.artifact_accuracy:.4f} | "
        f"agreement {r.agreement:.2%} | max |Δlogit| {r.max_abs_logit_diff:.2e} | {r.n_images} images"
    )
    _print_gate(gate)
    if not gate.passed:
        fail("parity check failed: " + "; ".join(gate.failures), 1)
    click.echo("parity: OK")


@cli.command()
@bundle_argument
@click.option("--out", "out_prefix", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write <out>.json and <out>.png (default: BUNDLE/../bench).")
@click.option("--rounds", default=200, show_default=True, type=click.IntRange(5), help="Timed runs per artifact.")
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores).")
@handle_errors
def bench(bundle_dir: Path, out_prefix: Path | None, rounds: int, threads: int | None) -> None:
    """Benchmark every artifact of a bundle on every backend (and OpenVINO precision hint) it runs on
    here: size, accuracy, agreement, latency p50/p95 at batch 1, throughput at batch 32, parity ✅/❌;
    plus INT8/FP32 and OpenVINO/onnxruntime latency ratios measured side by side in this run. Writes
    JSON and an accuracy-vs-latency PNG. Then the Pareto front of the run's candidates (this bundle and
    those under ../candidates/), measured side by side, judged with the deploy settings recorded in
    bundle.json: table, PNG, the choice.

    Example: edgekiln bench runs/demo/bundle
    """
    from rich.console import Console
    from rich.table import Table

    from exporters.bench import bench_bundle, openvino_ratios, ratios, write_outputs

    rows = bench_bundle(bundle_dir, rounds=rounds, threads=threads)
    table = Table(title=f"edgekiln bench — {bundle_dir}")
    for col in ("artifact", "format", "precision", "backend", "hint", "size MB", "accuracy", "top-1 agreement",
                "p50 ms (b=1)", "p95 ms (b=1)", "img/s (b=32)", "parity"):
        table.add_column(col, justify="left" if col in ("artifact", "format", "precision", "backend", "hint")
                         else "right")
    for r in rows:
        table.add_row(r.artifact, r.format, r.precision, r.backend, r.hint or "—", f"{r.size_mb:.2f}",
                      "—" if r.accuracy is None else f"{r.accuracy:.4f}",
                      "—" if r.agreement is None else f"{r.agreement:.2%}",
                      f"{r.latency_p50_ms:.2f}", f"{r.latency_p95_ms:.2f}", f"{r.throughput_ips:.0f}", r.parity_mark)
    Console(width=160).print(table)
    for key, q in ratios(rows).items():
        click.echo(f"{key} / onnx (fp32), measured side by side: latency p50 {q['latency_p50']:.2f}x, "
                   f"size {q['size']:.2f}x")
    for pair, q in openvino_ratios(rows).items():
        click.echo(f"{pair}, measured side by side: latency p50 {q:.2f}x")
    prefix = out_prefix or Path(bundle_dir).resolve().parent / "bench"
    json_path, png_path = write_outputs(rows, prefix)
    click.echo(f"wrote {json_path}" + (f" and {png_path}" if png_path else " (no PNG: matplotlib is not installed)"))
    _print_pareto([bundle_dir], prefix.parent / f"{prefix.name}-pareto.png", rounds)


def _print_pareto(paths: list[Path], png: Path | None, rounds: int) -> None:
    """The Pareto table of each run's candidates, measured side by side, its choice and why; a PNG per run."""
    from exporters.deploy import plot_pareto
    from exporters.pareto import pareto_groups
    from pipeline.report import print_deploy

    for name, choice, recorded in pareto_groups(paths, rounds=max(5, min(rounds, 60))):
        record = choice.to_dict()
        print_deploy(record, title=f"{name}: every candidate, measured side by side (★ best now, ◆ Pareto front)")
        if recorded:
            click.echo(f"export chose {recorded['label']} ({recorded['artifact']}).")
        out = png if len(paths) == 1 else (png.parent / f"{name}-pareto.png" if png else None)
        if out and plot_pareto(record["candidates"], out, title=f"{name}: accuracy vs latency"):
            click.echo(f"wrote {out}")
