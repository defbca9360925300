"""Write a bench report: report.json (versioned), report.md, report.csv, PNG plots and image grids."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from effdiff.artifacts import atomic_path, write_json
from effdiff.bench.device import describe
from effdiff.bench.harness import BenchReport, Row
from effdiff.errors import EffdiffError
from effdiff.runtime.images import image_grid

# The project's target (README): best configuration >= 3x faster end to end than diffusers, adherence
# within 3 points, and faster than DeepCache at equal or better adherence.
TARGET_SPEEDUP = 3.0
TARGET_ADHERENCE_DROP = 0.03


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _speedups(report: BenchReport) -> dict[str, float]:
    """End-to-end speed-up of every row over diffusers (or over `full` when diffusers did not run)."""
    by = {r.name: r for r in report.rows}
    base = by.get("diffusers", by["full"])
    return {r.name: base.end_to_end.median / r.end_to_end.median for r in report.rows}


def target_line(report: BenchReport) -> str:
    """Whether the project's target is met, with the figures; says what is missing when it cannot tell."""
    by = {r.name: r for r in report.rows}
    if "diffusers" not in by:
        return "target: not evaluated (diffusers peer did not run)"
    ours = [r for r in report.rows if r.kind == "effdiff"]
    best = max(ours, key=lambda r: by["diffusers"].end_to_end.median / r.end_to_end.median)
    speed = by["diffusers"].end_to_end.median / best.end_to_end.median
    parts = [
        f"best effdiff configuration `{best.name}`: {speed:.2f}x diffusers end to end "
        f"({'met' if speed >= TARGET_SPEEDUP else 'NOT met'}: target {TARGET_SPEEDUP:.0f}x)"
    ]
    adh = best.quality.get("adherence")
    ref_adh = by["diffusers"].quality.get("adherence")
    if adh is not None and ref_adh is not None:
        ok = adh >= ref_adh - TARGET_ADHERENCE_DROP
        parts.append(
            f"adherence {adh:.3f} vs diffusers {ref_adh:.3f} ({'met' if ok else 'NOT met'}: within 3 points)"
        )
    else:
        parts.append("adherence: not measured (not the reference model)")
    if "deepcache" in by:
        dc = by["deepcache"]
        faster = best.end_to_end.median < dc.end_to_end.median
        as_good = adh is None or dc.quality.get("adherence") is None or adh >= dc.quality["adherence"]
        parts.append(
            f"vs DeepCache {dc.end_to_end.median / best.end_to_end.median:.2f}x "
            f"({'met' if faster and as_good else 'NOT met'})"
        )
    else:
        parts.append("DeepCache: did not run")
    return "target: " + "; ".join(parts)


