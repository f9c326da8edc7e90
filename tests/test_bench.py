"""The kernel benchmark runs (tiny, interpret mode) and covers the shapes it promises; the model benchmark
times a train step, on stand-in data when the config's data files are absent."""

import json

import pytest

import jax
import jax.numpy as jnp

from conftest import ROOT
from fastgpu_jax import bench, models


def _script(name):
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, f"{ROOT}/benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet50_conv_list_covers_every_conv_kernel_shape():
    convs = bench.resnet50_convs(batch=2, image=64)
    model = models.build("resnet50", num_classes=1000)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3))))["params"]
    kernels = {leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim == 4}
    assert {c["w"] for c in convs} == kernels
    keys = [(c["x"], c["w"], c["strides"]) for c in convs]
    assert len(keys) == len(set(keys))  # distinct
    assert any(c["w"][:2] == (7, 7) and c["strides"] == (2, 2) for c in convs)  # the stem


def test_tiny_matmul_sweep_prints_a_table_and_json(tmp_path, capsys):
    rows = bench.run_kernel_benchmarks(tiny=True, ops=("matmul",), json_path=str(tmp_path / "b.json"))["auto"]
    out = capsys.readouterr().out
    assert len(rows) == len(bench.MATMUL_SHAPES)
    assert "geometric mean" in out and "square 8192" in out
    assert "bench: matmul square 8192" in out  # says what it compiles before it does
    saved = json.loads((tmp_path / "b.json").read_text())
    assert len(saved["rows"]) == len(rows) and all(r["xla_s"] > 0 and r["pallas_s"] > 0 for r in saved["rows"])
    assert all(0 <= r["error"] < bench.WRONG for r in saved["rows"])  # the kernel's output checked against XLA's
    assert bench.geomean([2.0, 0.5]) == 1.0


def test_a_sweep_of_two_lowerings_times_xla_once_per_shape_and_writes_a_json_each(tmp_path, monkeypatch, capsys):
    """``--lowering triton,mosaic``: per shape XLA is compiled and timed once and each lowering's kernel once (on a
    GPU the sweep's time is compiling); each lowering gets its own JSON, rows and errors."""
    from fastgpu_jax.pallas_kernels import lowering

    timed = []

    def time_fn(fn, *args, **kw):
        timed.append(lowering.current())
        return 1e-3 * len(timed)

    monkeypatch.setattr(bench.tuning, "time_fn", time_fn)
    kernel, failed = bench.pallas_matmul, []

    def first_triton_call_fails(a, b):  # one lowering failing on one shape costs only that row
        if lowering.current() == "triton" and not failed:
            failed.append(a.shape)
            raise RuntimeError("no kernel")
        return kernel(a, b)

    monkeypatch.setattr(bench, "pallas_matmul", first_triton_call_fails)
    with pytest.raises(ValueError, match=r"put \{lowering\} in the name"):
        bench.run_kernel_benchmarks(tiny=True, ops=("matmul",), json_path=str(tmp_path / "s.json"),
                                    lowerings=("triton", "auto"))
    shapes = len(bench.MATMUL_SHAPES)
    out = bench.run_kernel_benchmarks(tiny=True, ops=("matmul",), json_path=str(tmp_path / "s_{lowering}.json"),
                                      lowerings=("triton", "auto"))
    assert timed == ["auto", "triton", "auto"] * shapes  # XLA (under the ambient lowering), then each lowering
    runs = {low: json.loads((tmp_path / f"s_{low}.json").read_text()) for low in ("triton", "auto")}
    assert runs["triton"]["lowering"].startswith("triton:") and runs["auto"]["lowering"].startswith("auto:")
    assert [e["error"] for e in runs["triton"]["errors"]] == ["RuntimeError: no kernel"] and not runs["auto"]["errors"]
    for i, (t, a) in enumerate(zip(runs["triton"]["rows"], runs["auto"]["rows"][1:]), start=1):
        assert t["xla_s"] == a["xla_s"] == pytest.approx(1e-3 * (3 * i + 1))  # the one XLA time
        assert (t["pallas_s"], a["pallas_s"]) == pytest.approx((1e-3 * (3 * i + 2), 1e-3 * (3 * i + 3)))
    assert [len(rows) for rows in out.values()] == [shapes - 1, shapes]
    assert capsys.readouterr().out.count("geometric mean") == 2


