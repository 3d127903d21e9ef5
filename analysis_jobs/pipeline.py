"""The whole var-moe pipeline for one model into one results folder, resumable, one command.

    python -m analysis_jobs.pipeline --model models/reference-moe-2 --dataset prose-code \
        --output-dir results/reference-moe-2          # or: make pipeline MODEL=... DATASET=... OUT=...

Steps, in order (each one `varmoe` command run as a subprocess; this file only wires them):
Phase 1 capture of the calibration and test splits and of the random-init control, held-out
predictability against the control, the hypothesis reports and figures; Phase 2 tables chosen on
training documents and certified on calibration, evaluated on test (baseline, VAR, comparison);
offload traces at the model's own depth priced by the simulator at published shapes' expert sizes
(`--sizes-only`: no layer mapping); the A/B load test through the builtin engine and through the
vLLM engine (its own environment). Outputs that are committed go under --output-dir; large
intermediates (statistics, evidence, traces) under --work-dir.

Resuming: `pipeline.json` in --output-dir records the model's fingerprint (SHA-256 of its weights
and config) and each finished step with its wall time and a key of its exact command. A rerun skips
a step whose outputs exist and whose key matches; when the weights change every step runs again,
when a setting changes the steps whose command it changes do; a step's old outputs are deleted
before it runs, so rerunning after new weights is the same one command. `--only STEP` / `--skip STEP` pick steps (`--list` names them).
Test: `pytest tests/test_pipeline.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PipelineConfig:
    model: str  # model folder
    output_dir: str  # committed results
    work_dir: str  # statistics, evidence, traces (not committed)
    dataset: str = "prose-code"  # the model's own corpus; its calibration / test splits are used
    samples: int = 600  # Phase 1 sequences per split and pass (capture, predictability)
    max_length: int = 256  # tokens per sequence everywhere
    choose_docs: int = 150  # training documents the tables' sets are chosen on
    loose_target: float = 0.5  # a second, deliberately loose table build: what a lower bar would serve
    eval_samples: int = 128  # `varmoe evaluate`: first window of this many test documents
    ab_duration: int = 60  # seconds of A/B load per engine
    ab_users: int = 8
    trace_test: int = 256  # sequences in the test / calibration offload traces
    trace_calibration: int = 512
    cache_sizes: tuple[int, ...] = (16, 32)  # experts per layer held on the simulated GPU
    shapes: tuple[str, ...] = ("olmoe-1b-7b", "qwen3-30b-a3b")  # priced with --sizes-only
    hardware: str = "rtx3060"
    bits: float = 4.0  # bits per expert weight in the simulator
    seed: int = 0  # random-init control
    dtype: str = "float32"  # router math and tables in float32, served in float32 by both engines
    vllm_python: str = ".venv-vllm/bin/python"

    def __post_init__(self) -> None:
        for name in ("samples", "max_length", "choose_docs", "eval_samples", "ab_duration", "ab_users",
                     "trace_test", "trace_calibration"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 < self.loose_target <= 1:
            raise ValueError("--loose-target must lie in (0, 1]")


@dataclass
class Step:
    name: str
    outputs: list[Path]  # all must exist for the step to count as done; deleted before a rerun
    argv: list[str] = field(default_factory=list)  # `varmoe` arguments
    run: Callable[[], None] | None = None  # instead of argv: a step that is more than one command
    stdout: Path | None = None  # the command's printed output is kept here
    settings: dict | None = None  # what a `run` step depends on (an argv step: its argv)
    key: str = ""  # its command and the keys of the steps whose outputs it reads (set by `steps`)

    def command_text(self) -> str:
        return json.dumps(self.argv if self.run is None else self.settings, sort_keys=True)


def _assign_keys(chain: list[Step]) -> list[Step]:
    """Key every step by its command and its inputs' keys: an input is an earlier step's output named in
    its command, so a changed upstream command reruns everything downstream of it."""
    keys: dict[str, str] = {}
    for i, step in enumerate(chain):
        text = step.command_text()
        upstream = sorted(keys[e.name] for e in chain[:i] if any(str(p) in text for p in e.outputs))
        step.key = hashlib.sha256(json.dumps([step.name, text, upstream]).encode()).hexdigest()[:16]
        keys[step.name] = step.key
    return chain


def model_fingerprint(model: str | Path) -> str:
    h = hashlib.sha256()
    for name in sorted(p.name for p in Path(model).iterdir() if p.suffix in (".safetensors", ".json")):
        if name.startswith(("card", "recipe")):
            continue  # the card describes the weights; it does not change the routing
        h.update(name.encode())
        h.update((Path(model) / name).read_bytes())
    return h.hexdigest()[:16]


def steps(cfg: PipelineConfig, py: str = sys.executable) -> list[Step]:
    out, work = Path(cfg.output_dir), Path(cfg.work_dir)
    p1, p2, off = out / "phase1", out / "phase2", out / "offload"
    m = ["--model", cfg.model, "--dtype", cfg.dtype, "--threads", "1"]
    data = ["--dataset", cfg.dataset, "--max-length", str(cfg.max_length)]
    n = ["--num-samples", str(cfg.samples)]
    stats = {s: work / f"stats_{s}.parquet" for s in ("calibration", "test", "test_control")}
    tables = p2 / "tables_balanced.safetensors"
    loose = p2 / f"tables_t{cfg.loose_target:g}.safetensors"  # reads the evidence build_tables saved
    out_steps = [
        Step("capture_calibration", [stats["calibration"]],
             ["capture", *m, *data, *n, "--split", "calibration", "--output", str(stats["calibration"]), "--no-progress"]),
        Step("capture_test", [stats["test"]],
             ["capture", *m, *data, *n, "--split", "test", "--output", str(stats["test"]), "--no-progress"]),
        Step("capture_test_control", [stats["test_control"]],
             ["capture", *m, *data, *n, "--split", "test", "--control", "random-init", "--seed", str(cfg.seed),
              "--output", str(stats["test_control"]), "--no-progress"]),
        Step("predictability", [p1 / "heldout.json"],
             ["predictability", *m, *data, *n, "--output", str(p1 / "heldout.json"), "--control", "random-init",
              "--control-seed", str(cfg.seed)]),
        Step("validate", [p1 / "report.txt", p1 / "report.json"],
             ["validate", "--input", str(stats["test"]), "--output", str(p1 / "report.txt"), "--json", str(p1 / "report.json"),
              "--heldout", str(p1 / "heldout.json")]),
        Step("validate_control", [p1 / "report_control.txt", p1 / "report_control.json"],
             ["validate", "--input", str(stats["test_control"]), "--output", str(p1 / "report_control.txt"),
              "--json", str(p1 / "report_control.json")]),
        Step("plot", [p1 / "figures"],
             ["plot", "--input", str(stats["test"]), "--output-dir", str(p1 / "figures"), "--heldout", str(p1 / "heldout.json")]),
        Step("plot_control", [p1 / "figures_control"],
             ["plot", "--input", str(stats["test_control"]), "--output-dir", str(p1 / "figures_control")]),
        Step("build_tables", [tables, tables.with_suffix(".json"), work / "evidence_train.safetensors",
                              work / "evidence_calibration.safetensors"],
             ["build-tables", *m, "--routing-stats", str(stats["calibration"]), "--preset", "balanced",
              "--choose-evidence", str(work / "evidence_train.safetensors"), "--choose-max-docs", str(cfg.choose_docs),
              "--evidence", str(work / "evidence_calibration.safetensors"), "--output", str(tables)],
             stdout=p2 / "build_tables.txt"),
        Step("evaluate_baseline", [p2 / "baseline.json"],
             ["evaluate", "--mode", "baseline", *m, *data, "--split", "test", "--num-samples", str(cfg.eval_samples),
              "--max-per-doc", "1", "--output", str(p2 / "baseline.json")]),
        Step("evaluate_var", [p2 / "var_balanced.json"],
             ["evaluate", "--mode", "var", *m, *data, "--split", "test", "--num-samples", str(cfg.eval_samples),
              "--max-per-doc", "1", "--tables", str(tables), "--preset", "balanced", "--output", str(p2 / "var_balanced.json")]),
        Step("compare", [p2 / "compare_balanced.txt", p2 / "compare_balanced.json"],
             ["compare", str(p2 / "baseline.json"), str(p2 / "var_balanced.json"), "--json", str(p2 / "compare_balanced.json")],
             stdout=p2 / "compare_balanced.txt"),
        Step(f"build_tables_t{cfg.loose_target:g}", [loose, loose.with_suffix(".json")],
             ["build-tables", *m, "--routing-stats", str(stats["calibration"]), "--preset", "balanced",
              "--target-agreement", f"{cfg.loose_target:g}", "--choose-evidence", str(work / "evidence_train.safetensors"),
              "--choose-max-docs", str(cfg.choose_docs), "--evidence", str(work / "evidence_calibration.safetensors"),
              "--output", str(loose)], stdout=p2 / f"build_tables_t{cfg.loose_target:g}.txt"),
        Step(f"evaluate_var_t{cfg.loose_target:g}", [p2 / f"var_t{cfg.loose_target:g}.json"],
             ["evaluate", "--mode", "var", *m, *data, "--split", "test", "--num-samples", str(cfg.eval_samples),
              "--max-per-doc", "1", "--tables", str(loose), "--preset", "balanced",
              "--target-agreement", f"{cfg.loose_target:g}", "--output", str(p2 / f"var_t{cfg.loose_target:g}.json")]),
    ]
    for split, count in (("test", cfg.trace_test), ("calibration", cfg.trace_calibration)):
        path = work / f"trace_{split}.parquet"
        out_steps.append(Step(f"trace_{split}", [path],
                              ["trace", *m, *data, "--split", split, "--num-samples", str(count), "--output", str(path),
                               "--no-progress"]))
    for shape in cfg.shapes:
        for cache in cfg.cache_sizes:
            for queue in ("", "_demand_first"):  # one first-in first-out copy queue; demand fetches first
                name = f"sim_{shape}_{cfg.hardware}_c{cache}_{cfg.bits:g}bit{queue}"
                out_steps.append(Step(name, [off / f"{name}.json"],
                                      ["simulate", "--trace", str(work / "trace_test.parquet"),
                                       "--calibration-trace", str(work / "trace_calibration.parquet"), "--tables", str(tables),
                                       "--hardware", cfg.hardware, "--cache-size", str(cache), "--bits", f"{cfg.bits:g}",
                                       "--shape", shape, "--sizes-only", "--policy", "all,var_pair,token_modal,belady,nocache",
                                       *(["--demand-first"] if queue else []), "--output", str(off / f"{name}.json")],
                                      stdout=off / f"{name}.txt"))
    out_steps += [  # last: the longest, and the vLLM one needs a second environment
        Step("ab_test", [out / "ab_test" / "ab_test.json"],
             ["ab-test", "--model", cfg.model, "--dataset", cfg.dataset, "--duration", str(cfg.ab_duration),
              "--users", str(cfg.ab_users), "--threads", "1", "--output-dir", str(out / "ab_test"),
              "--server-args", f"--dtype {cfg.dtype} --var-tables {tables} --shadow-rate 0.05"]),
        Step("ab_test_vllm", [out / "ab_test_vllm" / "ab_test.json"], run=lambda: _ab_test_vllm(cfg, tables, py),
             settings={k: getattr(cfg, k) for k in ("model", "dataset", "ab_duration", "ab_users", "dtype")}
             | {"tables": str(tables)}),
    ]
    return _assign_keys(out_steps)


def _ab_test_vllm(cfg: PipelineConfig, tables: Path, py: str) -> None:
    """The A/B job against `varmoe serve --engine vllm` started in the vLLM environment; the server is
    started here rather than by the job because vLLM's start-up compile outlasts the job's ready wait."""
    from analysis_jobs.server_process import ManagedServer

    vpy = Path(cfg.vllm_python)
    vpy = vpy if vpy.is_absolute() else REPO_ROOT / vpy
    if not vpy.exists():
        raise FileNotFoundError(f"--vllm-python {cfg.vllm_python}: not found (make setup-vllm builds it)")
    out = Path(cfg.output_dir) / "ab_test_vllm"
    server = ManagedServer(cfg.model, python=str(vpy), log_path=Path(cfg.work_dir) / "vllm_server.log",
                           args=["--engine", "vllm", "--dtype", cfg.dtype, "--max-model-len", "512", "--max-batch-size", "16",
                                 "--max-queue", "256", "--var-tables", str(tables)],
                           env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0", "PYTHONPATH": str(REPO_ROOT)})
    try:
        server.wait_ready(timeout_s=1200)
        _run_cli(py, ["ab-test", "--url", server.url, "--model", cfg.model, "--dataset", cfg.dataset,
                      "--duration", str(cfg.ab_duration), "--users", str(cfg.ab_users), "--output-dir", str(out)],
                 env={"VARMOE_ADMIN_TOKEN": server.admin_token})
    finally:
        server.stop()


def _run_cli(py: str, argv: list[str], stdout: Path | None = None, env: dict[str, str] | None = None) -> None:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    cmd = [py, "-m", "var_moe.cli", *argv]
    print("$ varmoe " + shlex.join(argv), flush=True)
    if stdout is None:
        subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, check=True)
        return
    stdout.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, check=True, stdout=subprocess.PIPE, text=True)
    stdout.write_text(res.stdout, encoding="utf-8")
    print(res.stdout, end="", flush=True)


def _exists(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir()) if path.suffix == "" else path.exists()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_pipeline(cfg: PipelineConfig, only: set[str] | None = None, skip: set[str] | None = None,
                 runner: Callable[[Step], None] | None = None) -> dict:
    """Run the steps not yet done for this model and settings; returns the manifest (also written)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    manifest_path = out / "pipeline.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    fingerprint = model_fingerprint(cfg.model)
    done = manifest.get("steps", {}) if manifest.get("model_fingerprint") == fingerprint else {}
    manifest = {"model": cfg.model, "model_fingerprint": fingerprint, "config": asdict(cfg),
                "command": "python -m analysis_jobs.pipeline " + " ".join(sys.argv[1:]), "steps": done}
    run_step = runner or (lambda s: s.run() if s.run else _run_cli(sys.executable, s.argv, s.stdout))
    for step in steps(cfg):
        if (only and step.name not in only) or (skip and step.name in skip):
            continue
        if step.name in done and done[step.name].get("key") == step.key and all(_exists(p) for p in step.outputs):
            print(f"[pipeline] {step.name}: done ({done[step.name]['seconds']:.0f} s), skipped", flush=True)
            continue
        for p in step.outputs:
            _remove(p)  # outputs of other weights or settings, or a step cut short
        for p in step.outputs:
            p.parent.mkdir(parents=True, exist_ok=True)
        print(f"[pipeline] {step.name}: running", flush=True)
        t0 = time.monotonic()
        run_step(step)
        missing = [str(p) for p in step.outputs if not _exists(p)]
        if missing:
            raise RuntimeError(f"step {step.name} finished without writing {missing}")
        done[step.name] = {"key": step.key, "seconds": round(time.monotonic() - t0, 1), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--output-dir", required=True, help="results folder (committed outputs)")
    ap.add_argument("--work-dir", default=None, help="large intermediates (default runs/pipeline/<output-dir name>)")
    defaults = PipelineConfig("", "", "")
    for name in ("dataset", "samples", "max_length", "choose_docs", "loose_target", "eval_samples", "ab_duration", "ab_users",
                 "trace_test", "trace_calibration", "hardware", "bits", "seed", "dtype", "vllm_python"):
        val = getattr(defaults, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(val), default=val, help=f"default {val}")
    ap.add_argument("--cache-sizes", default=",".join(map(str, defaults.cache_sizes)), help="comma list")
    ap.add_argument("--shapes", default=",".join(defaults.shapes), help="comma list of simulator shapes")
    ap.add_argument("--only", default="", help="comma list of steps to run (default all)")
    ap.add_argument("--skip", default="", help="comma list of steps to leave out")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    a = ap.parse_args(argv)
    work = a.work_dir or str(Path("runs/pipeline") / Path(a.output_dir).name)
    try:
        cfg = PipelineConfig(a.model, a.output_dir, work, a.dataset, a.samples, a.max_length, a.choose_docs,
                             a.loose_target, a.eval_samples, a.ab_duration, a.ab_users, a.trace_test, a.trace_calibration,
                             tuple(int(c) for c in a.cache_sizes.split(",") if c),
                             tuple(s for s in a.shapes.split(",") if s), a.hardware, a.bits, a.seed, a.dtype, a.vllm_python)
    except ValueError as e:
        ap.error(str(e))
    names = [s.name for s in steps(cfg)]
    if a.list:
        print("\n".join(names))
        return 0
    picked = {s for s in a.only.split(",") if s} | {s for s in a.skip.split(",") if s}
    if picked - set(names):
        ap.error(f"--only/--skip: unknown steps {sorted(picked - set(names))}; steps: {', '.join(names)}")
    if not Path(a.model, "config.json").exists():
        ap.error(f"--model {a.model}: no config.json there")
    manifest = run_pipeline(cfg, {s for s in a.only.split(",") if s} or None, {s for s in a.skip.split(",") if s})
    total = sum(s["seconds"] for s in manifest["steps"].values())
    print(f"[pipeline] {len(manifest['steps'])} steps recorded, {total / 60:.1f} min of wall time in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
