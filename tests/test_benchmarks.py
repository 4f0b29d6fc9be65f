"""Smoke test of the benchmark scripts: their jaxdiff code paths at toy sizes.

No timing is asserted. It runs ``benchmarks/cpu.py`` end to end for the
jaxdiff contenders alone (one device, and one host device per core: model
build, the worker processes and their protocol, the UNet, train-step and
text-to-image items, the table, the JSON and their agreement) and
``benchmarks/gpu.py --tiny`` for the jaxdiff contender's UNet and VAE items, so
the scripts keep working as the library changes. The peers (diffusers-Flax 0.39
in its own venv, PyTorch) are left out: they are what the benchmarks measure
against, not what this repository ships.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, cpu, gpu  # noqa: E402


def test_common_helpers():
    s = common.summarize([0.3, 0.1, 0.2])
    assert s["n"] == 3 and s["median_s"] == 0.2 and s["min_s"] == 0.1
    assert common.ratio(1.0, 4.0) == 0.25 and common.ratio(None, 1.0) is None
    text = common.table(["item", "a"], [["x", "1.0 ms"], ["longer", "2.00 s"]])
    assert text.splitlines()[0].startswith("item") and "longer" in text
    env = common.worker_env(2)
    assert "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", "")
    assert env["OMP_NUM_THREADS"] == "2"


def test_cpu_benchmark_jaxdiff_tiny(tmp_path, monkeypatch):
    from train_helpers import compile_cache_env

    # The workers read the suite's compile cache: a contender's second process (they
    # compile one after the other) loads the first one's programs. Its compile times,
    # which this test does not check, are then no compile times.
    for name, value in compile_cache_env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "cpu.json"
    args = cpu.parse_args(
        [
            "--config",
            "tiny",
            "--contenders",
            "jaxdiff",
            "jaxdiff_cores",
            # unet_b8 and vae_decode add compile time, not code paths (the gpu test
            # below decodes): the smoke test stays under a minute on 2 cores.
            "--items",
            "unet_b2",
            "train_step",
            "t2i_20",
            "--repeats",
            "1",
            "--repeats-slow",
            "1",
            "--processes",
            "2",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    report = cpu.run(args)
    saved = json.loads(out.read_text())
    assert saved["results"]["jaxdiff"]["devices"] == 1
    # one host device per core (the worker's thread count)
    assert saved["results"]["jaxdiff_cores"]["devices"] == (os.cpu_count() or 1)
    for name in ("jaxdiff", "jaxdiff_cores"):
        items = saved["results"][name]["items"]
        assert set(items) == {"unet_b2", "train_step", "t2i_20"}
        for item, r in items.items():
            assert "error" not in r, (name, item, r)
            # one timed call in each of the two worker processes, pooled
            assert r["n"] == 2 and r["median_s"] > 0 and r["compile_s"] >= 0
    assert report["goals"]["unet_b2 vs torch"]["met"] is None  # no peer ran
    # Split over devices, the same computation: UNet to fp32 rounding, images to a level.
    agree = report["agreement"]
    assert agree["unet_b2"]["jaxdiff-jaxdiff_cores"]["max_abs_diff"] < 1e-4
    assert agree["t2i_20"]["jaxdiff-jaxdiff_cores"]["max_abs_diff"] <= 1
    work = tmp_path / "work"
    assert (work / "worker_jaxdiff_0.log").exists() and (work / "worker_jaxdiff_1.log").exists()
    images = np.load(work / "out_jaxdiff_t2i_20.npy")
    spec = json.loads((work / "spec.json").read_text())
    assert images.dtype == np.uint8 and images.shape[0] == spec["batches"]["t2i_20"]
    unet = np.load(work / "out_jaxdiff_unet_b2.npy")
    assert unet.shape == (2, 8, 8, 4) and np.isfinite(unet).all()
    assert np.isfinite(np.load(work / "out_jaxdiff_train_step.npy"))


def test_cpu_agreement_and_report(tmp_path):
    a = np.zeros((2, 4, 4, 4), np.float32)
    b = a + 1e-3
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    outputs = {"unet_b2": {"jaxdiff": str(tmp_path / "a.npy"), "torch": str(tmp_path / "b.npy")}}
    agreement = cpu._agreement(outputs, ["unet_b2"])
    assert abs(agreement["unet_b2"]["jaxdiff-torch"]["max_abs_diff"] - 1e-3) < 1e-9
    results = {
        "jaxdiff": {"items": {"unet_b2": {"median_s": 0.5, "compile_s": 2.0}}},
        "torch": {"items": {"unet_b2": {"median_s": 1.0, "compile_s": 0.1}}},
    }
    text, rows, goals = cpu._report(results, ["unet_b2"], agreement)
    assert goals["unet_b2 vs torch"] == {"ratio": 0.5, "limit": 1.0, "met": True}
    assert "0.50x" in text


def test_gpu_script_tiny_on_cpu(tmp_path):
    args = gpu.parse_args(
        [
            "--tiny",
            "--contenders",
            "jaxdiff",
            "--variants",
            "groupnorm_one_pass",
            "param_layouts",
            "--items",
            "unet_b2",
            "vae_decode",
            "--out",
            str(tmp_path),
            "--budget",
            "300",
        ]
    )
    report = gpu.run(args)
    items = report["results"]["jaxdiff"]["items"]
    assert {"unet_b2", "vae_decode"} <= set(items)
    for item in ("unet_b2", "vae_decode"):
        assert items[item]["median_s"] > 0, items[item]
    assert items["unet_b2"]["flop"] > 0 and items["vae_decode"]["flop"] > 0  # jaxdiff.flops
    assert items["train_step"] == {"skipped": "not selected"}
    # Back to back as well (one synchronisation for several calls), in its own row.
    assert items["unet_b2"]["pipelined_s"] > 0 and items["vae_decode"]["pipelined_s"] > 0
    rows = {r[0]: r for r in report["table"]["rows"]}
    assert rows["back to back unet_b2"][1] != "-"
    # The host's per-call cost of the UNet's parameters as arguments.
    dispatch = report["results"]["jaxdiff"]["info"]["dispatch_ms"]
    kinds = {"unet_params_pruned", "unet_params_kept", "unet_weights_kept", "no_params"}
    assert set(dispatch) == kinds
    # The UNet items call it with its projections joined once (fuse_projections) and
    # its convolution kernels in cuDNN's order (ohwi_kernels).
    weights = report["results"]["jaxdiff"]["info"]["unet_weights"]
    assert weights == "fused projections, OHWI kernels"
    assert all(v > 0 for v in dispatch.values())
    # Where the worker's time went, stage by stage, in order.
    timeline = report["results"]["jaxdiff"]["info"]["timeline"]
    stages = [stage for stage, _ in timeline]
    assert {"random parameters", "unet_b2", "vae_decode", "profile unet_b2"} <= set(stages)
    assert stages.index("unet_b2") < stages.index("vae_decode")
    assert all(b >= a for (_, a), (_, b) in zip(timeline, timeline[1:]))
    # Where the first call's compile went (jax.monitoring): the UNet is one program here.
    phases = items["unet_b2"]["compile_phases"]
    assert phases["programs"] >= 1 and phases["cache_hits"] == 0
    assert phases["trace_s"] > 0 and phases["lower_s"] > 0
    assert 0 < phases["xla_max_s"] <= phases["xla_s"] < items["unet_b2"]["first_call_s"]
    # The experiment: the same items again with the module constant patched.
    variant = report["results"]["jaxdiff+groupnorm_one_pass"]
    assert variant["info"]["variant"]["patch"][1] == "_ONE_PASS_GROUPNORM"
    assert variant["items"]["vae_decode"]["median_s"] > 0
    assert "+groupnorm_one_pass/jaxdiff" in report["table"]["headers"]
    # An experiment through the worker's options: the UNet with the parameters in the
    # layouts XLA picks (the jaxdiff row: the library's default, plain layouts).
    assert report["results"]["jaxdiff"]["info"]["param_layouts"] == "default"
    laid = report["results"]["jaxdiff+param_layouts"]
    assert laid["info"]["param_layouts"] == "chosen"
    assert laid["info"]["param_layouts_moved"]["of"] > 0  # formats were read back
    assert laid["items"]["unet_b2"]["median_s"] > 0
    files = {f.name for f in tmp_path.iterdir()}
    assert {"gpu.json", "gpu.txt", "gpu.log"} <= files
    assert not any(f.startswith("gpu_") for f in files)  # per-contender logs merged


def test_gpu_compile_phases_sum_each_phase():
    events = [
        ("/jax/core/compile/jaxpr_trace_duration", 0.5),
        ("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.25),
        ("/jax/core/compile/backend_compile_duration", 3.0),
        ("/jax/core/compile/jaxpr_trace_duration", 0.125),
        ("/jax/compilation_cache/cache_retrieval_time_sec", 0.01),
        ("/jax/core/compile/backend_compile_duration", 0.01),
        ("/jax/something_else", 9.0),
    ]
    assert gpu.compile_phases(events) == {
        "trace_s": 0.625,
        "lower_s": 0.25,
        "xla_s": 3.01,
        "xla_max_s": 3.0,
        "programs": 2,
        "cache_hits": 1,
    }
    assert gpu.compile_phases([])["programs"] == 0


def test_gpu_compile_trace_summary_sums_host_events_and_removes_the_trace(tmp_path):
    import gzip

    meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}  # noqa: E731
    ev = lambda name, dur, pid=1: {"ph": "X", "pid": pid, "name": name, "dur": dur}  # noqa: E731
    events = [
        meta(1, "/host:CPU"),
        meta(2, "/device:GPU:0"),
        ev("GpuCompiler::RunBackend", 5000.0),
        ev("gemm-fusion-autotuner", 3000.0),
        ev("gemm-fusion-autotuner", 1000.0),
        ev("loop_add_fusion", 9000.0, pid=2),  # a kernel: not the host's time
    ]
    trace = tmp_path / "trace" / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    (trace / "h.trace.json.gz").write_bytes(gzip.compress(json.dumps(events).encode()))
    summary = gpu.compile_trace_summary(tmp_path / "trace")
    assert summary == {
        "top": [["GpuCompiler::RunBackend", 5.0, 1], ["gemm-fusion-autotuner", 4.0, 2]],
        "events": 3,
    }
    assert not (tmp_path / "trace").exists()


def test_gpu_experiments_compiler_options_exist_in_this_jaxlib():
    """The options a variant hands to jit (XLA refuses one it does not know, and the
    device run would lose the experiment to it)."""
    checked = []
    for name, spec in gpu.VARIANTS.items():
        given = [spec.get("options", {}).get("compiler_options")]
        # A patched library default: each backend's options.
        given += [
            options
            for _, attr, value in gpu.variant_patches(spec)
            if attr == "DEFAULT_COMPILER_OPTIONS"
            for options in value.values()
        ]
        for options in filter(None, given):
            fn = jax.jit(lambda x: x + 1, compiler_options=options)
            assert float(fn(jnp.float32(1))) == 2.0, name
            checked.append(name)
    assert {"t2i_cold_llvm_parallel", "t2i_cold_candidate"} <= set(checked)


def test_gpu_experiments_patch_switches_that_exist():
    """Each variant's "patch" names a module constant the library has (a misspelt one
    would be set without effect, and the device run would time the default twice)."""
    import importlib

    patched = [name for name, spec in gpu.VARIANTS.items() if gpu.variant_patches(spec)]
    for name in patched:
        for module, attr, _ in gpu.variant_patches(gpu.VARIANTS[name]):
            assert hasattr(importlib.import_module(module), attr), name
    assert "cudnn_head_256" in patched
    assert len(gpu.variant_patches(gpu.VARIANTS["session14_forms"])) == 4


def test_gpu_device_spans_split_calls_at_the_widest_gaps():
    """Two calls on the device: kernels 0-3 ms (one overlapping another) and 10-14 ms;
    the host track does not count."""
    k = lambda ts, dur, pid=1: {"ph": "X", "pid": pid, "ts": ts, "dur": dur}  # noqa: E731
    events = [
        k(0, 1000),
        k(1200, 1800),
        k(1500, 500),  # inside the one before: no gap after it
        k(10000, 3000),
        k(13100, 900),
        k(5000, 90000, pid=2),  # host work
    ]
    assert gpu.device_spans(events, {1}, 2) == [3.0, 4.0]
    assert gpu.device_spans(events, {1}, 1) == [14.0]
    assert gpu.device_spans([], {1}, 2) == []


def test_gpu_profile_summary_buckets_kernels(tmp_path):
    """Per-kernel and per-kind sums of a (synthetic) device trace, fusions named by the HLO."""
    import gzip

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_xmma_fprop_implicit_gemm_bf16", "dur": 3000},
        {"ph": "X", "pid": 1, "name": "cudnn_generated_sdpa_flash_fprop", "dur": 2000},
        {"ph": "X", "pid": 1, "name": "loop_multiply_fusion_45", "dur": 500},
        {"ph": "X", "pid": 1, "name": "loop_multiply_fusion_45", "dur": 500},
        {"ph": "X", "pid": 1, "name": "input_reduce_fusion_7", "dur": 250},
        {"ph": "X", "pid": 1, "name": "loop_convert_fusion_3", "dur": 40},
        {"ph": "X", "pid": 1, "name": "Memset", "dur": 10},
        {"ph": "X", "pid": 2, "name": "host work, not device time", "dur": 99000},
    ]
    trace_dir = tmp_path / "plugins" / "profile" / "run"
    trace_dir.mkdir(parents=True)
    (trace_dir / "host.trace.json.gz").write_bytes(gzip.compress(json.dumps(events).encode()))
    hlo = (
        "ENTRY %main {\n"
        "  %loop_multiply_fusion.45 = bf16[16,4096,1280]{2,1,0} fusion(%a), metadata={op_name="
        '"jit(step)/jvp(UNet2DConditionModel)/down_blocks_0/attentions_0/ff/net_0/mul"}\n'
        "  %input_reduce_fusion.7 = f32[16,32]{1,0} fusion(%b), metadata={op_name="
        '"jit(step)/transpose(jvp(UNet2DConditionModel))/up_blocks_1/resnets_0/norm1/reduce_sum"}\n'
        "  ROOT %loop_convert_fusion.3 = bf16[16,32]{1,0} fusion(%c), metadata={op_name="
        '"jit(step)/jvp(UNet2DConditionModel)/conv_in/convert_element_type"}\n'
        "}\n"
    )
    copy = tmp_path / "copy.trace.json.gz"
    summary = gpu.profile_summary(tmp_path, copy, hlo_text=hlo)
    assert copy.exists()
    assert summary["tracks"] == ["/device:GPU:0"]
    assert summary["total_ms"] == pytest.approx(6.30)  # the host track is left out
    assert summary["top"][0] == ["sm90_xmma_fprop_implicit_gemm_bf16", 3.0, 1]
    assert summary["mapped_ms"] == pytest.approx(1.29)
    # Device time per line of the device's track (a thread without a name: its id).
    threads = {n: (pytest.approx(ms), c) for n, ms, c in summary["threads"]}
    assert threads == {"Stream #7": (3.0, 1), "None": (3.30, 6)}
    kinds = {k: (pytest.approx(ms), n) for k, ms, n in summary["by_kind"]}
    assert kinds == {
        "convolution (library)": (3.0, 1),
        "fused attention (library)": (2.0, 1),
        "UNet2DConditionModel fwd: net/mul": (1.0, 2),
        "UNet2DConditionModel bwd: norm/reduce_sum": (0.25, 1),
        # An XLA fusion named "convert" is no convolution.
        "UNet2DConditionModel fwd: conv_in/convert_element_type": (0.04, 1),
        "unmapped": (0.01, 1),
    }
    # A module's method as the scope (the VAE decoder runs as AutoencoderKL.decode).
    vae_op = "jit(decode_images)/AutoencoderKL.decode/decoder/mid_block/resnets_0/norm1/reduce_sum"
    assert (
        gpu.kernel_kind("input_reduce_fusion_3", vae_op) == "AutoencoderKL.decode: norm/reduce_sum"
    )
    # jaxdiff's Pallas kernels by their names (their op name is only "pallas_call").
    assert gpu.kernel_kind("geglu_matmul_65536x320x1280", None) == "GEGLU matmul, Pallas (library)"
    assert gpu.kernel_kind("groupnorm_stats_4096x320", None) == "GroupNorm statistics, Pallas"


def test_gpu_dispatch_ms_passes_a_donated_argument_on():
    import jax.numpy as jnp

    ms, last = gpu.dispatch_ms(lambda s, x: s + x, jnp.zeros(3), jnp.ones(3), calls=4)
    assert ms > 0 and last.shape == (3,)  # not donated: the argument as given
    ms, last = gpu.dispatch_ms(lambda s: s + 1, jnp.zeros(3), donate=True, calls=4)
    assert ms > 0 and float(last[0]) == 5.0  # the warm-up call and four timed ones


def test_gpu_merge_two_calls_into_one_table(tmp_path):
    """--merge: the later call's measured items win, its skipped ones do not erase."""

    def report(date, results):
        return {"benchmark": "gpu", "config": "tiny", "date": date, "results": results}

    measured = lambda ms: {"median_s": ms / 1e3, "n": 5, "compile_s": 1.0}  # noqa: E731
    first = report(
        "call 1",
        {
            "jaxdiff": {"items": {"unet_b16": measured(40.0), "t2i": measured(900.0)}, "info": {}},
            "torch": {"items": {"unet_b16": {"skipped": "over budget"}}, "info": {}},
        },
    )
    second = report(
        "call 2",
        {
            "jaxdiff": {"items": {"unet_b16": measured(37.0), "t2i": {"skipped": "x"}}, "info": {}},
            "torch": {"items": {"unet_b16": measured(52.0)}, "info": {}},
        },
    )
    paths = []
    for i, r in enumerate((first, second)):
        paths.append(str(tmp_path / f"r{i}.json"))
        Path(paths[-1]).write_text(json.dumps(r))
    merged = gpu.merge(paths, tmp_path / "out")
    items = merged["results"]["jaxdiff"]["items"]
    assert items["unet_b16"]["median_s"] == pytest.approx(0.037)
    assert items["t2i"]["median_s"] == pytest.approx(0.9)  # not erased by a skip
    assert merged["results"]["torch"]["items"]["unet_b16"]["median_s"] == pytest.approx(0.052)
    row = next(r for r in merged["table"]["rows"] if r[0] == "unet_b16")
    assert "0.71x" in row  # 37 / 52, across the two calls
    assert (tmp_path / "out" / "gpu.txt").read_text().count("call ") == 2


