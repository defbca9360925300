"""Without the optional packages: every light module imports, every command's --help works, and the
commands that need an extra say which one."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"torch", "diffusers", "transformers", "onnx", "onnxscript", "safetensors", "accelerate", "ray"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {name!r} (blocked by test)")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_light_modules_import_without_torch() -> None:
    proc = run_blocked(
        """
        import importlib, pkgutil, effdiff
        from effdiff._deps import MissingDependency
        needs_export = []
        for mod in pkgutil.walk_packages(effdiff.__path__, "effdiff."):
            try:
                importlib.import_module(mod.name)
            except MissingDependency as exc:
                assert "effdiff[export]" in str(exc), exc
                needs_export.append(mod.name)
        # torch-only by design: the export, and the split modules the `torch` backend imports lazily
        torch_only = ("effdiff.export", "effdiff.runtime.backends.torch_modules")
        assert all(m.startswith(torch_only) for m in needs_export), needs_export
        print("ok", len(needs_export))
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_help_and_extra_hint_without_torch() -> None:
    proc = run_blocked(
        """
        import sys
        from click.testing import CliRunner
        from effdiff.cli import main
        runner = CliRunner()
        def commands(group, path):
            yield path
            for name, cmd in getattr(group, "commands", {}).items():
                yield from commands(cmd, [*path, name])
        for path in commands(main, []):
            res = runner.invoke(main, [*path, "--help"])
            assert res.exit_code == 0, (path, res.output)
        res = runner.invoke(main, ["export", "onnx", "--model", "tiny-sd1", "--out", "/nonexistent/x"])
        assert res.exit_code != 0 and "effdiff[export]" in res.output, res.output
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr + proc.stdout


def test_without_onnxruntime_the_runtime_names_its_extra(sd1_artifacts) -> None:
    """Core effdiff has no onnxruntime of its own (the `cpu` or `gpu` extra brings one)."""
    proc = run_blocked(
        f"""
        import sys
        BLOCKED.add("onnxruntime")
        from click.testing import CliRunner
        from effdiff.cli import main
        res = CliRunner().invoke(
            main, ["generate", "--artifacts", {str(sd1_artifacts)!r}, "--prompt", "p", "--out", "/tmp/x.png"]
        )
        assert res.exit_code != 0, res.output
        assert "effdiff[cpu]" in res.output and "effdiff[gpu]" in res.output, res.output
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr + proc.stdout
