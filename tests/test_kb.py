"""The trajectory knowledge base: build, resume after SIGKILL, shards and merge, search, retrieval start
(adaptive, mixed batches, multistep samplers, propagation), inspection and bad input. Tiny KBs on
tiny-sd1 (24 entries of 8-step trajectories), real faiss indexes on disk, real onnxruntime runs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from effdiff.bench.harness import parse_configs
from effdiff.errors import EffdiffError
from effdiff.kb.adaptive import JumpPolicy, longest_jump
from effdiff.kb.build import IndexOptions, build_kb, merge_kb
from effdiff.kb.evaluate import eval_index, kb_info
from effdiff.kb.retrieval import RetrievalStart, as_prompt_gate, jump_policy
from effdiff.kb.store import KB_MANIFEST, PARTIAL, BuildSettings, KBManifest, KnowledgeBase
from effdiff.runtime.pipeline import Hooks, Pipeline
from effdiff.specs import Precision

from .test_cli import BIN, assert_one_line_error, run

PROMPTS = [
    f"a {c} {k} on a {b} background"
    for c in ("red", "blue", "green")
    for k in ("cat", "dog")
    for b in ("white", "black")
]  # 12 prompts
SEEDS = (0, 1)
STEPS = 8
SETTINGS = BuildSettings(steps=STEPS, guidance=5.0, key_step=2, value_steps=(4, 6), seeds=SEEDS)
SMALL = IndexOptions("PCA16,PQ4x4", "PQ4x4")


@pytest.fixture(scope="module")
def kb_folder(sd1_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kb") / "tiny"
    report = build_kb(
        sd1_artifacts,
        PROMPTS,
        out,
        SETTINGS,
        checkpoint_every=8,
        batch=5,
        progress=False,
        log=lambda _m: None,
        index=SMALL,
    )
    assert report.entries == report.generated == len(PROMPTS) * len(SEEDS)
    return out


@pytest.fixture(scope="module")
def kb(kb_folder: Path) -> KnowledgeBase:
    return KnowledgeBase.open(kb_folder)


@pytest.fixture(scope="module")
def pipe(sd1_artifacts: Path) -> Pipeline:
    return Pipeline.load(sd1_artifacts)


def full_run(pipe: Pipeline, prompts: list[str], unit: np.ndarray, sampler: str = "ddim", **kw) -> np.ndarray:
    res = pipe(prompts, steps=STEPS, sampler=sampler, guidance_scale=5.0, latents=unit, **kw)
    return res.latents


def noise(pipe: Pipeline, seeds: list[int]) -> np.ndarray:
    return np.concatenate([pipe.initial_noise(1, 64, 64, s, None) for s in seeds])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- the store


def test_kb_files_manifest_and_trajectories(kb: KnowledgeBase, pipe: Pipeline, kb_folder: Path) -> None:
    m = kb.manifest
    assert m.kind == "kb" and m.entries == 24 and m.latent_shape == (4, 8, 8)
    assert set(m.files) == {
        "prompts.txt",
        "entries.npy",
        "keys.npy",
        "values.npy",
        "prompt_keys.npy",
        "index.faiss",
        "prompt_index.faiss",
        "loo.npy",
    }
    assert not (kb_folder / PARTIAL).exists()
    # entry e = (prompt e // 2, seed e % 2), in order
    np.testing.assert_array_equal(kb.entries[:, 0], np.repeat(np.arange(12), 2))
    np.testing.assert_array_equal(kb.entries[:, 1], np.tile(SEEDS, 12))
    assert kb.keys.dtype == np.float16 and kb.values.shape == (24, 2, 256)
    # the stored key and values are the runtime's own trajectory (entry 7 = prompt 3, seed 1)
    seen: dict[int, np.ndarray] = {}
    hooks_on = lambda i, _t, x: seen.__setitem__(i + 1, x.copy())  # noqa: E731
    pipe(
        [PROMPTS[3]], steps=STEPS, guidance_scale=5.0, latents=noise(pipe, [1]), hooks=Hooks(on_step=hooks_on)
    )
    np.testing.assert_allclose(kb.keys[7], seen[2].ravel(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(kb.values[7, 1], seen[6].ravel(), rtol=2e-3, atol=2e-3)
    # thresholds derived from leave-one-out distances, a longer jump never allowed farther away
    thr = m.adaptive["latent"]["thresholds"]
    assert thr["4"] >= thr["6"] > 0 and m.adaptive["latent"]["loo_entries"] == 24


def test_search_reranks_exactly_and_reports_sizes(kb: KnowledgeBase, kb_folder: Path) -> None:
    q = np.asarray(kb.keys, np.float32) + 0.01
    got = kb.search(q, 3)
    truth = kb.exact_search(q, 3)
    np.testing.assert_array_equal(got.ids[:, 0], truth.ids[:, 0])
    np.testing.assert_allclose(got.distances, truth.distances, rtol=1e-4)
    ev = eval_index(kb, queries=24)
    assert ev.recall_at_1 == 1.0 and ev.recall_at_10 == 1.0 and ev.latency_ms["median"] > 0
    info = kb_info(kb_folder, checksum=True)
    text = "\n".join(info.lines())
    assert "entries: 24" in text and "index type: PCA16,PQ4x4" in text
    assert m_entry_bytes(kb) == 2  # 4 sub-quantizers x 4 bits, no ids: 256x smaller than 512 B
    assert "bytes per entry in RAM: 2 " in text and "bytes per entry on disk:" in text


def m_entry_bytes(kb: KnowledgeBase) -> int:
    assert kb.manifest.index is not None
    return kb.manifest.index.entry_bytes


# ---------------------------------------------------------------- retrieval start


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_no_jump_reproduces_full_generation(pipe: Pipeline, kb_folder: Path, sampler: str) -> None:
    kb = KnowledgeBase.open(kb_folder)
    kb.settings = BuildSettings(
        **{**kb.settings.to_json(), "sampler": sampler, "value_steps": (4, 6), "seeds": SEEDS}
    )  # as if built for this sampler
    runner = RetrievalStart(pipe, kb, policy=jump_policy(kb, "none"))
    unit = noise(pipe, [0, 7])
    res = runner(PROMPTS[:2], latents=unit)
    np.testing.assert_array_equal(res.latents, full_run(pipe, PROMPTS[:2], unit, sampler))
    assert [j.start_step for j in res.jumps] == [None, None] and res.saved == 0.0


def test_mixed_batch_jumps_per_image(pipe: Pipeline, kb: KnowledgeBase) -> None:
    """Image 0 is a KB entry (distance ~0: jumps 2 -> 6), image 1 starts from unseen noise (no jump).
    Each comes back in its place; the one that did not jump is exactly its full run; the one that
    jumped continues from its own stored latent."""
    policy = JumpPolicy((4, 6), (0.05, 0.05))
    runner = RetrievalStart(pipe, kb, combine="nearest", policy=policy)
    unit = noise(pipe, [1, 1234])
    prompts = [PROMPTS[5], PROMPTS[0]]
    res = runner(prompts, latents=unit)
    assert [j.start_step for j in res.jumps] == [6, None]
    assert res.jumps[0].distance < 0.02 and res.jumps[0].neighbours[0] == 11  # prompt 5, seed 1
    assert res.jumps[0].unet_steps == STEPS - 4 and res.jumps[1].unet_steps == STEPS
    full = full_run(pipe, prompts, unit)
    np.testing.assert_allclose(res.latents[1], full[1], rtol=1e-5, atol=1e-6)  # batch of 1 vs 2 rows
    assert rel(res.latents[0], full[0]) < 5e-3, "continued from its stored (float16) latent at step 6"
    assert res.calls["unet"] == 2 + (STEPS - 6) + (STEPS - 2)  # key steps once, then one call per group step
    assert "jumps 2->6, full" in res.summary(2) and "saved 25 %" in res.summary(2)


def test_mixed_batch_with_multistep_sampler(pipe: Pipeline, sd1_artifacts: Path, tmp_path: Path) -> None:
    """DPM-Solver++: the unjumped image equals its full run exactly (its history restricted to it); the
    jumped one restarts the history at the value step, close to the full run."""
    out = tmp_path / "dpm"
    settings = BuildSettings(
        sampler="dpmpp-2m", steps=STEPS, guidance=5.0, key_step=2, value_steps=(4,), seeds=(0,)
    )
    build_kb(
        sd1_artifacts,
        PROMPTS[:6],
        out,
        settings,
        progress=False,
        log=lambda _m: None,
        index=IndexOptions("Flat", "Flat"),
    )
    kb = KnowledgeBase.open(out)
    runner = RetrievalStart(pipe, kb, combine="nearest", policy=JumpPolicy((4,), (0.05,)))
    unit = noise(pipe, [0, 99])
    prompts = [PROMPTS[2], PROMPTS[3]]
    res = runner(prompts, latents=unit)
    assert [j.start_step for j in res.jumps] == [4, None]
    full = full_run(pipe, prompts, unit, "dpmpp-2m")
    np.testing.assert_allclose(res.latents[1], full[1], rtol=1e-5, atol=1e-6)  # batch of 1 vs 2 rows
    assert 0 < rel(res.latents[0], full[0]) < 0.05


def test_adaptive_default_and_far_queries(pipe: Pipeline, kb: KnowledgeBase) -> None:
    runner = RetrievalStart(pipe, kb)  # the KB's own thresholds, ReDi's least-squares blend
    unit = noise(pipe, [0, 0, 4321])
    res = runner([PROMPTS[0], "a purple fish on a green background", PROMPTS[0]], latents=unit)
    assert res.jumps[0].start_step == 6, "a stored trajectory is as near as it gets: the longest jump"
    assert res.jumps[2].start_step is None, "unseen starting noise is far from every key: no jump"
    assert np.isfinite(res.latents).all() and len(res.images) == 3
    assert res.unet_steps == sum(j.unet_steps for j in res.jumps)


def test_prompt_gate_keeps_prompts_unlike_the_kb_from_jumping(pipe: Pipeline, kb: KnowledgeBase) -> None:
    """A latent can sit beside a stored one while its prompt is unlike every stored prompt: with the
    gate such an image is generated in full and says why; without it, it jumps."""
    from effdiff.kb.build import prompt_keys

    far = "a purple fish on a green background"
    d = kb.search(prompt_keys(pipe.encode_prompt([far], "", 1, 5.0)), 1, "prompt").distances[0, 0]
    assert d > kb.loo[:, 1].max(), "precondition: a prompt farther than any stored prompt's neighbour"
    always = JumpPolicy((4, 6), (np.inf, np.inf))  # the latent distance admits every jump
    unit = noise(pipe, [0, 0])
    gated = RetrievalStart(pipe, kb, combine="nearest", policy=always.gated(kb.loo[:, 1], 1.0))
    res = gated([PROMPTS[0], far], latents=unit)
    assert [j.start_step for j in res.jumps] == [6, None]
    assert [j.prompt_gated for j in res.jumps] == [False, True]
    assert "jumps 2->6, full (prompt far from the KB)" in res.summary(2)
    open_ = RetrievalStart(pipe, kb, combine="nearest", policy=always.gated(kb.loo[:, 1], None))
    assert [j.start_step for j in open_([PROMPTS[0], far], latents=unit).jumps] == [6, 6]
    # the default: the KB's adaptive thresholds with the gate at the 0.95 quantile, latent mode only
    assert kb.policy().prompt_limit == pytest.approx(np.quantile(kb.loo[:, 1], 0.95))
    assert kb.policy("prompt").prompt_limit == np.inf
    assert jump_policy(kb, "6").prompt_limit == np.inf  # ReDi's fixed jump stays ungated
    for bad in ("1.5", "x"):
        with pytest.raises(EffdiffError, match="prompt gate"):
            as_prompt_gate(bad)


def test_prompt_mode_jumps_before_the_first_step(pipe: Pipeline, kb: KnowledgeBase) -> None:
    runner = RetrievalStart(pipe, kb, mode="prompt", combine="nearest", policy=JumpPolicy.fixed(4))
    res = runner([PROMPTS[1]], latents=noise(pipe, [0]))
    assert res.jumps[0].start_step == 4 and res.jumps[0].unet_steps == STEPS - 4
    assert res.calls["unet"] == STEPS - 4 and res.jumps[0].distance == pytest.approx(0, abs=1e-2)
    assert "jumps 0->4" in res.summary(2)


def test_composes_with_encoder_propagation(pipe: Pipeline, kb: KnowledgeBase) -> None:
    runner = RetrievalStart(pipe, kb, combine="nearest", policy=JumpPolicy.fixed(4))
    res = runner([PROMPTS[0]], latents=noise(pipe, [0]), propagation="uniform:3", noise_injection=None)
    # encoder at keys 0 (before the lookup), then at 4 (the restart) and 6 (the schedule's)
    assert res.calls["unet_encoder"] == 3 and res.calls.get("unet", 0) == 0
    assert res.jumps[0].start_step == 4 and np.isfinite(res.latents).all()


def test_composes_with_the_cache_recipe(pipe: Pipeline, kb: KnowledgeBase) -> None:
    runner = RetrievalStart(pipe, kb, combine="nearest", policy=JumpPolicy.fixed(4))
    res = runner([PROMPTS[0]], latents=noise(pipe, [0]), propagation="cache:3", noise_injection=None)
    # the deep path at keys 0 (before the lookup), 4 (the restart) and 6 (the schedule's); shallow between
    assert res.calls["unet_deep"] == 3
    assert res.calls["unet_deep"] + res.calls["unet_shallow"] == res.jumps[0].unet_steps
    assert res.calls.get("unet", 0) == 0 and np.isfinite(res.latents).all()


def test_kb_built_on_the_cache_recipe_holds_its_trajectories(
    pipe: Pipeline, kb: KnowledgeBase, sd1_artifacts: Path, tmp_path: Path
) -> None:
    """`propagation="cache:3"`: the keys and values are what a cache:3 generation holds after the key
    and value steps (not the whole UNet's); kb.json, the tie and `kb info` say so; a generation on
    another schedule is not refused, its summary names both."""
    out = tmp_path / "cache3"
    settings = dataclasses.replace(SETTINGS, propagation="cache:3")
    build_kb(
        sd1_artifacts,
        PROMPTS[:3],
        out,
        settings,
        batch=4,
        progress=False,
        log=lambda _m: None,
        index=IndexOptions("Flat", "Flat"),
    )
    cached = KnowledgeBase.open(out)
    assert cached.settings.propagation == "cache:3"
    assert json.loads((out / KB_MANIFEST).read_text())["settings"]["propagation"] == "cache:3"
    assert {"unet_deep.fp32", "unet_shallow.fp32"} <= set(cached.manifest.tie["unet_files"])
    assert "unet_deep.fp32" not in kb.manifest.tie["unet_files"], "a whole-UNet KB's tie is unchanged"
    assert "trajectories: propagation cache:3" in "\n".join(kb_info(out).lines())
    seen: dict[int, np.ndarray] = {}
    hooks = Hooks(on_step=lambda i, _t, x: seen.__setitem__(i + 1, x.copy()))
    full_run(pipe, [PROMPTS[1]], noise(pipe, [1]), propagation="cache:3", hooks=hooks)
    # entry 3 = prompt 1, seed 1, in both KBs
    np.testing.assert_allclose(cached.keys[3], seen[2].ravel(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cached.values[3, 1], seen[6].ravel(), rtol=2e-3, atol=2e-3)
    whole = np.asarray(kb.keys[3], np.float32)
    assert rel(whole, seen[2].ravel()) > 10 * rel(np.asarray(cached.keys[3], np.float32), seen[2].ravel())
    assert rel(np.asarray(kb.values[3, 1], np.float32), np.asarray(cached.values[3, 1], np.float32)) > 1e-2
    runner = RetrievalStart(pipe, cached, combine="nearest", policy=JumpPolicy.fixed(4))
    same = runner([PROMPTS[1]], latents=noise(pipe, [1]), propagation="cache:3")
    assert "KB built with" not in same.summary(2) and same.jumps[0].distance < 2e-2
    other = runner([PROMPTS[1]], latents=noise(pipe, [1]))
    assert "KB built with propagation cache:3, this run none" in other.summary(2)
    assert other.jumps[0].distance > same.jumps[0].distance
    # the bench, given both KBs, starts each `kb` configuration from the KB of its own schedule
    names = ["kb", "kb+cache:3", "kb+fd"]
    configs = {c.name: c.kb for c in parse_configs(names, "ddim", 6, [kb.folder, out])}
    assert configs == {"full": None, "kb": kb.folder, "kb+cache:3": out, "kb+fd": kb.folder}


def test_resume_with_another_propagation_is_refused(sd1_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    settings = dataclasses.replace(SETTINGS, seeds=(0,))
    common = dict(checkpoint_every=1, batch=1, progress=False, log=lambda _m: None)
    with pytest.raises(EffdiffError, match="needs more training points"):  # leaves its checkpoints
        build_kb(sd1_artifacts, PROMPTS[:2], out, settings, IndexOptions("PCA256,IVF256,PQ16"), **common)
    assert (out / PARTIAL / "state.json").exists()
    cache = dataclasses.replace(settings, propagation="cache:3")
    with pytest.raises(EffdiffError, match=r"other propagation 'none' \(this run: 'cache:3'\)") as err:
        build_kb(sd1_artifacts, PROMPTS[:2], out, cache, SMALL, resume=True, **common)
    assert "\n" not in str(err.value)
    # a state written before the field existed reads as "none": it resumes without generating again
    state = out / PARTIAL / "state.json"
    data = json.loads(state.read_text())
    del data["settings"]["propagation"]
    state.write_text(json.dumps(data))
    flat = IndexOptions("Flat", "Flat")
    rep = build_kb(sd1_artifacts, PROMPTS[:2], out, settings, flat, resume=True, **common)
    assert rep.generated == 0 and rep.entries == 2
    # and so does a kb.json written before it
    manifest = json.loads((out / KB_MANIFEST).read_text())
    del manifest["settings"]["propagation"]
    assert KBManifest.from_json(manifest).settings == settings
    with pytest.raises(EffdiffError, match="bad key-step schedule"):
        dataclasses.replace(settings, propagation="cache:x").check()
    with pytest.raises(EffdiffError, match="preset fd-ddim50 is for 50 steps, not 8"):
        dataclasses.replace(settings, propagation="fd-ddim50").check()


def test_runtime_refuses_a_kb_for_another_run(pipe: Pipeline, kb: KnowledgeBase, sd2_artifacts: Path) -> None:
    runner = RetrievalStart(pipe, kb)
    with pytest.raises(EffdiffError, match="holds ddim 8-step trajectories; this run asks for steps 20"):
        runner("a cat", steps=20)
    with pytest.raises(EffdiffError, match="guidance 5"):
        runner("a cat", guidance_scale=7.5)
    with pytest.raises(EffdiffError, match="another image size"):
        runner("a cat", height=128, width=128)
    with pytest.raises(EffdiffError, match="built for other artifacts"):
        RetrievalStart(Pipeline.load(sd2_artifacts, lean=True), kb)


# ---------------------------------------------------------------- build: resume, shards, merge


def test_sigkill_mid_build_resumes_without_loss_or_duplicates(
    sd1_artifacts: Path, kb: KnowledgeBase, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 3) + "\n")  # 36 prompts x 2 seeds = 72 entries
    out = tmp_path / "killed"
    args = [
        "effdiff",
        "kb",
        "build",
        "--artifacts",
        str(sd1_artifacts),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--seeds",
        "0,1",
        "--steps",
        str(STEPS),
        "--guidance",
        "5",
        "--key-step",
        "2",
        "--value-steps",
        "4,6",
        "--index",
        "PCA16,PQ4x4",
        "--prompt-index",
        "PQ4x4",
        "--checkpoint-every",
        "8",
        "--batch",
        "4",
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(BIN / args[0]), *args[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not list((out / PARTIAL).glob("chunk-*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / KB_MANIFEST).exists(), "the build finished before it could be killed"
    done = len(list((out / PARTIAL).glob("chunk-*.npz")))
    assert 1 <= done < 9
    with pytest.raises(EffdiffError, match="has not finished"):
        KBManifest.read(out)
    assert_one_line_error(run(*args), "pass --resume")
    resumed = run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{72 - 8 * done} generated now, {8 * done} from checkpoints" in resumed.stdout
    again = KnowledgeBase.open(out)
    expected = [(p, s) for p in range(36) for s in SEEDS]
    assert [tuple(e) for e in again.entries.tolist()] == expected, "every entry exactly once, in order"
    # prompts repeat every 12: their trajectories equal the fixture's, whichever run made them
    np.testing.assert_allclose(
        np.asarray(again.keys[48:72], np.float32), np.asarray(kb.keys, np.float32), atol=2e-3
    )
    assert not (out / PARTIAL).exists()


def test_shards_merge_into_the_same_kb(sd1_artifacts: Path, kb: KnowledgeBase, tmp_path: Path) -> None:
    parts = []
    for i in (1, 0, 2):
        part = tmp_path / f"part{i}"
        rep = build_kb(
            sd1_artifacts,
            PROMPTS,
            part,
            SETTINGS,
            shard=(i, 3),
            batch=8,
            progress=False,
            log=lambda _m: None,
            index=SMALL,
        )
        assert rep.kind == "part" and rep.entries == 8
        parts.append(part)
    with pytest.raises(EffdiffError, match="part 0"):
        KnowledgeBase.open(parts[1])
    with pytest.raises(EffdiffError, match=r"missing \[2\]"):
        merge_kb(parts[:2], tmp_path / "bad", SMALL)
    with pytest.raises(EffdiffError, match=r"repeated \[1\]"):
        merge_kb([*parts, parts[0]], tmp_path / "bad", SMALL)
    merged = merge_kb(parts, tmp_path / "merged", SMALL, log=lambda _m: None)
    assert merged.entries == 24
    m = KnowledgeBase.open(tmp_path / "merged")
    np.testing.assert_array_equal(m.entries, kb.entries)
    np.testing.assert_allclose(np.asarray(m.values, np.float32), np.asarray(kb.values, np.float32), atol=2e-3)


def test_small_kb_and_a_big_index_fail_in_one_line(sd1_artifacts: Path, tmp_path: Path) -> None:
    with pytest.raises(EffdiffError, match=r"needs more training points than the 24 entries.*PCA16,PQ8x4"):
        build_kb(
            sd1_artifacts,
            PROMPTS,
            tmp_path / "big",
            SETTINGS,
            IndexOptions("PCA256,IVF256,PQ16", "PQ4x4"),
            progress=False,
            log=lambda _m: None,
        )
    # the generated entries stay in checkpoints: a smaller index resumes without generating again
    rep = build_kb(
        sd1_artifacts,
        PROMPTS,
        tmp_path / "big",
        SETTINGS,
        resume=True,
        progress=False,
        log=lambda _m: None,
        index=SMALL,
    )
    assert rep.generated == 0 and rep.entries == 24


# ---------------------------------------------------------------- command line


def test_cli_generate_info_and_eval(sd1_artifacts: Path, kb_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    proc = run(
        "effdiff",
        "generate",
        "--artifacts",
        str(sd1_artifacts),
        "--prompt",
        PROMPTS[0],
        "--out",
        str(out),
        "--kb",
        str(kb_folder),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "kb (latent): jumps 2->6; UNet steps 4 of 8 (saved 50 %)" in proc.stdout and out.exists()
    errors = json.loads((kb_folder / KB_MANIFEST).read_text())["adaptive"]["latent"]["value_rel_error"]
    cap = (errors["4"]["lstsq"] + errors["6"]["lstsq"]) / 2
    capped = run(
        "effdiff", "generate", "--artifacts", str(sd1_artifacts), "--prompt", PROMPTS[0], "--out", str(out),
        "--kb", str(kb_folder), "--kb-max-error", f"{cap:.6g}", "--quiet",
    )  # fmt: skip
    assert capped.returncode == 0 and "kb (latent): jumps 2->4;" in capped.stdout, capped.stderr
    info = run("effdiff", "kb", "info", str(kb_folder))
    assert info.returncode == 0 and "entries: 24" in info.stdout and "bytes per entry in RAM" in info.stdout
    assert "prompt gate (latent jumps): prompt distance <=" in info.stdout
    assert "--kb-combine lstsq may go to every value step (within lstsq value error 0.2" in info.stdout
    ev = run("effdiff", "kb", "eval", str(kb_folder), "--queries", "24")
    assert ev.returncode == 0, ev.stderr
    assert "recall@1 1.000" in ev.stdout and "lookup latency per query" in ev.stdout
    flat = tmp_path / "flat"
    args = ["--index", "Flat", "--prompt-index", "Flat", "--jump-quantiles", "0.9,0.5"]
    re = run("effdiff", "kb", "reindex", str(kb_folder), "--out", str(flat), *args)
    assert re.returncode == 0 and "24 entries (0 generated now" in re.stdout, re.stderr
    info = run("effdiff", "kb", "info", str(flat), "--checksum")
    assert "index type: Flat" in info.stdout and "quantiles 0.9,0.5" in info.stdout, info.stdout
    assert_one_line_error(
        run("effdiff", "kb", "reindex", str(kb_folder), "--out", str(flat)), "already holds"
    )


def test_cli_bad_input_is_one_line(
    sd1_artifacts: Path, sd2_artifacts: Path, kb_folder: Path, tmp_path: Path
) -> None:
    gen = ["effdiff", "generate", "--prompt", "p", "--out", str(tmp_path / "o.png"), "--kb", str(kb_folder)]
    assert_one_line_error(run(*gen, "--artifacts", str(sd2_artifacts)), "built for other artifacts")
    assert_one_line_error(run(*gen, "--artifacts", str(sd1_artifacts), "--steps", "20"), "asks for steps 20")
    assert_one_line_error(run(*gen, "--artifacts", str(sd1_artifacts), "--sampler", "euler"), "sampler euler")
    assert_one_line_error(
        run(*gen, "--artifacts", str(sd1_artifacts), "--kb-prompt-gate", "2"), "prompt gate is a quantile"
    )
    assert_one_line_error(
        run(*gen, "--artifacts", str(sd1_artifacts), "--kb-max-error", "0"), "largest value error is"
    )
    broken = tmp_path / "broken"
    shutil.copytree(kb_folder, broken)
    values = broken / "values.npy"
    data = bytearray(values.read_bytes())
    data[-1] ^= 0xFF
    values.write_bytes(bytes(data))
    assert_one_line_error(run("effdiff", "kb", "info", str(broken), "--checksum"), "sha256")
    assert_one_line_error(run(*gen[:-1], str(broken), "--artifacts", str(sd1_artifacts)), "sha256")
    (broken / "keys.npy").unlink()
    assert_one_line_error(run("effdiff", "kb", "info", str(broken)), "keys.npy is missing")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    build = ["effdiff", "kb", "build", "--artifacts", str(sd1_artifacts), "--out", str(tmp_path / "k")]
    assert_one_line_error(run(*build, "--prompts", str(empty)), "holds no prompts")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert_one_line_error(
        run(*build, "--prompts", str(prompts), "--key-step", "10", "--value-steps", "5,20"),
        "value step 5 is not after the key step 10",
    )
    assert_one_line_error(
        run(*build, "--prompts", str(prompts), "--steps", "20", "--key-step", "25"),
        "key step 25 is out of range for 20 steps",
    )
    assert_one_line_error(run(*build, "--prompts", str(prompts), "--shard", "3/2"), "0 <= i < n")
    assert_one_line_error(
        run(*build, "--prompts", str(prompts), "--propagation", "cache:x"), "bad key-step schedule"
    )
    assert_one_line_error(
        run(
            *build,
            "--prompts",
            str(prompts),
            "--steps",
            "20",
            "--value-steps",
            "15",
            "--propagation",
            "fd-ddim50",
        ),
        "preset fd-ddim50 is for 50 steps, not 20",
    )
    assert not (tmp_path / "k").exists()


def test_bench_accepts_kb_configurations(kb_folder: Path) -> None:
    from effdiff.bench.harness import parse_configs

    configs = parse_configs(["kb", "fd+kb", "kb+cache:3", "kb+fd+int8"], "ddim", 50, kb=kb_folder)
    assert [c.name for c in configs] == ["full", "kb", "fd+kb", "kb+cache:3", "kb+fd+int8"]
    assert configs[1].kb == kb_folder and not configs[1].propagation.propagates
    assert configs[2].propagation.propagates and configs[0].kb is None
    assert configs[3].propagation.recipe == "cache" and configs[3].kb == kb_folder
    assert configs[4].precision is Precision.INT8 and configs[4].kb == kb_folder
    with pytest.raises(EffdiffError, match="needs a knowledge base"):
        parse_configs(["kb"], "ddim", 50)


def test_jump_policy_thresholds() -> None:
    d = np.array([1.0, 2.0, 3.0, 4.0, np.inf])
    p = JumpPolicy.from_distances(d, (10, 20), (1.0, 0.0))
    assert p.thresholds == (4.0, 1.0)
    assert p.choose(0.5) == 20 and p.choose(3.0) == 10 and p.choose(9.0) is None
    assert JumpPolicy.from_distances(np.array([np.inf]), (10,), (0.5,)).choose(0.0) is None
    with pytest.raises(EffdiffError, match="one per value step"):
        JumpPolicy.from_distances(d, (10, 20), (0.5,))
    capped = p.capped(10)
    assert capped.thresholds == (4.0, -1.0) and capped.choose(0.5) == 10 and "step 10 at most" in capped.label
    assert p.capped(None) is p and p.capped(20) is p and p.capped(5).choose(0.5) is None
    errors = {"10": {"lstsq": 0.1, "nearest": 0.3}, "20": {"lstsq": 0.25, "nearest": 0.5}}
    assert longest_jump(errors, (10, 20), "lstsq", 0.2) == 10
    assert longest_jump(errors, (10, 20), "nearest", 0.2) == 9  # below every value step: never jumps
    assert longest_jump(errors, (10, 20), "lstsq", 0.3) is None and longest_jump({}, (10, 20)) is None
    assert longest_jump(errors, (10, 20), "lstsq", None) is None


def test_value_error_caps_adaptive_jumps(pipe: Pipeline, kb: KnowledgeBase) -> None:
    """The build records each value step's leave-one-out value error; adaptive jumps stop before the
    first step whose error is past the cap, so the query that jumps furthest without it stops earlier."""
    errors = kb.manifest.adaptive["latent"]["value_rel_error"]
    assert set(errors) == {"4", "6"} and all(0 < e["lstsq"] < 10 for e in errors.values())
    between = (errors["4"]["lstsq"] + errors["6"]["lstsq"]) / 2
    assert errors["4"]["lstsq"] < between < errors["6"]["lstsq"], errors
    unit = noise(pipe, [0])
    uncapped = RetrievalStart(pipe, kb, policy=kb.policy(max_error=None))([PROMPTS[0]], latents=unit)
    assert uncapped.jumps[0].start_step == 6
    policy = jump_policy(kb, "adaptive", max_error=between)
    assert policy.thresholds[1] == -1.0 and "step 4 at most" in policy.label
    capped = RetrievalStart(pipe, kb, policy=policy)([PROMPTS[0]], latents=unit)
    assert capped.jumps[0].start_step == 4 and capped.unet_steps == uncapped.unet_steps + 2
    assert jump_policy(kb, "adaptive", max_error=errors["4"]["lstsq"] / 2).choose(0.0) is None
    assert jump_policy(kb, "6", max_error=between).choose(1e9) == 6  # ReDi's fixed rule is not capped


def test_default_cap_reaches_the_runtime_and_spares_prompt_mode(
    pipe: Pipeline, kb_folder: Path, tmp_path: Path
) -> None:
    """With recorded errors past 0.2 at the last step, the runner's default policy (what generate and
    the bench's kb rows use) stops a step earlier, per blend; prompt mode keeps every step."""
    folder = tmp_path / "kb"
    shutil.copytree(kb_folder, folder)
    manifest = json.loads((folder / KB_MANIFEST).read_text())
    manifest["adaptive"]["latent"]["value_rel_error"] = {
        "4": {"lstsq": 0.1, "nearest": 0.3},
        "6": {"lstsq": 0.5, "nearest": 0.6},
    }
    (folder / KB_MANIFEST).write_text(json.dumps(manifest))
    kb = KnowledgeBase.open(folder)
    unit = noise(pipe, [0])
    lstsq = RetrievalStart(pipe, kb)
    assert lstsq.policy.thresholds[1] == -1.0 and lstsq.policy.thresholds[0] > 0
    assert lstsq([PROMPTS[0]], latents=unit).jumps[0].start_step == 4
    nearest = RetrievalStart(pipe, kb, combine="nearest")  # 0.3 at the first step: no jump at all
    assert nearest([PROMPTS[0]], latents=unit).jumps[0].start_step is None
    assert all(t > 0 for t in kb.policy("prompt").thresholds)
    with pytest.raises(EffdiffError, match="must be > 0"):
        kb.policy(max_error=-1.0)


def test_quality_evaluation_reuses_the_full_run(pipe: Pipeline, kb: KnowledgeBase, tmp_path: Path) -> None:
    """eval_quality's rows on two scenes: the baseline, and a KB configuration whose images started
    from KB seeds (so they jump) and are scored by the reference judge, with PSNR against full."""
    from effdiff.kb.evaluate import KBConfig, default_seeds, eval_quality, full_runs, markdown_table
    from effdiff.reference.scenes import DEMO_SCENES

    scenes = list(DEMO_SCENES[:2])
    config = KBConfig("kb 6", jump="6", combine="nearest")
    rows = eval_quality(pipe, kb, scenes, "held-in", [config], log=lambda _m: None, cache=tmp_path)
    assert [r.name for r in rows] == ["full", "kb 6"]
    (cached,) = tmp_path.glob("full-*.npz")
    prompts, seeds = [s.prompt for s in scenes], default_seeds(kb.settings, 2)
    images, keys = full_runs(pipe, kb.settings, prompts, seeds, "none", cache=tmp_path)
    assert len(images) == 2 and keys[0].shape == (2, 4, 8, 8) and list(tmp_path.iterdir()) == [cached]
    full, jumped = rows
    assert full.saved == 0 and full.psnr_db is None and full.adherence.count == 2
    assert jumped.jumps == {6: 2} and jumped.saved == pytest.approx(4 / 8)
    assert jumped.psnr_db is not None and 0 < jumped.psnr_db < 99
    table = markdown_table(rows)
    assert "| kb 6 | held-in | 2 | 50.0 % | 4.0 |" in table  # without propagation every step is one


def test_encoder_evaluations_of_a_jump() -> None:
    from effdiff.kb.evaluate import encoder_evaluations

    assert encoder_evaluations("none", 50, 10, None, "latent") == 50
    assert encoder_evaluations("none", 50, 10, 30, "latent") == 30
    assert encoder_evaluations("fd-ddim50", 50, 10, None, "latent") == 9
    # keys 0,1,2,3,5 before the lookup; after a jump to 30: 30 itself and 35
    assert encoder_evaluations("fd-ddim50", 50, 10, 30, "latent") == 7
    assert encoder_evaluations("fd-ddim50", 50, 10, 40, "prompt") == 1