def test_output_error_is_relative_to_the_largest_reference_value():
    ref = (jnp.array([4.0, -8.0]), jnp.array([[1.0]], jnp.bfloat16))
    assert bench.output_error(ref, ref) == 0.0
    assert bench.output_error(ref, (jnp.array([4.0, -7.0]), jnp.array([[3.0]], jnp.bfloat16))) == 2.0 / 8.0
    assert bench.output_error(ref, (jnp.array([jnp.nan, -8.0]), ref[1])) == float("inf") > bench.WRONG


def test_model_benchmark_times_the_step_on_cpu_on_stand_in_data(tmp_path, capsys):
    """No CIFAR files in data.dir: the step is timed on synthetic data of CIFAR's shape, and one line says so
    (one line however many rows)."""
    import fastgpu_jax as fg
    from conftest import DIGITS

    cfg = fg.load_config(DIGITS, overrides=["data.name=cifar10", f"data.dir={tmp_path}", "data.batch_size=16",
                                            "model.num_classes=12"])
    rows = bench.run_model_benchmark(cfg, device_counts=(1,), steps=2)
    out = capsys.readouterr().out
    (row,) = rows
    assert row.devices == 1 and row.global_batch == 16 and row.step_s > 0 and row.efficiency == 1.0
    assert row.flops and row.flops > 0
    assert "examples/s" in out and "scaling" in out
    assert "bench: compiling the" in out and "s; timing" in out  # what it compiles, then how long it took
    notices = [line for line in out.splitlines() if "absent" in line]
    assert len(notices) == 1, out
    assert "cifar10 files are absent" in notices[0] and "32x32x3 images, 12 classes" in notices[0]


def test_bench_data_is_real_when_present_and_broken_files_are_an_error(tmp_path, capsys):
    import fastgpu_jax as fg
    from conftest import DIGITS

    assert bench.data_info(fg.load_config(DIGITS)).name == "digits"
    assert bench.data_info(fg.load_config(DIGITS, overrides=["data.name=mnist"])).image_shape == (28, 28, 1)
    assert "mnist files are absent (data.dir is not set)" in capsys.readouterr().out
    for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (tmp_path / f).write_bytes(b"not cifar")
    with pytest.raises(ValueError, match="data_batch_1.bin"):  # present but corrupt: not "absent"
        bench.data_info(fg.load_config(DIGITS, overrides=["data.name=cifar10", f"data.dir={tmp_path}"]))
    assert "absent" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["resnet50", "vit_b16"])
def test_xla_flop_count_matches_the_analytic_one(name):
    """The bench's FLOPs/step (XLA cost analysis) agree with 3x forward Dense/Conv/attention within 5%."""
    import fastgpu_jax as fg
    from conftest import DIGITS
    from fastgpu_jax.builders import build_model

    width = ["model.width=0"] if name.startswith("vit") else []  # a ViT's width is fixed by its variant
    cfg = fg.load_config(DIGITS, overrides=[f"model.name={name}", "model.num_classes=1000", "data.name=synthetic",
                                            "data.image_size=224", "data.batch_size=2", "data.num_examples=8",
                                            *width])
    shape = (2, 224, 224, 3)
    batch = {"image": jnp.zeros(shape), "label": jnp.zeros((2,), jnp.int32)}
    xla = bench.xla_step_flops(fg.build_state(cfg, abstract=True), batch)  # shapes suffice: nothing is compiled
    analytic = bench.analytic_step_flops(build_model(cfg), shape)
    assert abs(xla / analytic - 1) < 0.05, (xla, analytic)



