"""The lowering seam: which Pallas lowering each kernel gets, how a run chooses it, and the deprecation filter."""

import json
import warnings

import jax
import jax.numpy as jnp
import pytest

from fastgpu_jax import config as config_lib, nn
from fastgpu_jax.pallas_kernels import lowering, tuning
from fastgpu_jax.pallas_kernels.matmul import chosen_lowering, matmul


def test_auto_picks_mosaic_on_hopper_only_where_a_kernel_has_a_body():
    assert lowering.chosen("matmul", "cpu") == "triton"  # CPU: the Triton interpreter (the fast one)
    with lowering.lower_for_gpu():
        assert lowering.chosen("matmul", "H100") == "mosaic"
        assert lowering.chosen("matmul", "H200") == "mosaic"
        assert lowering.chosen("conv2d", "H100") == "mosaic"
        assert lowering.chosen("pool", "H100") == "triton"  # a kernel without a Mosaic body
        assert lowering.chosen("matmul", "A100") == "triton"  # pre-Hopper: Triton
        assert lowering.chosen("matmul", "H100", measured_triton_faster=True) == "triton"


def test_forcing_a_lowering():
    with lowering.use_lowering("triton"), lowering.lower_for_gpu():
        assert lowering.chosen("matmul", "H100") == "triton"
    with lowering.use_lowering("mosaic"):
        assert lowering.chosen("matmul", "cpu") == "mosaic"  # the Mosaic GPU interpreter
        assert lowering.chosen("conv2d", "cpu") == "mosaic"
        assert lowering.chosen("pool", "cpu") == "triton"
        with pytest.raises(ValueError, match="needs an sm_90 GPU.*'A100'"):
            lowering.chosen("matmul", "A100")
    with pytest.raises(ValueError, match="model.pallas_lowering='mosaics' is not one of"):
        with lowering.use_lowering("mosaics"):
            pass


def test_measured_triton_wins_keep_auto_on_triton(monkeypatch):
    monkeypatch.setitem(tuning.TRITON_FASTER_THAN_MOSAIC, ("H100", "matmul", "large"), True)
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"):
        assert chosen_lowering(4096, 4096, 4096) == "triton"
        assert chosen_lowering(512, 512, 512) == "mosaic"  # a medium shape has no such measurement


def test_launch_records_name_the_lowering():
    a = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
        jax.jit(lambda a, b: matmul(a, b)).trace(a, a)
        with lowering.use_lowering("triton"):
            jax.jit(lambda a, b: matmul(a, b)).trace(a, a)
    assert [(r["name"], r["lowering"]) for r in rows] == [("matmul_mgpu", "mosaic"), ("matmul_fwd", "triton")]
    assert rows[0]["grid"] == [132]  # persistent: one CTA per H100 SM


def test_the_run_config_sets_the_lowering_of_its_kernels():
    a = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)
    layer = nn.Dense(256, backend="pallas")
    params = layer.init(jax.random.key(0), jnp.zeros((1, 256), jnp.bfloat16))
    for run_lowering, want in (("auto", "mosaic"), ("triton", "matmul_fwd"), ("mosaic", "mosaic")):
        with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
            with nn.default_backend("pallas", pallas_lowering=run_lowering):
                jax.jit(layer.apply).trace(params, a)
        assert rows[0]["lowering" if want == "mosaic" else "name"] == want, run_lowering


def test_config_key_is_validated_and_recorded():
    assert config_lib.build_config().model.pallas_lowering == "auto"
    with pytest.raises(config_lib.ConfigError, match="model.pallas_lowering"):
        config_lib.build_config(overrides=["model.pallas_lowering=cuda"])
    cfg = config_lib.build_config(overrides=["model.pallas_lowering=mosaic"])
    flat = json.loads(json.dumps(config_lib.to_flat_dict(cfg)))  # what config.json holds
    assert flat["model.pallas_lowering"] == "mosaic"
    assert config_lib.from_flat_dict(flat).model.pallas_lowering == "mosaic"


