"""The one-command pipeline (`analysis_jobs.pipeline`): every step's flags parse with `varmoe`'s own
parser, finished steps are skipped, new weights or settings rerun every step after deleting its old
outputs, and a step that writes nothing is an error. The steps themselves are the `varmoe` commands
tested elsewhere; here a stand-in runner writes the outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from analysis_jobs.pipeline import PipelineConfig, main, run_pipeline, steps


@pytest.fixture()
def cfg(tmp_path: Path) -> PipelineConfig:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2_moe"}')
    (model / "model.safetensors").write_bytes(b"weights-1")
    return PipelineConfig(str(model), str(tmp_path / "out"), str(tmp_path / "work"))


class FakeRunner:
    def __init__(self, write: bool = True):
        self.ran: list[str] = []
        self.write = write
        self.seen_stale: list[str] = []

    def __call__(self, step) -> None:
        self.ran.append(step.name)
        for p in step.outputs:
            if p.exists():
                self.seen_stale.append(str(p))
            if not self.write:
                continue
            if p.suffix == "":
                p.mkdir(parents=True, exist_ok=True)
                (p / "fig.png").write_bytes(b"x")
            else:
                p.write_text("new")


def test_every_step_parses_with_the_cli_parser(cfg):
    from var_moe.cli import build_parser

    parser = build_parser()
    names = [s.name for s in steps(cfg)]
    assert len(names) == len(set(names))
    for s in steps(cfg):
        if s.run is None:
            parser.parse_args(s.argv)  # a misspelt flag exits here
    sims = [s for s in steps(cfg) if s.name.startswith("sim_")]
    assert len(sims) == 2 * len(cfg.shapes) * len(cfg.cache_sizes)
    assert all("--sizes-only" in s.argv for s in sims)  # the trace's own depth, never a layer map


def test_resume_skips_and_new_weights_rerun(cfg):
    first = FakeRunner()
    manifest = run_pipeline(cfg, runner=first)
    all_steps = [s.name for s in steps(cfg)]
    assert first.ran == all_steps and set(manifest["steps"]) == set(all_steps)

    again = FakeRunner()
    run_pipeline(cfg, runner=again)
    assert again.ran == []

    # a missing output reruns only its step
    Path(cfg.output_dir, "phase1", "heldout.json").unlink()
    one = FakeRunner()
    run_pipeline(cfg, runner=one)
    assert one.ran == ["predictability"]

    # new weights: every step again, each with its old outputs deleted first
    Path(cfg.model, "model.safetensors").write_bytes(b"weights-2")
    rerun = FakeRunner()
    run_pipeline(cfg, runner=rerun)
    assert rerun.ran == all_steps and rerun.seen_stale == []
    doc = json.loads(Path(cfg.output_dir, "pipeline.json").read_text())
    assert set(doc["steps"]) == set(all_steps)
    assert doc["model_fingerprint"] != manifest["model_fingerprint"]


def test_new_settings_rerun_the_steps_they_change(cfg):
    run_pipeline(cfg, runner=FakeRunner())
    r = FakeRunner()
    run_pipeline(replace(cfg, eval_samples=cfg.eval_samples + 1), runner=r)
    assert sorted(r.ran) == sorted(["evaluate_baseline", "evaluate_var", "evaluate_var_t0.5", "compare"])  # compare reads them
    r = FakeRunner()
    run_pipeline(replace(cfg, choose_docs=cfg.choose_docs + 1), runner=r)  # new tables: all that reads them
    assert set(r.ran) >= {"build_tables", "evaluate_var", "compare", "ab_test", "ab_test_vllm"} and "predictability" not in r.ran
    assert any(n.startswith("sim_") for n in r.ran) and "trace_test" not in r.ran
    r = FakeRunner()
    run_pipeline(replace(cfg, samples=cfg.samples + 1), only={"capture_test"}, runner=r)
    assert r.ran == ["capture_test"]


def test_a_step_that_writes_nothing_fails(cfg):
    with pytest.raises(RuntimeError, match="capture_calibration"):
        run_pipeline(cfg, runner=FakeRunner(write=False))


def test_cli_flags(cfg, capsys):
    assert main(["--model", cfg.model, "--output-dir", cfg.output_dir, "--list"]) == 0
    assert "ab_test_vllm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--model", cfg.model, "--output-dir", cfg.output_dir, "--only", "capture"])
    assert e.value.code == 2 and "unknown steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", cfg.model, "--output-dir", cfg.output_dir, "--samples", "0"])
    assert "--samples" in capsys.readouterr().err