def test_bench_data_times_the_configs_own_pipeline_per_worker_count(tmp_path, capsys):
    import fastgpu_jax as fg
    from conftest import DIGITS
    from fastgpu_jax import bench_data, cli
    from image_folders import write_image_folder

    root = write_image_folder(tmp_path, counts={"train": 4, "val": 1})
    cfg = fg.load_config(DIGITS, overrides=["data.name=folder", f"data.dir={root}", "data.image_size=16",
                                            "data.batch_size=4", "model.num_classes=3"])
    result = bench_data.run_data_benchmark(cfg, workers=(0, 2), batches=3, step=False)
    assert [(r["workers"], r["images"]) for r in result["rows"]] == [(0, 12), (2, 12)]
    assert all(r["images_per_s"] > 0 and r["per_core"] == r["images_per_s"] / max(r["workers"], 1)
               for r in result["rows"])
    table = capsys.readouterr().out
    assert "images/s" in table and "folder" in table
    with pytest.raises(ValueError, match="data.name must be one of folder, arrayrecord, tfds, got 'digits'"):
        bench_data.run_data_benchmark(fg.load_config(DIGITS), step=False)
    assert cli.main(["bench", "--kernels", "--data"]) == 2
    assert "give --config FILE" in capsys.readouterr().err


def test_roofline_counts_resnet50_as_torchvision_does():
    """The forward kernels of ResNet-50 at 224x224 are 4.09 GMACs per image: torchvision's published figure
    for resnet50 (ResNet50_Weights.IMAGENET1K_V1, "GFLOPS 4.09", counted as multiply-adds)."""
    from fastgpu_jax import roofline

    shapes = roofline.model_kernel_shapes("resnet50", batch=1)
    fwd_macs = sum(k.flops / 2 * k.count for k in shapes if k.kind == "fwd")
    assert abs(fwd_macs / 4.09e9 - 1) < 0.01
    assert {k.kind for k in shapes} == {"fwd", "dgrad", "wgrad"}
    assert sum(k.count for k in shapes if k.kind == "fwd") == 54  # 53 convs + the classifier
    assert sum(k.count for k in shapes if k.kind == "dgrad") == 53  # no input gradient for the image
    k = next(k for k in shapes if k.op == "matmul")
    assert k.roofline_s(jnp.bfloat16) == max(k.flops / 989e12, k.min_bytes(2) / 3.35e12)


def test_sm90_capture_records_every_tuning_entry_with_its_padding(tmp_path):
    """The offline Hopper check's first step (the second needs triton, not a dependency): every H100 tuning
    entry lowers for CUDA from this CPU machine, forward and backward, with the grid and MAC counts."""
    sm90 = _script("sm90_check")
    sm90.capture(str(tmp_path), ["table"], batch=256)
    index = json.loads((tmp_path / "table" / "index.json").read_text())
    kernels = {e["kernel"] for e in index}
    assert kernels == {"matmul_fwd", "matmul_grad_a", "matmul_grad_b", "conv2d_fwd", "conv2d_wgrad"}
    for e in index:
        assert (tmp_path / "table" / e["file"]).read_text().startswith("module")
        useful, executed = e["macs"]
        assert 0 < useful <= executed and 1 - useful / executed <= sm90.MAX_PADDING
        assert e["grid"][0] * e["grid"][1] * e["grid"][2] >= sm90.H100_SMS


def test_roofline_counts_the_bytes_the_fused_epilogue_saves():
    """ViT-B/16's fc1 (Dense with exact gelu) is the one fused layer: one output-sized pass saved in each of
    forward, input gradient and weight gradient, in each of the 12 blocks."""
    from fastgpu_jax import roofline

    shapes = roofline.model_kernel_shapes("vit_b16", batch=1)
    fused = [k for k in shapes if k.activation]
    assert {(k.activation, k.w_shape, k.count) for k in fused} == {("gelu_exact", (768, 3072), 12)}
    saved = sum(k.epilogue_bytes_saved(2) * k.count for k in shapes)
    assert saved == 3 * 12 * 197 * 3072 * 2