def _hlo_line(name: str, shape: str, op: str, args: str, attrs: str, op_name: str) -> str:
    return f'  %{name} = {shape} {op}({args}), {attrs}, metadata={{op_name="jit(f)/{op_name}"}}'


_F32 = "f32[4,8]{1,0}"
_HLO_WITH_LOOP = "\n".join(
    [
        "HloModule jit_f",
        "",
        "%fused_add (param_0: f32[4,8]) -> f32[4,8] {",
        f"  %param_0 = {_F32} parameter(0)",
        f"  ROOT %add.1 = {_F32} add(%param_0, %param_0)",
        "}",
        "",
        "%body (p: (s32[], f32[4,8], f32[4,8])) -> (s32[], f32[4,8], f32[4,8]) {",
        f"  %p = (s32[], {_F32}, {_F32}) parameter(0)",
        "  %i = s32[] get-tuple-element(%p), index=0",
        f"  %x = {_F32} get-tuple-element(%p), index=1",
        f"  %k = {_F32} get-tuple-element(%p), index=2",
        _hlo_line(
            "cudnn-conv.1", "(bf16[4,8]{1,0}, u8[0]{0})", "custom-call", "%x",
            'custom_call_target="__cudnn$convForward"', "UNet/conv_in/conv_general_dilated",
        ),
        # The same in every iteration: it reads only the state element passed on as is.
        _hlo_line(
            "loop_add_fusion.1", _F32, "fusion", "%k", "kind=kLoop, calls=%fused_add",
            "UNet/resnets_0/add",
        ),
        _hlo_line(
            "loop_add_fusion.2", _F32, "fusion", "%x, %loop_add_fusion.1",
            "kind=kLoop, calls=%fused_add", "UNet/resnets_0/add",
        ),
        _hlo_line(
            "loop_convert_fusion.3", _F32, "fusion", "%loop_add_fusion.2",
            "kind=kLoop, calls=%fused_add", "UNet/resnets_0/convert_element_type",
        ),
        f"  ROOT %t = (s32[], {_F32}, {_F32}) tuple(%i, %loop_convert_fusion.3, /*index=2*/%k)",
        "}",
        "",
        "%cond (p.1: (s32[], f32[4,8], f32[4,8])) -> pred[] {",
        f"  %p.1 = (s32[], {_F32}, {_F32}) parameter(0)",
        "  ROOT %c = pred[] constant(true)",
        "}",
        "",
        "ENTRY %main (a: f32[4,8]) -> f32[4,2] {",
        f"  %a = {_F32} parameter(0)",
        "  %z = s32[] constant(0)",
        f"  %init = (s32[], {_F32}, {_F32}) tuple(%z, %a, %a)",
        f"  %w = (s32[], {_F32}, {_F32}) while(%init), condition=%cond, body=%body",
        f"  %out = {_F32} get-tuple-element(%w), index=1",
        _hlo_line(
            "wrapped_transpose.1", "f32[8,4]{1,0}", "fusion", "%out",
            "kind=kInput, calls=%fused_add", "transpose",
        ),
        _hlo_line(
            "cublas-gemm.1", "(f32[4,4]{1,0}, s8[16]{0})", "custom-call",
            "%a, %wrapped_transpose.1", 'custom_call_target="__cublas$gemm"', "dot_general",
        ),
        _hlo_line(
            "wrapped_slice.2", "f32[4,2]{1,0}", "fusion", "%cublas-gemm.1",
            "kind=kLoop, calls=%fused_add", "UNet/to_k/dot_general",
        ),
        "  ROOT %r = f32[4,2]{1,0} copy(%wrapped_slice.2)",
        "}",
        "",
    ]
)  # fmt: skip