def test_describe_says_what_each_kernel_gets():
    with lowering.lower_for_gpu():
        assert lowering.describe("H100") == "auto: matmul=mosaic conv2d=mosaic"
        assert lowering.describe("A100", "triton") == "triton: matmul=triton conv2d=triton"
        assert "needs an sm_90 GPU" in lowering.describe("A100", "mosaic")


def test_only_the_exact_triton_deprecation_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        lowering._install_warning_filter()
        warnings.warn(lowering.TRITON_DEPRECATION + " To keep using Triton, switch to the official Triton "
                      "bindings and jax_triton.", DeprecationWarning)
        warnings.warn("The Pallas Triton backend will change.", DeprecationWarning)
        warnings.warn(lowering.TRITON_DEPRECATION, UserWarning)  # another category: not ours to hide
    assert [str(w.message) for w in caught] == ["The Pallas Triton backend will change.",
                                                lowering.TRITON_DEPRECATION]


def test_a_jax_without_the_mosaic_interpreter_fails_with_the_reason(monkeypatch):
    monkeypatch.setattr(lowering, "mosaic_interpreter", lambda: None)
    a = jnp.ones((64, 64), jnp.bfloat16)
    with lowering.use_lowering("mosaic"), pytest.raises(RuntimeError, match="Mosaic GPU interpreter.*not in jax"):
        matmul(a, a, interpret=True)


@pytest.mark.skipif(lowering.mosaic_interpreter() is None or jax.default_backend() != "cpu",
                    reason="the Mosaic GPU interpreter on CPU (missing from this jax, or a GPU runs the kernels)")
@pytest.mark.parametrize("wait", [True, False])
def test_the_mosaic_interpreter_reports_a_read_before_its_copy_is_waited(wait, mosaic_race_detectors):
    """The seam's interpreter params detect races: a kernel that reads shared memory before waiting on the
    barrier of the TMA copy filling it is reported (it still computes 2 here), the same kernel with the wait is
    not. What no_mosaic_races relies on for the matmul and conv kernels."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(x_ref, out_ref, smem_ref, barrier_ref):
        plgpu.copy_gmem_to_smem(x_ref, smem_ref, barrier_ref)
        if wait:
            plgpu.barrier_wait(barrier_ref)
        smem_ref[...] = smem_ref[...] + 1.0
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem_ref, out_ref)
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                       scratch_types=dict(smem_ref=plgpu.SMEM((8, 128), jnp.float32),
                                           barrier_ref=plgpu.Barrier(num_arrivals=1)),
                       interpret=lowering.mosaic_interpreter())(jnp.ones((8, 128), jnp.float32))
    assert float(out[0, 0]) == 2.0
    assert [r.races_found for r in mosaic_race_detectors] == [not wait]


def test_a_conv_layer_follows_the_run_lowering():
    """fg.nn.Conv on the pallas backend: a 3x3 conv is the implicit-GEMM kernel, a 1x1 the matmul; both on Mosaic
    GPU on an H100 under auto, both on Triton when the run says so (the 1x1 once ignored it)."""
    x = jax.ShapeDtypeStruct((8, 14, 14, 64), jnp.bfloat16)
    layer = nn.Conv(128, (3, 3), backend="pallas")
    params = layer.init(jax.random.key(0), jnp.zeros((1, 14, 14, 64), jnp.bfloat16))
    pointwise = nn.Conv(128, (1, 1), backend="pallas")  # routed to the matmul: the run's lowering still holds
    params_1x1 = pointwise.init(jax.random.key(0), jnp.zeros((1, 14, 14, 64), jnp.bfloat16))
    for run_lowering, want in (("auto", ["conv2d_fwd_mgpu", "matmul_mgpu"]), ("triton", ["conv2d_fwd", "matmul_fwd"])):
        with lowering.lower_for_gpu(), tuning.use_device_kind("H100"), lowering.record_launches() as rows:
            with nn.default_backend("pallas", pallas_lowering=run_lowering):
                jax.jit(layer.apply).trace(params, x)
                jax.jit(pointwise.apply).trace(params_1x1, x)
        assert [r["name"] for r in rows] == want, run_lowering