def _sweep(device, ratios, tiny=False):
    """A kernel-sweep JSON as ``bench --kernels --json`` writes it, with the given Pallas/XLA ratios per row."""
    rows = [bench.Row(name, op, 1e9, 1.0, 1.0 / ratio, kernel, shape_class).as_dict()
            for (name, op, kernel, shape_class), ratio in ratios.items()]
    return {"device": device, "jax": jax.__version__, "tiny": tiny, "rows": rows}


def test_lowering_verdicts_feed_auto_through_a_tuning_table(tmp_path, monkeypatch, capsys):
    from fastgpu_jax.pallas_kernels import lowering, tuning
    from fastgpu_jax.pallas_kernels.conv2d import chosen_lowering as conv_lowering
    from fastgpu_jax.pallas_kernels.matmul import chosen_lowering

    h100 = "NVIDIA H100 80GB HBM3"
    rows = {("a", "conv fwd", "conv2d", "large"): (1.2, 0.9), ("a", "conv wgrad", "conv2d", "large"): (1.1, 1.0),
            ("b", "matmul", "matmul", "large"): (0.8, 1.3), ("c", "matmul", "matmul", "small"): (0.5, 0.7),
            ("d", "conv fwd", "", ""): (9.0, 0.1)}  # a row without a kernel (an old sweep) counts for nothing
    triton = _sweep(h100, {k: v[0] for k, v in rows.items()})
    mosaic = _sweep(h100, {k: v[1] for k, v in rows.items() if k[0] != "c"} | {("e", "matmul", "matmul", "small"): 2})
    verdicts = {(v["op"], v["shape_class"]): v for v in bench.lowering_verdicts(triton, mosaic)}
    assert set(verdicts) == {("conv2d", "large"), ("matmul", "large")}  # "c"/"e" were timed by one sweep only
    conv = verdicts[("conv2d", "large")]
    assert conv["rows"] == 2 and conv["triton_faster"] and conv["faster_than_xla"] and conv["kind"] == "H100"
    assert abs(conv["triton_vs_xla"] - (1.2 * 1.1) ** 0.5) < 1e-9 and abs(conv["mosaic_vs_xla"] - 0.9 ** 0.5) < 1e-9
    assert not verdicts[("matmul", "large")]["triton_faster"]
    wrong = dict(mosaic, rows=[dict(r, error=0.5) if r["name"] == "b" else r for r in mosaic["rows"]])
    verdict = {(v["op"], v["shape_class"]): v for v in bench.lowering_verdicts(triton, wrong)}[("matmul", "large")]
    assert verdict["mosaic_wrong"] and verdict["triton_faster"] and not verdict["faster_than_xla"]  # Triton: 0.8

    script = _script("lowering_verdict")
    for name, sweep in (("t.json", triton), ("m.json", mosaic)):
        (tmp_path / name).write_text(json.dumps(sweep))
    script.main([str(tmp_path / "t.json"), str(tmp_path / "m.json"), "--write", str(tmp_path / "table.json")])
    assert "Triton Pallas" in capsys.readouterr().out
    monkeypatch.setattr(tuning, "TRITON_FASTER_THAN_MOSAIC", {})
    monkeypatch.setattr(tuning, "FASTER_THAN_XLA", {})
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"):
        assert conv_lowering(256, 256) == "mosaic"
        tuning.load_table(str(tmp_path / "table.json"))
        assert conv_lowering(256, 256) == "triton"  # measured: Triton faster for large convs
        assert chosen_lowering(4096, 4096, 4096) == "mosaic"
    assert tuning.FASTER_THAN_XLA[("H100", "conv2d", "large")] is True

    with pytest.raises(ValueError, match="two full-size sweeps on one GPU kind"):
        bench.lowering_verdicts(triton, _sweep("NVIDIA A100-SXM4-80GB", {}))
    with pytest.raises(ValueError, match="two full-size sweeps"):
        bench.lowering_verdicts(triton, dict(mosaic, tiny=True))