def test_gpu_hlo_summary_counts_kernels_in_the_program_and_per_loop_step():
    """Kernels of an optimized GPU HLO text with their bytes moved, the while body's apart."""
    from benchmarks import gpu_hlo

    assert gpu_hlo.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0}, u8[0]{0})") == 12 + 16
    summary = gpu_hlo.summarize(_HLO_WITH_LOOP)
    assert summary["kernels"] == {"program": 4, "loop": 4, "loop_invariant": 1}
    groups = {(where, kind): (n, b) for where, kind, n, b in summary["groups"]}
    assert groups == {
        # result 64 + 0 bytes, operand 128
        ("loop", "convolution (library)"): (1, 192),
        ("loop", "UNet: resnets/add"): (2, 256 + 384),
        ("loop", "UNet: resnets/convert_element_type"): (1, 256),
        ("program", "outside modules: transpose"): (1, 256),
        # result 64 + 16 bytes, operands 128 + 128
        ("program", "matmul (library)"): (1, 336),
        # a slice reads what it writes (32 bytes), not its whole operand
        ("program", "UNet: to_k/dot_general"): (1, 64),
        ("program", "unmapped"): (1, 64),
    }
    with pytest.raises(ValueError, match="ENTRY"):
        gpu_hlo.summarize("HloModule empty\n")