def markdown(report: BenchReport) -> str:
    s = report.settings
    speed = _speedups(report)
    base = "diffusers" if any(r.name == "diffusers" for r in report.rows) else "full"
    lines = [
        f"# effdiff bench: {report.model}",
        "",
        f"- device: {describe(report.device)}",
        f"- {s['sampler']} {s['steps']} steps, guidance {s['guidance']}, {s['height']}x{s['width']}, "
        f"{len(s['prompts'])} prompt(s) x batch {s['batch']}, "
        f"{s['repeat']} timed runs after {s['warmup']} warm-up",
        f"- {target_line(report)}",
        "",
        f"| config | detail | end-to-end s (median / p90 / min) | speed-up vs {base} | UNet s/step | "
        "load s | peak RSS GiB (added) | GPU MiB | disk MiB | PSNR dB vs full | SSIM | adherence |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        e = r.end_to_end
        q = r.quality
        lines.append(
            f"| {r.name} | {r.detail} | {e.median:.2f} / {e.p90:.2f} / {e.min:.2f} | {speed[r.name]:.2f}x | "
            f"{_fmt(r.unet_per_step_s or None, '.4f')} | {r.load_s:.1f} | "
            f"{r.peak_rss_gib:.2f} ({r.rss_added_gib:.2f}) | "
            f"{_fmt(r.gpu_peak_mib, '.0f')} | {_fmt(r.disk_mib, '.0f')} | {_fmt(q.get('psnr_db'), '.1f')} | "
            f"{_fmt(q.get('ssim'), '.3f')} | {_fmt(q.get('adherence'), '.3f')} |"
        )
    comps = sorted({c for r in report.rows for c in r.components})
    if comps:
        lines += [
            "",
            "Latency per component (median seconds per run):",
            "",
            "| config | " + " | ".join(comps) + " |",
            "|---|" + "---|" * len(comps),
        ]
        for r in report.rows:
            if r.components:
                lines.append(
                    f"| {r.name} | "
                    + " | ".join(
                        _fmt(r.components[c].median if c in r.components else None, ".3f") for c in comps
                    )
                    + " |"
                )
    lines += ["", "Plots: latency.png, speed_quality.png, memory.png; images: grid_CONFIG.png", ""]
    return "\n".join(lines)


def csv_text(report: BenchReport) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    comps = sorted({c for r in report.rows for c in r.components})
    qual = sorted({k for r in report.rows for k in r.quality})
    writer.writerow(
        [
            "config",
            "kind",
            "detail",
            "e2e_median_s",
            "e2e_p90_s",
            "e2e_min_s",
            "unet_per_step_s",
            "load_s",
            "peak_rss_gib",
            "rss_added_gib",
            "gpu_peak_mib",
            "disk_mib",
            *[f"{c}_s" for c in comps],
            *qual,
        ]
    )
    for r in report.rows:
        writer.writerow(
            [
                r.name,
                r.kind,
                r.detail,
                r.end_to_end.median,
                r.end_to_end.p90,
                r.end_to_end.min,
                r.unet_per_step_s,
                r.load_s,
                r.peak_rss_gib,
                r.rss_added_gib,
                r.gpu_peak_mib,
                r.disk_mib,
                *[r.components[c].median if c in r.components else "" for c in comps],
                *[r.quality.get(k, "") for k in qual],
            ]
        )
    return buf.getvalue()


def _plots(report: BenchReport, out: Path) -> list[Path]:
    from effdiff._deps import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    rows: list[Row] = report.rows
    names = [r.name for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    comps = ["text_encoder", "unet", "unet_encoder", "unet_decoder", "vae_decoder", "overhead"]
    bottom = [0.0] * len(rows)
    for c in comps:
        vals = [r.components[c].median if c in r.components else 0.0 for r in rows]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    peers = [r.end_to_end.median if r.kind == "peer" else 0.0 for r in rows]
    if any(peers):
        ax.bar(names, peers, color="gray", label="peer (end to end)")
    ax.set_ylabel("seconds per run (median)")
    ax.set_title("Latency per component")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "latency.png", plt))

    fig, ax = plt.subplots(figsize=(5, 4))
    key = "adherence" if all("adherence" in r.quality for r in rows) else "psnr_db"
    speed = _speedups(report)
    for r in rows:
        ax.scatter(speed[r.name], r.quality.get(key, 0.0))
        ax.annotate(r.name, (speed[r.name], r.quality.get(key, 0.0)), fontsize=8)
    ax.set_xlabel("end-to-end speed-up")
    ax.set_ylabel(key)
    ax.set_title("Speed against quality")
    written.append(_save(fig, out / "speed_quality.png", plt))

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, [r.peak_rss_gib for r in rows], label="process peak")
    ax.bar(names, [r.rss_added_gib for r in rows], label="added by this row")
    ax.set_ylabel("host RSS (GiB)")
    ax.legend(fontsize=7)
    ax.set_title("Peak memory")
    written.append(_save(fig, out / "memory.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(report: BenchReport, out: Path) -> list[Path]:
    """Every report file, or EffdiffError in one line when the folder cannot take them."""
    try:
        return _write_report(report, out)
    except OSError as exc:
        raise EffdiffError(f"cannot write the report to {out}: {exc.strerror or exc}") from None


def _write_report(report: BenchReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report.to_json())
    for name, text in (("report.md", markdown(report)), ("report.csv", csv_text(report))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    written = [out / "report.json", out / "report.md", out / "report.csv"]
    for name, images in report.images.items():
        path = out / f"grid_{name.replace(':', '-')}.png"  # no ':' in file names (Windows, URLs)
        with atomic_path(path) as tmp:
            image_grid(images).save(tmp, format="PNG")
        written.append(path)
    return written + _plots(report, out)


def load_report(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
