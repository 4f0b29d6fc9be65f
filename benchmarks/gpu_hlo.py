"""jaxdiff's GPU benchmark programs compiled for an H100/H200 on a machine without one.

XLA can compile for a CUDA target it is only told about (deviceless AOT: the CUDA PJRT
plugin, a topology from a ``GpuTargetConfig``, no driver, no GPU). This compiles
``benchmarks/gpu.py``'s programs (SD 1.5 shapes, bf16) that way, with
``gpu.py``'s experiments (``VARIANTS``: their module patches and XLA flags), and
summarises the optimized HLO: kernels per program and, for the sampler, per step of
its loop; the library calls (cuDNN convolutions and attention, cuBLAS and Triton
GEMMs); the other kernels grouped as ``gpu.py``'s profiles group them, with the bytes
each group reads and writes and that traffic's time at the card's bandwidth (a floor:
those kernels are memory-bound); and the compile's wall time.

What it cannot say: how fast anything runs, and what autotuning picks (deviceless
compiles skip it: each convolution keeps cuDNN's default algorithm). GEMMs are all
cuBLAS calls by default, as in the H200 profiles of the autotuned programs; with
``--triton-gemm`` XLA's untuned choice, often a Triton GEMM (one with no default
tiling is compiled with Triton GEMMs off after all, which the report says). Use it in
a session without a GPU to see whether an experiment changes the program the way it
should before it takes device time.

Set-up (once; the CUDA plugin and its libraries, ~3 GB, in a venv of their own so
that nothing else here sees a CUDA backend):
    bash benchmarks/setup_gpu_hlo.sh                      # -> .bench/venv-cuda
Run:
    .bench/venv-cuda/bin/python -m benchmarks.gpu_hlo --items unet_b16 t2i \\
        --variants default groupnorm_staged_sums cudnn_head_256
Each variant compiles in a process of its own (XLA flags are read once per process).
``--platform cpu --tiny`` compiles the toy shapes for this machine's CPU instead (the
tests' smoke run).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from benchmarks.gpu import CONFIGS, VARIANTS, apply_patches, kernel_kind, sd_config  # noqa: E402

# Cards (public specifications): SMs, HBM bandwidth and size, boost clock, L2; both
# compute capability 9.0. The strings are XLA's GpuTargetConfig text protos.
CARDS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", sms=132, bw=3.35e12, mem=80 * 2**30),
    "h200": dict(name="NVIDIA H200", sms=132, bw=4.8e12, mem=141 * 2**30),
}
_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bw:.0f}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {mem}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""
ITEMS = ("unet_b2", "unet_b16", "vae_decode", "t2i", "train_step")
# gpu.py worker options (a variant's "options") that shape the programs here too;
# the timing ones change no program.
_MODELLED_OPTIONS = {
    "fused_projections",
    "ohwi_kernels",
    "train_ohwi_kernels",
    "split_programs",
    "compiler_options",
    "progress",
    "profile_files",
    "trace_compile",
}
# Deviceless compiles cannot autotune; a Triton GEMM XLA has no default tiling for
# fails with this, and is compiled again with Triton GEMMs off.
_TILING_ERROR = "Couldn't find output tile sizes"
# HLO ops that launch no kernel of their own.
_NO_KERNEL = set(
    "parameter get-tuple-element tuple constant bitcast while conditional call after-all "
    "opt-barrier partition-id replica-id".split()
)
_BYTES = {
    **dict.fromkeys(("pred", "s8", "u8"), 1),
    **dict.fromkeys(("bf16", "f16", "s16", "u16"), 2),
    **dict.fromkeys(("f32", "s32", "u32"), 4),
    **dict.fromkeys(("f64", "s64", "u64"), 8),
}
_LIBRARY = (
    ("__cudnn$fmha", "fused attention (library)"),
    ("__cudnn$conv", "convolution (library)"),
    ("__cublas", "matmul (library)"),
)
# Pallas' Triton kernels (custom calls named in their backend config), grouped as
# gpu.py's profiles group them by kernel name.
_PALLAS = "__gpu$xla.gpu.triton"


def target_config(card: str) -> str:
    return _TARGET.format(**CARDS[card])


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (tuples summed)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 0)
    return total


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    """HLO module text -> ({computation: its instruction lines}, the entry's name)."""
    comps: dict[str, list[str]] = {}
    entry = cur = None
    for line in text.splitlines():
        m = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif cur is not None and line.strip() == "}":
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")


def _loop_invariant(lines: list[str]) -> set[str]:
    """Instructions of a while body (its lines) whose values are the same in every
    iteration: computed only from loop-state elements the body passes on unchanged
    (and from constants). Such kernels could run once, before the loop."""
    defs = {m.group(1): m for m in map(_INSTR.match, lines) if m}
    root = next((ln for ln in lines if ln.lstrip().startswith("ROOT ")), "")
    m = _INSTR.match(root)
    if not m or m.group(3) != "tuple":
        return set()
    param = next((n for n, d in defs.items() if d.group(3) == "parameter"), None)
    args = re.sub(r"/\*.*?\*/", "", m.group(4)).split(")")[0]
    outs = [o.strip().lstrip("%") for o in args.split(",")]
    index = re.compile(rf"%{re.escape(param or '')}\), index=(\d+)")

    def element(name: str) -> int | None:  # i for get-tuple-element(param), index=i
        d = defs.get(name)
        if d is None or d.group(3) != "get-tuple-element":
            return None
        hit = index.search(d.group(4))
        return int(hit.group(1)) if hit else None

    kept = {i for i, out in enumerate(outs) if element(out) == i}
    invariant: set[str] = set()
    for name, d in defs.items():
        op, rest = d.group(3), d.group(4)
        if op == "get-tuple-element" and element(name) is not None:
            if element(name) in kept:
                invariant.add(name)
            continue
        if op in ("parameter", "rng", "rng-bit-generator") or "has_side_effect=true" in rest:
            continue
        operands = [o for o in re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if o in defs]
        if (operands or op == "constant") and all(o in invariant for o in operands):
            invariant.add(name)
    return invariant


def _kind(name: str, op: str, rest: str) -> str:
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    if target and target.group(1) == _PALLAS:
        names = re.findall(r'\bname = "(\w+)"', rest)  # the last: after the kernel's IR
        return kernel_kind(names[-1] if names else "pallas_call", None)
    for prefix, kind in _LIBRARY:
        if target and target.group(1).startswith(prefix):
            return kind
    fusion_kind = re.search(r'"kind":"([^"]+)"', rest) if "kind=kCustom" in rest else None
    if fusion_kind and "gemm" in fusion_kind.group(1):
        return "matmul (library)"  # a Triton (or cuBLAS-rewritten) GEMM fusion
    # Other custom fusions (Triton's row normalisations: the LayerNorms) by their op.
    op_name = re.search(r'op_name="([^"]*)"', rest)
    return kernel_kind(name.replace(".", "_"), op_name.group(1) if op_name else None)


def _sliced_reads(comps: dict[str, list[str]], rest: str) -> dict[int, int]:
    """For a fusion (``rest``: its instruction after the opcode), the bytes it reads of
    each parameter that its fused computation uses only through slices: {parameter
    number: the slices' bytes}."""
    called = re.search(r"calls=%([\w.\-]+)", rest)
    if not called or called.group(1) not in comps:
        return {}
    params, uses = {}, collections.defaultdict(list)  # a parameter or its bitcast: its number
    for line in comps[called.group(1)]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, args = m.groups()
        operands = re.findall(r"%([\w.\-]+)", args.split("), ")[0])
        if op == "parameter":
            params[name] = int(re.match(r"(\d+)", args).group(1))
        elif op == "bitcast" and operands and operands[0] in params:
            params[name] = params[operands[0]]
        else:
            for operand in operands:
                if operand in params:
                    uses[params[operand]].append((op, shape_bytes(shape)))
    return {
        number: sum(b for _, b in found)
        for number, found in uses.items()
        if all(op == "slice" for op, _ in found)
    }


def summarize(text: str) -> dict[str, Any]:
    """Kernels of an optimized GPU HLO module: in the entry computation ("program")
    and in the bodies of its while loops ("loop": once per iteration), each counted
    with the bytes of its operands and results (a slice's: what it writes, twice),
    grouped by ``gpu.py``'s ``kernel_kind``; ``kernels["loop_invariant"]``: the loop's
    kernels whose inputs do not change between iterations (see
    :func:`_loop_invariant`: work XLA left in the loop). A conditional's branches are
    all counted (an upper bound), a loop nested in a loop's body as part of that body."""
    comps, entry = _computations(text)
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    kernels = collections.Counter()

    def walk(comp: str, where: str, seen: set) -> None:
        sizes: dict[str, int] = {}
        invariant = _loop_invariant(comps[comp]) if where == "loop" else set()
        for line in comps[comp]:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            sizes[name] = shape_bytes(shape)
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                if body not in seen:
                    walk(body, "loop", seen | {body})
                continue
            if op in ("conditional", "call"):
                for sub in re.findall(r"(?:branch_computations=\{|to_apply=|, )%([\w.\-]+)", rest):
                    if sub in comps and sub not in seen:
                        walk(sub, where, seen | {sub})
                continue
            if op in _NO_KERNEL:
                continue
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
            if op == "slice" or ("slice" in name and "update_slice" not in name):
                # A slice kernel reads only the part it writes, not its whole operand.
                moved = 2 * sizes[name]
            else:
                # An operand passed twice is read once (a Pallas kernel given one array
                # for two blocks); one a fusion only slices is read as far as sliced.
                read = _sliced_reads(comps, rest)
                first = {o: i for i, o in reversed(list(enumerate(operands)))}
                moved = sizes[name] + sum(read.get(i, sizes.get(o, 0)) for o, i in first.items())
            group = groups[(where, _kind(name, op, rest))]
            group[0] += 1
            group[1] += moved
            kernels[where] += 1
            if name in invariant:
                kernels["loop_invariant"] += 1

    walk(entry, "program", {entry})
    return {
        "kernels": dict(kernels),
        "groups": [
            [where, kind, n, b]
            for (where, kind), (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])
        ],
    }