_HLO_SLICES_AND_PALLAS = "\n".join(
    [
        "HloModule jit_g",
        "",
        "%fused_rows (param_0: f32[4,8], param_1: f32[8]) -> f32[8] {",
        f"  %param_0 = {_F32} parameter(0)",
        "  %param_1 = f32[8]{0} parameter(1)",
        "  %rows = f32[2,2,8]{2,1,0} bitcast(%param_0)",
        "  %row = f32[1,1,8]{2,1,0} slice(%rows), slice={[0:1], [0:1], [0:8]}",
        "  %flat = f32[8]{0} bitcast(%row)",
        "  ROOT %sum = f32[8]{0} add(%flat, %param_1)",
        "}",
        "",
        "ENTRY %main (a: f32[4,8], v: f32[8]) -> f32[8] {",
        f"  %a = {_F32} parameter(0)",
        "  %v = f32[8]{0} parameter(1)",
        _hlo_line(
            "loop_add_fusion", "f32[8]{0}", "fusion", "%a, %v",
            "kind=kLoop, calls=%fused_rows", "GroupNorm/add",
        ),
        _hlo_line(
            "pallas_call.1", "f32[2,8]{1,0}", "custom-call", "%a, %a",
            'custom_call_target="__gpu$xla.gpu.triton", '
            'backend_config={grid_x = 4 : i32, ir = "ML", name = "groupnorm_stats_4x8"}',
            "pallas_call",
        ),
        "  ROOT %r = f32[8]{0} copy(%loop_add_fusion)",
        "}",
        "",
    ]
)  # fmt: skip