def test_conv_rows_name_the_kernel_that_runs_them():
    assert bench._conv_kernel((8, 14, 14, 256), (3, 3, 256, 256), (1, 1), "SAME", 8 * 14 * 14) == ("conv2d", "large")
    # a 1x1 conv is the matmul with M = 1568 pixels, K = 256, N = 64: the matmul's "small" class (N < 256)
    assert bench._conv_kernel((8, 14, 14, 256), (1, 1, 256, 64), (1, 1), "SAME", 8 * 14 * 14) == ("matmul", "small")
    assert bench._conv_kernel((8, 224, 224, 3), (7, 7, 3, 64), (2, 2), "SAME", 8 * 112 * 112)[0] == "matmul"


def test_mosaic_targets_read_a_suites_runs_by_their_recorded_lowering(tmp_path, monkeypatch, capsys):
    """benchmarks/mosaic_targets.py on kernel sweeps and ViT-B/16 rooflines as bench writes them (tiny sweeps,
    times faked): each target is the geometric mean over the passes of the kernel and lowering it names."""
    import numpy as np

    from fastgpu_jax.pallas_kernels import lowering

    script = _script("mosaic_targets")
    rng = np.random.default_rng(0)
    speeds: dict = {}  # (lowering, kernel) -> {pass: Pallas speed vs XLA}
    for low in ("mosaic", "triton"):
        with lowering.use_lowering(low):
            monkeypatch.setattr(bench, "_time_impls", lambda make, args, iters, label, lows: (
                3.0, {low: (3.0 / float(rng.uniform(0.5, 2.0)), 0.0) for low in lows}))
            bench.run_kernel_benchmarks(tiny=True, json_path=str(tmp_path / f"kernel_sweep_{low}.json"))
            path = tmp_path / f"roofline_vit_b16_{low}.json"
            bench.run_roofline("vit_b16", batch=1, measure=False, json_path=str(path))
        run = json.loads(path.read_text())
        for r in run["rows"]:
            speed = float(rng.uniform(0.5, 2.0))
            speeds.setdefault((low, r["kernel"]), {})[("vit", r["layer"], r["kind"])] = speed
            r.update(xla_us=3.0, pallas_us=3.0 / speed)
        path.write_text(json.dumps(run))
        for r in json.loads((tmp_path / f"kernel_sweep_{low}.json").read_text())["rows"]:
            if r["op"].startswith("conv") or r["name"].startswith("resnet50"):  # ResNet-50's passes
                speeds.setdefault((low, r["kernel"]), {})[("resnet", r["op"], r["name"])] = r["ratio"]
    capsys.readouterr()

    def geomean(values):
        return float(np.exp(np.mean(np.log(list(values)))))

    sweeps, rooflines, notes = script.load(str(tmp_path))
    targets = bench.mosaic_targets(sweeps, rooflines)
    assert notes == [f"kernel_sweep_{low}.json: tiny shapes (not speed figures)" for low in ("mosaic", "triton")]

    def target(start):
        (hit,) = [r for r in targets if r["what"].startswith(start)]
        return hit

    mm, conv_m, conv_t = speeds[("mosaic", "matmul")], speeds[("mosaic", "conv2d")], speeds[("triton", "conv2d")]
    assert {k[0] for k in mm} == {"resnet", "vit"} and {k[0] for k in conv_m} == {"resnet"}  # patchify: a matmul
    assert conv_m and len(conv_m) % 3 == 0 and all("k3x3" in name for _, _, name in conv_m)  # 3 passes each
    assert target("mosaic matmul vs XLA, ResNet")["shapes"] == len(mm)
    assert target("mosaic matmul vs XLA, ResNet")["measured"] == pytest.approx(geomean(mm.values()))
    assert target("triton matmul")["measured"] == pytest.approx(geomean(speeds[("triton", "matmul")].values()))
    assert target("mosaic conv vs Triton")["measured"] == pytest.approx(geomean(conv_m[k] / conv_t[k] for k in conv_m))
    assert target("mosaic conv vs XLA")["measured"] == pytest.approx(geomean(conv_m.values()))
    assert target("mosaic matmul vs XLA, ResNet")["goal"] == 1.05 and target("triton matmul")["goal"] is None
    squares = {r["name"].split()[1]: r["ratio"] for r in sweeps["mosaic"]["rows"] if r["name"].startswith("square")}
    for size in (4096, 8192):
        assert target(f"mosaic matmul vs XLA, {size}^3")["measured"] == pytest.approx(squares[str(size)])
    script.main([str(tmp_path)])
    table = capsys.readouterr().out
    assert "8192^3" in table and table.count("yes") + table.count("NO") == 4  # the targets with a goal

    run = json.loads((tmp_path / "roofline_vit_b16_mosaic.json").read_text())
    run["rows"][0]["error"] = 0.3
    (tmp_path / "roofline_vit_b16_mosaic.json").write_text(json.dumps(run))
    layer = run["rows"][0]["layer"]
    assert f"roofline_vit_b16_mosaic.json: WRONG output (error vs XLA > {bench.WRONG}) on ['{layer}']" in \
        script.load(str(tmp_path))[2]
    broken = json.loads((tmp_path / "kernel_sweep_triton.json").read_text())
    del broken["lowering"]  # as an older bench wrote it
    (tmp_path / "kernel_sweep_triton.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="kernel_sweep_triton.json: no 'lowering' field"):
        script.load(str(tmp_path))


def test_runs_save_each_row_as_timed_and_name_a_failing_shape_without_stopping(tmp_path, monkeypatch, capsys):
    """On a GPU a run may be stopped by a time limit or meet a kernel that fails on one shape: the JSON holds every
    row timed so far ("complete": false until the end) and names the failed shapes, and the run goes on."""
    from fastgpu_jax import roofline

    path, labels = tmp_path / "sweep.json", []

    def time_impls(make, args, iters, label, lowerings):
        if labels:
            saved = json.loads(path.read_text())
            assert not saved["complete"] and len(saved["rows"]) + len(saved["errors"]) == len(labels)
        labels.append(label)
        if "qkv" in label:  # this lowering's kernel failed (XLA's failing too would fail every lowering)
            return 2.0, {low: RuntimeError("a kernel that failed\nits long traceback") for low in lowerings}
        return 2.0, {low: (1.0, 0.0) for low in lowerings}

    monkeypatch.setattr(bench, "_time_impls", time_impls)
    rows = bench.run_kernel_benchmarks(tiny=True, ops=("matmul",), json_path=str(path))["auto"]
    saved = json.loads(path.read_text())
    assert saved["complete"] and len(rows) == len(saved["rows"]) == len(bench.MATMUL_SHAPES) - 1
    (failed,) = [label for label in labels if "qkv" in label]
    assert saved["errors"] == [{"what": failed, "error": "RuntimeError: a kernel that failed"}]
    assert f"FAILED: {failed}" in capsys.readouterr().out

    calls = []

    def time_fn(fn, *args, **kw):
        calls.append(fn)
        if len(calls) == 3:  # the second pass's XLA call
            raise ValueError("out of memory")
        return 1e-3

    monkeypatch.setattr(bench.tuning, "time_fn", time_fn)
    one = (jnp.ones(2),)  # each pass's XLA and "Pallas" functions: the latter 1.5x off, an output error of 0.5
    monkeypatch.setattr(bench, "_pass_fns",
                        lambda k, dtype: {"xla": (lambda x: x, one), "pallas": (lambda x: 1.5 * x, one)})
    path = tmp_path / "roofline.json"
    rows = bench.run_roofline("vit_b16", batch=1, measure=True, json_path=str(path))
    saved = json.loads(path.read_text())
    passes = roofline.model_kernel_shapes("vit_b16", 1)
    assert saved["complete"] and len(rows) == len(saved["rows"]) == len(passes) - 1
    assert [e["error"] for e in saved["errors"]] == ["ValueError: out of memory"]
    assert all(r["xla_us"] == r["pallas_us"] == 1e3 and r["error"] == 0.5 for r in saved["rows"])
    assert capsys.readouterr().out.count("WRONG") == len(rows)


def test_autotune_candidates_fit_shared_memory_as_mosaic_gpu_lowering_counts_it():
    """The candidates' shared-memory formula against Mosaic GPU's own check when lowering for an H100: every
    candidate lowers (the largest included), one more pipeline stage of the largest does not ("exceeds available
    shared memory")."""
    import dataclasses

    from fastgpu_jax.pallas_kernels import lowering, tuning
    from fastgpu_jax.pallas_kernels.matmul import matmul

    script = _script("autotune_mosaic")
    cands = script.candidates()
    assert cands and all(script.smem_bytes(b) <= script.SMEM_LIMIT for b in cands)
    assert tuning.TABLE[("H100", "matmul_mgpu", "large", "bfloat16")] in cands  # the table's row is among them
    largest = cands[-1]
    over = dataclasses.replace(largest, stages=largest.stages + 1)
    assert script.smem_bytes(over) > script.SMEM_LIMIT
    args = (jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16),) * 2  # enough K steps for every stage, no split-K
    for blocks, fits in [(b, True) for b in cands] + [(over, False)]:  # every candidate lowers: none is wasted
        with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.use_lowering("mosaic"), \
                tuning.use_blocks(matmul_mgpu=blocks):
            # a new function each time: jit's cache does not see the blocks in force
            lowered = lambda: jax.jit(lambda a, b: matmul(a, b)).trace(*args).lower(  # noqa: E731
                lowering_platforms=("cuda",))
            if fits:
                lowered()
            else:
                with pytest.raises(Exception, match="exceeds available shared memory"):
                    lowered()


