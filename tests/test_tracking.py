"""Profiling (train.profile_steps) and the optional Weights & Biases writer (with a stand-in wandb module)."""

import os
import sys
import types

import fastgpu_jax as fg


def test_profile_steps_write_a_trace(tmp_path, quick_digits):
    fg.train(quick_digits("train.steps=30", "train.profile_steps=5-7"), str(tmp_path))
    traces = [f for root, _, files in os.walk(tmp_path / "profile") for f in files if f.endswith(".xplane.pb")]
    assert traces


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, values, step):
        self.calls.append(("log", step, dict(values)))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_writer_logs_every_row_and_resumes_the_same_run(tmp_path, quick_digits, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "run123")
    fake.init = lambda **kw: calls.append(("init", kw)) or _FakeRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    fg.train(quick_digits("log.wandb=True"), str(tmp_path))
    init = [c for c in calls if c[0] == "init"][0][1]
    assert init["id"] == "run123" and init["config"]["data.name"] == "digits" and init["resume"] == "allow"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "train/loss" in c[2]] == [20, 40, 60]
    assert any("val/accuracy" in c[2] for c in logged) and calls[-1] == ("finish",)
    calls.clear()
    fake.util.generate_id = lambda: "a-new-id"
    fg.train(quick_digits("log.wandb=True"), str(tmp_path))  # the same run again: it resumes
    assert [c[1]["id"] for c in calls if c[0] == "init"] == ["run123"]