# ---------------------------------------------------------------- the programs


def _abstract(tree: Any, sharding: Any, dtype: Any = None) -> Any:
    import jax

    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sharding), tree
    )


def lowered_programs(item: str, cfg: dict, mesh: Any, options: dict) -> dict[str, Any]:
    """``{part: jax.stages.Lowered}`` of one of ``gpu.py``'s items at ``cfg``'s shapes,
    from abstract parameters and inputs replicated over ``mesh`` (one device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from benchmarks.gpu import train_setup
    from jaxdiff import pipeline
    from jaxdiff.models.autoencoder import vae_decode
    from jaxdiff.models.sd import abstract_params, apply_unet
    from jaxdiff.models.unet import fuse_projections, ohwi_kernels
    from jaxdiff.train.step import init_state, jit_train_step, make_train_step

    rep = NamedSharding(mesh, PartitionSpec())
    config = sd_config(cfg, 49408, 49406, 49407)  # CLIP's vocabulary and bos/eos ids
    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    params = abstract_params(config)
    batch = cfg["batches"][item]
    side = cfg["unet"]["sample_size"]

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    # Inference params as the pipeline (and gpu.py) keep them: bf16, the norms' fp32.
    params16 = jax.tree_util.tree_map_with_path(
        lambda path, s: arr(s.shape, pipeline.inference_param_dtype(path, bf16)), params
    )

    if item.startswith("unet"):
        # As gpu.py's UNet items: the projections joined once (fuse_projections), the
        # convolution kernels in cuDNN's order (ohwi_kernels).
        ohwi = options.get("ohwi_kernels", True)

        def weights_of(p):
            w = (
                fuse_projections(p, config.unet)
                if options.get("fused_projections", True)
                else (p, None)
            )
            return (ohwi_kernels(w[0]), w[1]) if ohwi else w

        weights = jax.eval_shape(weights_of, params16["unet"])
        weights = jax.tree.map(lambda s: arr(s.shape, s.dtype), weights)

        def unet(w, x, t, ctx):
            return apply_unet(w[0], x, t, ctx, config, bf16, merged=w[1], ohwi_kernels=ohwi)

        ctx_dim = cfg["unet"]["cross_attention_dim"]
        args = (
            arr((batch, side, side, 4), f32),
            arr((batch,), i32),
            arr((batch, 77, ctx_dim), f32),
        )
        return {"unet": jax.jit(unet).lower(weights, *args)}
    if item == "vae_decode":

        def decode(p, z):
            return vae_decode(p, z, config.vae, bf16)

        return {"decode": jax.jit(decode).lower(params16["vae"], arr((batch, side, side, 4), f32))}
    if item == "train_step":
        tx, step_cfg = train_setup(params["unet"], bf16)
        if options.get("train_ohwi_kernels"):  # as gpu.py's experiment of that name
            step_cfg = dataclasses.replace(step_cfg, ohwi_kernels=True)
            params = dict(params, unet=jax.eval_shape(ohwi_kernels, params["unet"]))
        state = jax.eval_shape(lambda p: init_state(p, tx, step_cfg, jax.random.key(0)), params)
        rng = jax.eval_shape(lambda: jax.random.key(1))
        inputs = {"latents": arr((batch, side, side, 4), f32), "input_ids": arr((batch, 77), i32)}
        # Jitted as the training loop (and gpu.py) jit it: the frozen params only read.
        step = jit_train_step(make_train_step(config, step_cfg, tx), ("unet",))
        return {"step": step.lower(_abstract(state, rep), inputs, _abstract(rng, rep))}
    if item != "t2i":
        raise ValueError(f"unknown item {item!r}; expected one of {ITEMS}")
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    inputs = {
        "input_ids": arr((batch, 77), i32),
        "negative_ids": arr((batch, 77), i32),
        "keys": _abstract(keys, rep),
        "noise": arr((batch, side, side, 4), f32),
        **{k: arr((), f32) for k in ("guidance_scale", "guidance_rescale", "eta", "strength")},
        "start_index": arr((), i32),
    }
    spec = pipeline.GenerateSpec(
        config,
        "text_to_image",
        "ddim",  # as gpu.py's text-to-image item
        cfg["steps"],
        None,
        (side, side),
        bf16,
        bool(options.get("progress", False)),
        mesh,
    )
    if not options.get("split_programs", not options.get("param_layouts", False)):
        return {"generate": pipeline._generate_jit.lower(params16, inputs, spec=spec)}
    # The pipeline's three programs, lowered as StableDiffusion's calls lower them.
    args = pipeline._part_args(params16, spec, inputs)
    return pipeline._lower_parts(args, spec, (), compiled={})


def _compile(lowered: Any, triton_gemm: bool, options: dict) -> tuple[Any, float, str | None]:
    """(compiled, seconds, note), with XLA ``options`` (a variant's compiler options).
    Without ``triton_gemm`` every GEMM goes to cuBLAS; with it, XLA's untuned choice,
    or cuBLAS after all when a Triton GEMM has no default tiling (deviceless compiles
    cannot autotune one)."""
    off = dict(options, xla_gpu_enable_triton_gemm=False)
    start = time.perf_counter()
    try:
        compiled = lowered.compile(dict(options) if triton_gemm else off)
        return compiled, time.perf_counter() - start, None
    except Exception as e:  # jax's JaxRuntimeError
        if not triton_gemm or _TILING_ERROR not in str(e):
            raise
    start = time.perf_counter()
    compiled = lowered.compile(off)
    return compiled, time.perf_counter() - start, "Triton GEMMs off (no default tiling)"


def _pretend_gpu(card: str) -> Any:
    """A topology of one ``card``, and the library's backend checks pointed at it.

    ``jax.default_backend()`` (which jaxdiff reads when tracing: attention kernel,
    GroupNorm form, upsampling form, gradient layouts) says "gpu"; jax's cuDNN
    attention checks read the target's compute capability (9.0), not a local device's.
    """
    import jax
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(card), topology="1x1x1"
    )
    jax.default_backend = lambda: "gpu"
    try:
        fa = importlib.import_module("jax._src.cudnn.fused_attention_stablehlo")
        cc = (9, 0)
        fa.check_compute_capability = lambda c: cc >= tuple(int(x) for x in c.split("."))
        fa.is_cuda_compute_capability_equal = lambda c: cc == tuple(int(x) for x in c.split("."))
    except (ImportError, AttributeError):  # a jax without these: cuDNN's own check decides
        pass
    return topology.devices[:1]


def _worker(args: argparse.Namespace) -> None:
    import jax
    from jax.sharding import Mesh

    spec = VARIANTS.get(args.variant, {})
    apply_patches(spec)
    devices = _pretend_gpu(args.target) if args.platform == "cuda" else jax.devices()[:1]
    mesh = Mesh(devices, ("data",))
    cfg = CONFIGS["tiny" if args.tiny else "sd15"]
    result: dict[str, Any] = {"variant": args.variant, "items": {}}
    # A variant about Triton GEMMs keeps XLA's default for them (its flags decide).
    triton = args.triton_gemm or "triton" in spec.get("xla_flags", "")
    options = spec.get("options", {}).get("compiler_options", {})
    # Worker options this does not reproduce (chosen parameter layouts, for one).
    unmodelled = sorted(set(spec.get("options", {})) - _MODELLED_OPTIONS)
    for item in args.items:
        entry = result["items"][item] = {"parts": {}}
        try:
            for part, lowered in lowered_programs(item, cfg, mesh, spec.get("options", {})).items():
                compiled, secs, note = _compile(lowered, triton, options)
                text = compiled.as_text()
                if unmodelled:
                    note = "; ".join(filter(None, [note, f"not modelled: {', '.join(unmodelled)}"]))
                entry["parts"][part] = dict(summarize(text), compile_s=round(secs, 2), note=note)
                if args.keep_hlo:
                    name = f"{item}_{part}_{args.variant}.hlo.txt.gz"
                    (Path(args.out) / name).write_bytes(gzip.compress(text.encode()))
        except Exception as e:  # one item's failure leaves the others' results
            entry["error"] = f"{type(e).__name__}: {e}"[:800]
    Path(args.result).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- driver


def _rows(results: dict[str, dict], card: dict) -> tuple[list[str], list[list[str]]]:
    """The table: per item, kernels and memory floor per program and per loop step,
    library calls, then the kernel groups whose traffic differs between variants or
    is large."""
    names = list(results)
    rows: list[list[str]] = []
    items = dict.fromkeys(i for r in results.values() for i in r["items"])
    for item in items:
        per = {v: results[v]["items"].get(item, {}) for v in names}
        if all("error" in p or not p.get("parts") for p in per.values()):
            rows.append([item, *(p.get("error", "-")[:60] for p in per.values())])
            continue
        stats: dict[str, dict[str, Any]] = {}
        for v, p in per.items():
            s = stats[v] = collections.defaultdict(float)
            notes = [
                f"{name}: {part['note']}"
                for name, part in p.get("parts", {}).items()
                if part["note"]
            ]
            s["notes"] = "; ".join(notes + ([p["error"][:80]] if "error" in p else []))
            for part in p.get("parts", {}).values():
                s["compile_s"] += part["compile_s"]
                s["loop invariant"] += part["kernels"].get("loop_invariant", 0)
                for where, kind, n, b in part["groups"]:
                    s[f"{where} kernels"] += n
                    key = f"{where} {kind}"
                    s[key + " n"] += n
                    s[key + " B"] += b
                    if "(library)" not in kind:
                        s[f"{where} non-library MB"] += b / 1e6
        rows.append(
            [
                f"{item}: compile (s, no autotuning)",
                *(f"{stats[v]['compile_s']:.1f}" for v in names),
            ]
        )
        for where in ("program", "loop"):
            if not any(stats[v][f"{where} kernels"] for v in names):
                continue
            label = "per loop step" if where == "loop" else "per call"
            rows.append(
                [f"  kernels {label}", *(f"{stats[v][f'{where} kernels']:.0f}" for v in names)]
            )
            if where == "loop":
                rows.append(
                    [
                        "    of which loop-invariant (the same every step)",
                        *(f"{stats[v]['loop invariant']:.0f}" for v in names),
                    ]
                )
            rows.append(
                [
                    f"  non-library traffic {label} (ms at {card['bw'] / 1e12:.2f} TB/s)",
                    *(
                        f"{stats[v][f'{where} non-library MB'] * 1e6 / card['bw'] * 1e3:.3f}"
                        for v in names
                    ),
                ]
            )
            kinds = sorted(
                {
                    k[: -len(" n")]
                    for v in names
                    for k in stats[v]
                    if k.startswith(where + " ") and k.endswith(" n")
                },
                key=lambda k: -max(stats[v][k + " B"] for v in names),
            )
            for key in kinds:
                counts = [stats[v][key + " n"] for v in names]
                traffic = [stats[v][key + " B"] for v in names]
                library = "(library)" in key
                if library or len(set(counts)) > 1 or max(traffic) / card["bw"] > 50e-6:
                    kind = key[len(where) + 1 :]
                    rows.append(
                        [
                            f"    {kind[:58]}",
                            *(
                                f"{n:.0f} / {b / card['bw'] * 1e3:.3f} ms"
                                for n, b in zip(counts, traffic, strict=True)
                            ),
                        ]
                    )
        if any(stats[v]["notes"] for v in names):
            rows.append(["  notes", *(stats[v]["notes"] or "-" for v in names)])
    return ["item", *names], rows


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in args.variants:
        env = dict(os.environ)
        if args.platform == "cuda":
            env["JAX_PLATFORMS"] = "cpu"  # the only local backend; the target is compiled for
        if VARIANTS.get(variant, {}).get("xla_flags"):
            env["XLA_FLAGS"] = (
                f"{env.get('XLA_FLAGS', '')} {VARIANTS[variant]['xla_flags']}".strip()
            )
        result = out / f"gpu_hlo_{variant}.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_hlo",
            "--worker",
            "--variant",
            variant,
            "--result",
            str(result),
            "--out",
            str(out),
            "--target",
            args.target,
            "--platform",
            args.platform,
            "--items",
            *args.items,
        ]
        cmd += ["--tiny"] * args.tiny + ["--keep-hlo"] * args.keep_hlo
        cmd += ["--triton-gemm"] * args.triton_gemm
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
        if proc.returncode or not result.exists():
            results[variant] = {
                "items": {i: {"error": proc.stderr.strip()[-800:]} for i in args.items}
            }
        else:
            results[variant] = json.loads(result.read_text())
        print(f"{variant}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    headers, rows = _rows(results, CARDS[args.target])
    where = (
        f"deviceless compile for {CARDS[args.target]['name']}"
        if args.platform == "cuda"
        else "host CPU"
    )
    text = f"{where}; config {'tiny' if args.tiny else 'sd15'}\n" + common.table(headers, rows)
    report = {
        "target": args.target,
        "platform": args.platform,
        "tiny": args.tiny,
        "results": results,
        "table": {"headers": headers, "rows": rows},
    }
    (out / "gpu_hlo.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_hlo.txt").write_text(text + "\n")
    print(text)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu_hlo")
    p.add_argument("--target", default="h200", choices=sorted(CARDS))
    p.add_argument(
        "--platform",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cuda: deviceless for --target (needs the CUDA plugin); cpu: this host",
    )
    p.add_argument("--items", nargs="+", default=["unet_b16", "t2i"], choices=ITEMS)
    p.add_argument(
        "--variants", nargs="+", default=["default"], choices=["default", *sorted(VARIANTS)]
    )
    p.add_argument("--tiny", action="store_true", help="gpu.py's toy shapes")
    p.add_argument("--keep-hlo", action="store_true", help="write each optimized HLO under --out")
    p.add_argument(
        "--triton-gemm",
        action="store_true",
        help="leave Triton GEMMs on (default: off, so every GEMM is a cuBLAS call, as the "
        "H200 profiles show the autotuned programs' GEMMs; untuned, XLA picks Triton)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