def test_autotune_merges_the_winners_into_the_table(tmp_path, monkeypatch, capsys):
    """On a GPU (faked: times come from a counter, so the last candidate tried wins) the winners are written over
    what the table held: its flags stay, each (op, shape class) gets its fastest blocks. On CPU it refuses."""
    import dataclasses

    from fastgpu_jax.pallas_kernels import tuning

    script = _script("autotune_mosaic")
    with pytest.raises(SystemExit, match="times kernels on a GPU"):
        script.main(["--table", str(tmp_path / "t.json")])
    for name in ("_LOADED", "FASTER_THAN_XLA", "TRITON_FASTER_THAN_MOSAIC"):
        monkeypatch.setattr(tuning, name, {})
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"faster_than_xla": [dict(kind="H100", op="conv2d", shape_class="large",
                                                          faster=True)]}))
    monkeypatch.setattr(script, "MATMUL_SHAPES", {"large": (64, 64, 64), "small": (64, 64, 32)})
    monkeypatch.setattr(script, "CONV_SHAPES", {"medium": ((2, 8, 8, 32), (3, 3, 32, 32), 1)})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    clock = iter(range(1000, 0, -1))
    monkeypatch.setattr(tuning, "time_fn", lambda fn, *a, **k: next(clock) * 1e-6)
    with tuning.use_device_kind("H100"):
        script.main(["--table", str(table)])
    saved = json.loads(table.read_text())
    assert saved["faster_than_xla"] == [dict(kind="H100", op="conv2d", shape_class="large", faster=True)]
    rows = {(r["op"], r["shape_class"]): r for r in saved["blocks"]}
    assert set(rows) == {("matmul_mgpu", "large"), ("matmul_mgpu", "small"), ("conv2d_mgpu", "medium")}
    for (op, shape_class), row in rows.items():  # the table's row is tried first, so the last other one wins
        table_row = tuning.TABLE[("H100", op, shape_class, "bfloat16")]
        last = [b for b in script.candidates() if b != table_row][-1]
        assert row["blocks"] == dataclasses.asdict(last) and (row["kind"], row["dtype"]) == ("H100", "bfloat16")
    assert capsys.readouterr().out.count("best") == 3


def test_bench_names_a_bad_lowering_list_in_one_line(capsys):
    from fastgpu_jax import cli

    assert cli.main(["bench", "--kernels", "--lowering", "triton,mosiac"]) != 0
    assert "'mosiac' is not one of" in capsys.readouterr().err
    assert cli.main(["bench", "--kernels", "--model", "vit_b16", "--lowering", "triton,mosaic"]) != 0
    assert "--kernels --model times one lowering" in capsys.readouterr().err
