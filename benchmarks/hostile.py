"""A battery of hostile but fair cases against the CLI and the Python API: bad arguments, corrupted and
truncated files, interrupted and concurrent writers, API misuse. Each case must end cleanly: the
expected image, or a one-line `error:` and a non-zero exit (an EffdiffError with a one-line message in
the API); never a traceback, never a silently wrong result, never lost data.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hostile.py [--work runs/hostile]   # ~5-10 min, 2 cores

Prints one row per case and a summary by class; exits 1 when any case is not clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


@dataclass
class Case:
    cls: str
    name: str
    run: Callable[[], str]  # returns "clean" | "ok" or a description of what went wrong


def cli(*args: str, expect_ok: bool = False, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    if "Traceback" in proc.stderr:
        return "TRACEBACK: " + proc.stderr.strip().splitlines()[-1][:120]
    if expect_ok:
        return "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}): {proc.stderr.strip()[:120]}"
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    if proc.returncode == 0:
        return "ACCEPTED (exit 0) where an error was due"
    if len(lines) != 1 or not lines[0].startswith("error:"):
        return f"NOT ONE LINE ({len(lines)} lines): {proc.stderr.strip()[:120]!r}"
    return "clean"


def api(fn: Callable[[], object], expect_ok: bool = False) -> str:
    from effdiff.errors import EffdiffError

    try:
        fn()
    except EffdiffError as exc:
        if expect_ok:
            return f"FAILED: {exc}"
        return "clean" if "\n" not in str(exc) and str(exc) else f"NOT ONE LINE: {exc!r}"
    except Exception as exc:  # anything else would reach the user as a traceback
        return f"TRACEBACK: {type(exc).__name__}: {str(exc)[:100]}"
    return "ok" if expect_ok else "ACCEPTED where an error was due"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/hostile"))
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("EFFDIFF_CACHE", str(work / "cache"))

    from effdiff.artifacts import Manifest
    from effdiff.export.onnx import export_onnx
    from effdiff.runtime.pipeline import Hooks, Pipeline
    from effdiff.runtime.propagation import NoiseInjection

    good = work / "good"
    print("exporting tiny-sd1 ...", flush=True)
    export_onnx("tiny-sd1", good, progress=False)
    pristine = {p.name: p.read_bytes() for p in good.glob("*.onnx")}
    out = str(work / "o.png")

    def gen(*extra: str, folder: Path = good, expect_ok: bool = False) -> str:
        base = ["effdiff", "generate", "--artifacts", str(folder), "--prompt", "a red circle"]
        return cli(*base, "--out", out, "--steps", "2", "--quiet", *extra, expect_ok=expect_ok)

    def damaged(name: str, change: Callable[[Path], None]) -> Callable[[], str]:
        def case() -> str:
            folder = work / f"damaged-{name}"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(good, folder)
            change(folder)
            return gen(folder=folder)

        return case

    def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
        return lambda f: (f / rel).write_bytes(data if isinstance(data, bytes) else data.encode())

    def overwrite_middle(rel: str) -> Callable[[Path], None]:
        def change(f: Path) -> None:
            with (f / rel).open("r+b") as fh:
                fh.seek((f / rel).stat().st_size // 2)
                fh.write(b"\xff" * 512)

        return change

    def truncate(rel: str) -> Callable[[Path], None]:
        return lambda f: os.truncate(f / rel, (f / rel).stat().st_size // 2)

    def manifest_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
        def change(f: Path) -> None:
            data = json.loads((f / "manifest.json").read_text())
            edit(data)
            (f / "manifest.json").write_text(json.dumps(data))

        return change

    cases: list[Case] = []

    def add(cls: str, name: str, fn: Callable[[], str]) -> None:
        cases.append(Case(cls, name, fn))

    # ---- A. generate: bad arguments
    for name, extra in [
        ("steps 0", ["--steps", "0"]),
        ("steps -1", ["--steps", "-1"]),
        ("steps x", ["--steps", "x"]),
        ("steps 1e9", ["--steps", "1000000000"]),
        ("guidance nan", ["--guidance", "nan"]),
        ("guidance inf", ["--guidance", "inf"]),
        ("guidance -inf", ["--guidance", "-inf"]),
        ("guidance -1", ["--guidance", "-1"]),
        ("guidance 1e9", ["--guidance", "1e9"]),
        ("seed -1", ["--seed", "-1"]),
        ("seed x", ["--seed", "x"]),
        ("height 0", ["--height", "0"]),
        ("height -8", ["--height", "-8"]),
        ("height 100", ["--height", "100"]),
        ("height 1e6", ["--height", "1000000"]),
        ("width 0", ["--width", "0"]),
        ("num-images 0", ["--num-images", "0"]),
        ("num-images -1", ["--num-images", "-1"]),
        ("num-images 5000", ["--num-images", "5000"]),
        ("propagation bogus", ["--propagation", "bogus"]),
        ("key steps not from 0", ["--propagation", "1,2"]),
        ("key step out of range", ["--propagation", "0,99"]),
        ("uniform:0", ["--propagation", "uniform:0"]),
        ("uniform:x", ["--propagation", "uniform:x"]),
        ("preset for other steps", ["--propagation", "fd-ddim50"]),
        ("sampler plms", ["--sampler", "plms"]),
        ("sampler empty", ["--sampler", ""]),
        ("max-decoder-batch 0", ["--max-decoder-batch", "0"]),
        ("vae-tile 0", ["--vae-tile", "0"]),
        ("vae-tile -2", ["--vae-tile", "-2"]),
        ("noise-alpha nan", ["--noise-alpha", "nan"]),
        ("noise-alpha -1", ["--noise-alpha", "-1"]),
        ("noise-tau inf", ["--noise-tau", "inf"]),
        ("provider unknown", ["--providers", "FooExecutionProvider"]),
        ("provider empty", ["--providers", ","]),
        ("precision int4", ["--precision", "int4"]),
        ("precision int8, no variant", ["--precision", "int8"]),
        ("precision fp16, no variant", ["--precision", "fp16"]),
        ("unknown option", ["--colour", "red"]),
    ]:
        add("generate arguments", name, lambda extra=extra: gen(*extra))
    add("generate arguments", "valid run (control)", lambda: gen(expect_ok=True))
    add(
        "generate arguments",
        "empty prompt is valid",
        lambda: cli(
            "effdiff",
            "generate",
            "--artifacts",
            str(good),
            "--prompt",
            "",
            "--out",
            out,
            "--steps",
            "2",
            "--quiet",
            expect_ok=True,
        ),
    )
    add(
        "output",
        "out .jpg",
        lambda: cli(
            "effdiff", "generate", "--artifacts", str(good), "--prompt", "p", "--out", str(work / "o.jpg")
        ),
    )
    add(
        "output",
        "out in a missing folder",
        lambda: cli(
            "effdiff",
            "generate",
            "--artifacts",
            str(good),
            "--prompt",
            "p",
            "--out",
            str(work / "no" / "o.png"),
        ),
    )
    add(
        "output",
        "out is a folder",
        lambda: cli(
            "effdiff", "generate", "--artifacts", str(good), "--prompt", "p", "--out", str(work / "adir.png")
        ),
    )
    (work / "adir.png").mkdir()
    add(
        "output",
        "out under a file",
        lambda: cli(
            "effdiff",
            "generate",
            "--artifacts",
            str(good),
            "--prompt",
            "p",
            "--out",
            str(good / "manifest.json" / "o.png"),
        ),
    )
    add(
        "output",
        "bench report under a file",
        lambda: cli(
            "effdiff",
            "bench",
            "--artifacts",
            str(good),
            "--out",
            str(good / "manifest.json" / "r"),
            "--steps",
            "2",
        ),
    )
    add(
        "output",
        "demo out under a file",
        lambda: cli("effdiff", "demo", "--out", str(good / "manifest.json")),
    )

    # ---- B. artifacts folders: missing, corrupted, truncated, mixed
    add("artifacts folder", "missing folder", lambda: gen(folder=work / "missing"))
    add("artifacts folder", "a file, not a folder", lambda: gen(folder=good / "manifest.json"))
    (work / "empty").mkdir()
    add("artifacts folder", "empty folder", lambda: gen(folder=work / "empty"))
    for name, change in [
        ("manifest deleted", lambda f: (f / "manifest.json").unlink()),
        ("manifest truncated", truncate("manifest.json")),
        ("manifest not JSON", write("manifest.json", "{not json")),
        ("manifest a JSON list", write("manifest.json", "[1, 2]")),
        ("manifest binary garbage", write("manifest.json", b"\x89PNG\x00\xff")),
        ("manifest schema 0", manifest_edit(lambda d: d.update(schema_version=0))),
        ("manifest schema 1", manifest_edit(lambda d: d.update(schema_version=1))),
        ("manifest without geometry", manifest_edit(lambda d: d.pop("geometry"))),
        ("manifest graphs wrong type", manifest_edit(lambda d: d.update(graphs=[]))),
        (
            "manifest size wrong type",
            manifest_edit(
                lambda d: d["graphs"]["unet"]["variants"]["fp32"]["files"]["unet.onnx"].update(size="big")
            ),
        ),
        ("unet.onnx deleted", lambda f: (f / "unet.onnx").unlink()),
        ("unet.onnx truncated", truncate("unet.onnx")),
        ("unet.onnx overwritten in place, same size", overwrite_middle("unet.onnx")),
        ("vae_decoder.onnx overwritten in place", overwrite_middle("vae_decoder.onnx")),
        (
            "text_encoder.onnx replaced by another graph",
            lambda f: shutil.copy(f / "vae_decoder.onnx", f / "text_encoder.onnx"),
        ),
        ("tokenizer.json deleted", lambda f: (f / "tokenizer" / "tokenizer.json").unlink()),
        ("tokenizer.json corrupted, same size", overwrite_middle("tokenizer/tokenizer.json")),
        ("scheduler config deleted", lambda f: (f / "scheduler_config.json").unlink()),
        ("scheduler config not JSON", write("scheduler_config.json", "{")),
        (
            "scheduler config missing a key",
            lambda f: (f / "scheduler_config.json").write_text(
                json.dumps(
                    {
                        k: v
                        for k, v in json.loads((f / "scheduler_config.json").read_text()).items()
                        if k != "beta_end"
                    }
                )
            ),
        ),
        ("verification stamp garbage (ignored)", write(".effdiff-verified.json", "{{{")),
    ]:
        expect_ok = "ignored" in name
        if expect_ok:

            def case(change=change) -> str:
                folder = work / "stamp"
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(good, folder)
                change(folder)
                return gen(folder=folder, expect_ok=True)

            add("artifacts folder", name, case)
        else:
            add("artifacts folder", name, damaged(name.split()[0], change))
    add("artifacts folder", "verify a corrupted folder", lambda: _verify_corrupted(work, good))
    add(
        "artifacts folder", "verify a missing folder", lambda: cli("effdiff", "verify", str(work / "missing"))
    )
    add(
        "artifacts folder",
        "verify a good folder",
        lambda: cli("effdiff", "verify", str(good), expect_ok=True),
    )

    # ---- C. export
    model = work / "notamodel"
    model.mkdir()
    for name, extra in [
        ("model missing", ["--model", str(work / "none")]),
        ("model is a file", ["--model", str(good / "manifest.json")]),
        ("model folder not a pipeline", ["--model", str(model)]),
        ("unknown built-in", ["--model", "tiny-sd9"]),
        ("height not a multiple", ["--model", "tiny-sd1", "--height", "100"]),
        ("height negative", ["--model", "tiny-sd1", "--height", "-64"]),
        ("opset out of range", ["--model", "tiny-sd1", "--opset", "7"]),
        ("precision int8 (a separate command)", ["--model", "tiny-sd1", "--precision", "int8"]),
    ]:
        add(
            "export",
            name,
            lambda extra=extra: cli("effdiff-export", "onnx", *extra, "--out", str(work / "x"), "--quiet"),
        )
    add(
        "export",
        "out under a file",
        lambda: cli(
            "effdiff-export",
            "onnx",
            "--model",
            "tiny-sd1",
            "--out",
            str(good / "manifest.json" / "x"),
            "--quiet",
        ),
    )
    for kind, cfg in [
        ("SDXL added conditions", {"addition_embed_type": "text_time"}),
        ("class embeddings", {"class_embed_type": "timestep"}),
        ("LCM timestep condition", {"time_cond_proj_dim": 256}),
        ("GLIGEN attention", {"attention_type": "gated"}),
        ("not a UNet2DConditionModel", {"_class_name": "UNet2DModel"}),
        ("no mid block", {"mid_block_type": None}),
    ]:
        add("export", kind, lambda cfg=cfg, kind=kind: _unsupported_unet(work, kind, cfg))
    add("export", "two writers at once", lambda: _two_writers(work))
    add("export", "killed in another model's folder", lambda: _killed_in_foreign_folder(work, good))

    # ---- D. Python API misuse
    pipe = Pipeline.load(good)
    lat = np.zeros((1, 4, 8, 8), np.float32)
    for name, fn in [
        ("load(123)", lambda: Pipeline.load(123)),
        ("load(providers=str)", lambda: Pipeline.load(good, providers="CPUExecutionProvider")),
        ("load(precision='int4')", lambda: Pipeline.load(good, precision="int4")),
        ("load(backend='tensorrt-xyz')", lambda: Pipeline.load(good, backend="tensorrt-xyz")),
        ("prompt=None", lambda: pipe(None, steps=2)),
        ("prompt=[]", lambda: pipe([], steps=2)),
        ("prompt=['a', 3]", lambda: pipe(["a", 3], steps=2)),
        ("negative_prompt=5", lambda: pipe("a", 5, steps=2)),
        ("steps=2.5", lambda: pipe("a", steps=2.5)),
        ("steps=True", lambda: pipe("a", steps=True)),
        ("guidance_scale='7'", lambda: pipe("a", steps=2, guidance_scale="7")),
        ("guidance_scale=nan", lambda: pipe("a", steps=2, guidance_scale=float("nan"))),
        ("seed=-3", lambda: pipe("a", steps=2, seed=-3)),
        ("seed=1.5", lambda: pipe("a", steps=2, seed=1.5)),
        ("height=64.0", lambda: pipe("a", steps=2, height=64.0)),
        ("latents wrong shape", lambda: pipe("a", steps=2, latents=np.zeros((1, 4, 4, 4), np.float32))),
        ("latents a list", lambda: pipe("a", steps=2, latents=[[0.0]])),
        ("latents with inf", lambda: pipe("a", steps=2, latents=lat + np.inf)),
        ("propagation=3", lambda: pipe("a", steps=2, propagation=3)),
        ("max_decoder_batch=0", lambda: pipe("a", steps=2, propagation="uniform:1", max_decoder_batch=0)),
        ("vae_tile=0", lambda: pipe("a", steps=2, vae_tile=0)),
        ("noise_injection='on'", lambda: pipe("a", steps=2, noise_injection="on")),
        ("NoiseInjection(alpha=inf)", lambda: NoiseInjection(float("inf"))),
        (
            "hook returns a wrong shape",
            lambda: pipe("a", steps=2, hooks=Hooks(on_step=lambda i, t, x: x[:, :1])),
        ),
        ("denoise start >= stop", lambda: _denoise(pipe, start_step=3, stop_step=2)),
        ("denoise stop beyond the plan", lambda: _denoise(pipe, stop_step=99)),
        ("denoise without injection noise", lambda: _denoise(pipe, injection=False)),
    ]:
        add("Python API", name, lambda fn=fn: api(fn))
    add("Python API", "valid call (control)", lambda: api(lambda: pipe("a", steps=2), expect_ok=True))

    # ---- E. bench and demo arguments
    for name, extra in [
        ("config int4", ["--configs", "int4"]),
        ("unknown peer", ["--peers", "comfyui"]),
        ("repeat 0", ["--repeat", "0"]),
        ("guidance nan", ["--guidance", "nan"]),
        ("fd schedule bogus", ["--configs", "fd:bogus"]),
        ("steps 0", ["--steps", "0"]),
    ]:
        add(
            "bench",
            name,
            lambda extra=extra: cli(
                "effdiff", "bench", "--artifacts", str(good), "--out", str(work / "rep"), "--quiet", *extra
            ),
        )
    add("bench", "demo steps 0", lambda: cli("effdiff", "demo", "--out", str(work / "demo"), "--steps", "0"))

    print(f"{len(cases)} cases\n", flush=True)
    print("| class | case | result |\n|---|---|---|")
    results: dict[str, list[str]] = {}
    for case in cases:
        start = time.perf_counter()
        outcome = case.run()
        results.setdefault(case.cls, []).append(outcome)
        print(f"| {case.cls} | {case.name} | {outcome} ({time.perf_counter() - start:.1f} s) |", flush=True)
    intact = all((good / n).read_bytes() == b for n, b in pristine.items())
    manifest_ok = Manifest.read(good).passed
    print("\n| class | cases | clean | not clean |\n|---|---|---|---|")
    bad_total = 0
    for cls, outs in results.items():
        bad = [o for o in outs if o not in ("clean", "ok")]
        bad_total += len(bad)
        print(f"| {cls} | {len(outs)} | {len(outs) - len(bad)} | {len(bad)} |")
    print(
        f"\nall {len(cases)} cases clean: {bad_total == 0}; the good folder intact afterwards: "
        f"{intact and manifest_ok}"
    )
    sys.exit(0 if bad_total == 0 and intact else 1)


def _verify_corrupted(work: Path, good: Path) -> str:
    folder = work / "verify-corrupted"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(good, folder)
    with (folder / "unet_decoder.onnx").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    return cli("effdiff", "verify", str(folder))


def _unsupported_unet(work: Path, kind: str, cfg: dict) -> str:
    root = work / ("unet-" + "".join(c if c.isalnum() else "-" for c in kind))
    shutil.rmtree(root, ignore_errors=True)
    comps = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
    for c in comps:
        (root / c).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({c: ["x", "y"] for c in comps}))
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **cfg}))
    return cli("effdiff-export", "onnx", "--model", str(root), "--out", str(work / "x"), "--quiet")


def _popen_export(model: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "effdiff-export"), "onnx", "--model", model, "--out", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _two_writers(work: Path) -> str:
    out = work / "two-writers"
    shutil.rmtree(out, ignore_errors=True)
    first = _popen_export("tiny-sd1", out)
    try:
        deadline = time.monotonic() + 300
        while not (out / "tokenizer").exists():
            if first.poll() is not None or time.monotonic() > deadline:
                return "FAILED: the first export did not start"
            time.sleep(0.05)
        return cli("effdiff-export", "onnx", "--model", "tiny-sd1", "--out", str(out), "--quiet")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def _killed_in_foreign_folder(work: Path, good: Path) -> str:
    folder = work / "foreign"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(good, folder)
    proc = _popen_export("tiny-sd2", folder)
    deadline = time.monotonic() + 300
    while (folder / "manifest.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return "FAILED: the export did not replace the manifest"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = cli(
        "effdiff",
        "generate",
        "--artifacts",
        str(folder),
        "--prompt",
        "p",
        "--out",
        str(work / "foreign.png"),
        "--steps",
        "2",
        "--quiet",
    )
    if (work / "foreign.png").exists():
        return "USED A MIXED FOLDER: an image was written"
    return result


def _denoise(
    pipe: object, start_step: int = 0, stop_step: int | None = None, injection: bool = True
) -> object:
    cond = pipe.encode_prompt("a", guidance_scale=3.0)
    plan = pipe.plan(4, "ddim", "uniform:2", noise_injection="auto")
    x = np.zeros((1, 4, 8, 8), np.float32)
    return pipe.denoise(x, cond, plan, start_step, stop_step, injection_noise=x if injection else None)


if __name__ == "__main__":
    main()