def test_gpu_hlo_traffic_reads_slices_and_repeated_operands_once():
    """A fusion that only slices an operand (through a bitcast) reads the slice (32 of
    128 bytes); a Pallas kernel given one array twice reads it once, and is grouped by
    its kernel's name."""
    from benchmarks import gpu_hlo

    groups = {kind: (n, b) for _, kind, n, b in gpu_hlo.summarize(_HLO_SLICES_AND_PALLAS)["groups"]}
    assert groups == {
        "GroupNorm: GroupNorm/add": (1, 32 + 32 + 32),  # result, row 0 of a, v
        "GroupNorm statistics, Pallas": (1, 64 + 128),  # result, a once
        "unmapped": (1, 64),  # the copy
    }


def test_gpu_hlo_tiny_on_cpu(tmp_path):
    """The deviceless-compile report's whole path, compiled for this CPU at toy shapes:
    one process per variant, its patch applied there, the sampler's loop counted apart."""
    from benchmarks import gpu_hlo

    report = gpu_hlo.run(
        gpu_hlo.parse_args(
            [
                "--platform",
                "cpu",
                "--tiny",
                "--items",
                "unet_b2",
                "t2i",
                "--out",
                str(tmp_path),
                "--variants",
                "default",
                "subpixel_upsample",
            ]  # fmt: skip
        )
    )
    results = report["results"]
    assert set(results) == {"default", "subpixel_upsample"}
    kernels = {}
    for variant, result in results.items():
        for item in ("unet_b2", "t2i"):
            entry = result["items"][item]
            assert "error" not in entry, entry.get("error")
            assert all(part["compile_s"] > 0 for part in entry["parts"].values())
        assert set(result["items"]["t2i"]["parts"]) == {"condition", "denoise", "decode"}
        assert result["items"]["t2i"]["parts"]["denoise"]["kernels"]["loop"] > 0
        kernels[variant] = result["items"]["unet_b2"]["parts"]["unet"]["kernels"]["program"]
    # The variant's module patch (sub-pixel upsampling, off on the CPU) reached its process.
    assert kernels["default"] != kernels["subpixel_upsample"]
    text = (tmp_path / "gpu_hlo.txt").read_text()
    assert "per loop step" in text and "subpixel_upsample" in text
    assert json.loads((tmp_path / "gpu_hlo.json").read_text())["platform"] == "cpu"
