"""The kernel benchmark runs (tiny, interpret mode) and covers the shapes it promises; the model benchmark
times a train step, on stand-in data when the config's data files are absent."""

import json

import pytest

import jax
import jax.numpy as jnp

from fastgpu_jax import bench, models


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
    rows = bench.run_kernel_benchmarks(tiny=True, ops=("matmul",), json_path=str(tmp_path / "b.json"))
    out = capsys.readouterr().out
    assert len(rows) == len(bench.MATMUL_SHAPES)
    assert "geometric mean" in out and "square 8192" in out
    assert "bench: matmul square 8192" in out  # says what it compiles before it does
    saved = json.loads((tmp_path / "b.json").read_text())
    assert len(saved["rows"]) == len(rows) and all(r["xla_s"] > 0 and r["pallas_s"] > 0 for r in saved["rows"])
    assert bench.geomean([2.0, 0.5]) == 1.0


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
