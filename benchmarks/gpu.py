"""GPU benchmark at Stable Diffusion 1.5 shapes, prepared for one call on a lent H100/H200.

Contenders, each in its own process, one after another (each gets the whole GPU):

  jaxdiff        bf16: UNet forward at batch 2 and 16, VAE decode 8 x 512^2, one train
                 step at batch 8 (fp32 master weights, bf16 compute, AdamW), 50-step
                 text-to-image for 8 images with guidance; a bf16 matmul ceiling and
                 the matmul/conv FLOPs (jaxdiff.flops), hence the achieved fraction of it
  torch          diffusers 0.42 PyTorch, fp16 inference / bf16-autocast training (the
                 DESIGN.md yardsticks' settings), plus bf16 UNet forwards
  flax039        diffusers-Flax 0.39 (bf16), its pipeline's pmap path for sampling
  torch_compile  torch.compile(unet) forwards at batch 2 and 16 (fp16)

Random weights (the timings do not depend on them), random latents, prompts
through a CLIP-format tokenizer from ``jaxdiff.tokenizer.save_clip_tokenizer``.

A hard time budget (``--budget``, seconds for the whole run) is given to the
contenders in order, each what it needs (``NEEDS_S``); an item that would start
after its contender's deadline is skipped and marked so, a worker that overruns is
killed, and whatever was measured is kept: results are written after every item.
Each item is timed waiting for every call, then (UNet, VAE, train step) back to
back with one synchronisation at the end. Writes ``gpu.json``, ``gpu.txt`` (the
table) and ``gpu.log`` (every worker's output) under ``--out`` (``$OUT`` on the
device machine), plus the batch-16 UNet's and the train step's traces and optimized
HLO. After jaxdiff come its experiments (``VARIANTS``: the jaxdiff worker again
with one change each).

Peers on the device machine: its image has jax, flax, torch and transformers 5
but no diffusers. ``bash benchmarks/gpu_wheels.sh`` (here) saves the wheels to
``.bench/wheels``; carry that folder and this script installs them into
/tmp/site-torch (diffusers 0.42.1) and /tmp/site-flax039 (diffusers 0.39.0 +
transformers 4.57 + its hub/tokenizers pins) and puts each on its own worker's
PYTHONPATH only.

Run (device):  python3 -m benchmarks.gpu --out $OUT --budget 560 --contenders jaxdiff
   then, warm:  python3 -m benchmarks.gpu --out $OUT --budget 240 \
                    --contenders torch torch_compile flax039
(session 8 on an H200: 470 s and 330 s, 840 s of the 900 device-seconds with the start;
the warm machine is given back after 30 s idle: start the second call at once. Session
10: 503 s, then the machine given back, then 263 s on a fresh one: 846 s in all)
Run (CPU, smoke, tiny shapes):  python -m benchmarks.gpu --tiny --out /tmp/gpu-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a file: python benchmarks/gpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402

CONTENDERS = ("jaxdiff", "torch", "flax039", "torch_compile")
# Seconds each contender needs for all its items on an H200 (session 9: jaxdiff's own
# took 255 s, the train step's compile ~110 s of it; a worker's start ~15 s). Each
# runs until its need is used up or the budget ends, in order: the later ones are
# cut when the budget runs out.
NEEDS_S = {"jaxdiff": 280.0, "torch": 60.0, "flax039": 150.0, "torch_compile": 100.0}
# Experiments: the jaxdiff worker again with one change, on a few items, as the
# contender "jaxdiff+NAME" (run after jaxdiff, before the peers). "patch" sets a
# module constant before anything is traced ("patches": several); "xla_flags" is
# appended to XLA_FLAGS; "options" go to the jaxdiff worker (runner.options); "need_s" as NEEDS_S
# (VARIANT_NEED_S unless given); "cold": no shared XLA cache. Run in this order;
# "default": False marks the ones that run only when named (--variants).
# The sampler's candidate defaults (t2i_cold_candidate, t2i_all_candidates).
VARIANT_PATCHES_T2I_CANDIDATE = (
    ("jaxdiff.models.attention", "_CUDNN_MAX_HEAD", 256),
    (
        "jaxdiff.pipeline",
        "DEFAULT_COMPILER_OPTIONS",
        {"gpu": {"xla_gpu_enable_triton_gemm": False}},
    ),
)


def _train_switch(module: str, switch: str, value: Any, **more: Any) -> dict[str, Any]:
    """An experiment on the train step alone: one module switch set, the profile's
    files kept, ~150 s of the call (the step's compile is ~100 s on an H200)."""
    return {
        "patch": (module, switch, value),
        "options": {"profile_files": True},
        "items": ("train_step",),
        "need_s": 150.0,
        **more,
    }


def _unet_option(need_s: float = 70.0, **options: Any) -> dict[str, Any]:
    """An experiment on the UNet items alone: worker options that change how the
    UNet is called (its weights' form), both batch sizes."""
    return {"options": options, "items": ("unet_b2", "unet_b16"), "need_s": need_s}


VARIANTS: dict[str, dict[str, Any]] = {
    # Measured results (H200, sessions 8 to 11) are in benchmarks/NOTES.md.
    #
    # Each conv kernel's gradient pinned to the default layout before AdamW (switch
    # train.optim._GRAD_LAYOUT). Session 10's profile: XLA computes each conv kernel's
    # update in the layout of cuDNN's weight gradient, transposing the fp32 param and
    # both moments in and out (20 + 5 fusions, 13 ms per step) and copying the results
    # into the donated buffers (249 memcpy, 3.5 ms); an optimization barrier on the
    # gradients did not change that (101.5 vs 106.1 ms; the layout went through it).
    # Predicted: ~-14 ms per step. Session 11 (H200): 106.5 -> 88.5 ms per step (n=1):
    # now the default on CPU and GPU; this forces it on (e.g. under a patched default).
    "train_grad_layout": _train_switch("jaxdiff.train.optim", "_GRAD_LAYOUT", True, default=False),
    # Clipping and AdamW over one flat vector of the UNet's parameters (optax.flatten;
    # switch train.optim._FLAT_OPTIMIZER): the other way out of the same 16 ms (the
    # concatenation writes each gradient in its parameter's layout), and ~1200 small
    # per-leaf kernels become a few large ones, for one more pass over the gradients
    # and the updates (~3 ms of memory traffic on an H200); the optimizer state shrinks
    # from ~1370 to 2 large arrays (less host time per call). Session 11 (H200, without
    # the gradient layouts): 106.5 -> 97.1 ms per step, back to back 93.6 -> 91.7 ms;
    # the train step's compile 108 -> 51 s. Now on top of the gradient layouts.
    # Under FSDP it multiplies the collectives (tests mesh 2 x 4: 144 -> 488 all-gathers,
    # 33 -> 650 collective-permutes): a single-device option at most.
    "train_flat_optimizer": _train_switch("jaxdiff.train.optim", "_FLAT_OPTIMIZER", True),
    # Change 34's A/B: the conv gradients pinned before the clipping (the session-11
    # form) instead of after it (train.optim._PIN_AFTER_CLIP = False). Pinned first, the
    # clipping's norm reads the transposed gradients: deviceless, 93 more transpose
    # kernels per step and +1.7 ms of traffic. Predicted for the default: -1.5 to -2.5 ms
    # per step.
    "train_pin_before_clip": _train_switch("jaxdiff.train.optim", "_PIN_AFTER_CLIP", False),
    # The UNet's convolution kernels kept in cuDNN's [O, H, W, I] order in the train
    # state (StepConfig.ohwi_kernels; change 38's form for training, not yet wired into
    # the training loop): the forward reads them as they are and cuDNN's weight
    # gradients come out in the params' own order, so no kernel or gradient is
    # transposed. Deviceless (H200): 4927 -> 4829 kernels and 17.27 -> 16.29 ms of
    # non-library traffic per step (the optimizer's update kernels 707 -> 611). Predicted:
    # -1.5 to -2.5 ms per step (transposed reads run below the bandwidth).
    "train_ohwi_kernels": {
        "options": {"profile_files": True, "train_ohwi_kernels": True},
        "items": ("train_step",),
        "need_s": 150.0,
    },
    # Change 33's A/B: clipping and AdamW leaf by leaf again, the small leaves not packed
    # (train.optim._PACK_SMALL_BELOW = 0; the default packs the 406 UNet leaves under
    # 2^14 elements into one vector: 810 fewer moment arrays to donate, and deviceless
    # 5367 -> 5020 kernels per step, 378 of them tiny reductions). Predicted for the
    # default: -5 to -6.5 ms per waited-for step (host), -0.7 to -0.9 ms back to back.
    "train_unpacked_optimizer": _train_switch("jaxdiff.train.optim", "_PACK_SMALL_BELOW", 0),
    # The frozen VAE and CLIP params donated with the state and returned by the step,
    # as before session 19 (train.step._DONATE_FROZEN; the default passes them as an
    # argument the step only reads: 444 of SD 1.5's 1697 state arrays fewer to donate
    # and return). Predicted for the default: -2 to -2.7 ms per waited-for step (host:
    # ~6-8 us per donated array against ~1.2-2.3 us per read one on the H200 hosts of
    # sessions 10-11), nothing back to back.
    "train_donate_frozen": _train_switch("jaxdiff.train.step", "_DONATE_FROZEN", True),
    # GEGLU with jax.nn.gelu (the erfc form) instead of layers.gelu_erf: the train step
    # went 94.8 -> 104.1 ms between the session-8 and session-9 runs, with new slow
    # transpose fusions in its backward (13 ms per step); the erf GELU is one of the
    # changes in between (the UNet forward's GEGLU product went 2.3 -> 1.3 ms with it).
    "geglu_jax_gelu": {
        "patch": ("jaxdiff.models.attention", "_GEGLU_GELU", "jax"),
        "items": ("train_step", "unet_b16"),
        "need_s": 170.0,
        "default": False,  # session 10: train 106.1 vs 106.1 ms, b16 36.9 vs 36.5 ms
    },
    # No command buffers at all (every kernel its own launch). Session 9: a batch-16
    # call's device span was 32.2 ms of its 36.5 ms wall time; the ~4 ms before the
    # first kernel and after the last are host time, part of which may be XLA updating
    # its ~78 CUDA graphs per call with new buffer addresses.
    "no_command_buffers": {
        "xla_flags": "--xla_gpu_enable_command_buffer=",
        "items": ("unet_b2", "unet_b16"),
        "need_s": 80.0,
        "default": False,  # session 10: b2 12.1 vs 10.6 ms, b16 36.2 vs 36.5 ms
    },
    # The sampler's first compile in a process that has compiled nothing else (in the
    # jaxdiff worker it follows the UNet's and the VAE's, whose autotuning XLA keeps in
    # process memory; "cold": without the experiments' shared XLA cache either): the
    # compile goal's honest figure.
    # Its first call is traced with XLA's annotations ("trace_compile"): where the cold
    # compile's seconds go, pass by pass (the trace's start and stop are outside the
    # timed call; its events cost a little of it).
    "t2i_cold": {
        "options": {"trace_compile": ("t2i",)},
        "items": ("t2i",),
        "cold": True,
        "need_s": 60.0,
    },
    # The two sampler defaults this run may promote, together, the way they would be
    # promoted: cuDNN attention for heads up to 256 and no Triton GEMM fusions in the
    # pipeline's GPU compiler options (pipeline.DEFAULT_COMPILER_OPTIONS). One cold
    # worker gives both sampler goals' figures for that code, the cold compile
    # (<= 30 s) and the 50-step call (<= 1.6 s): two changes' effects need not add up.
    "t2i_cold_candidate": {
        "patches": VARIANT_PATCHES_T2I_CANDIDATE,
        "items": ("t2i",),
        "cold": True,
        "need_s": 60.0,
    },
    # The same cold compile of the sampler as one program (the pipeline's
    # split_programs=False; sessions 8-11 measured only that form): the default since
    # session 13 compiles the prompt encoder, the 50-step loop and the VAE decoder as
    # three programs at the same time, in threads (XLA's compile releases the GIL and
    # is mostly single-threaded on a GPU host). Separately the UNet (b2, first in its
    # process) compiled in ~27 s and the VAE decoder in ~8 s, the one-program sampler
    # cold in 37.2 s: predicted ~27-29 s for the three at once. On this project's
    # 2-core CPU (small config, 20 steps): 6.2-6.4 -> 5.6-5.75 s; a new sampler and
    # step count 6.3 -> 5.0 s (only the loop recompiles).
    "t2i_cold_one_program": {
        "options": {"split_programs": False},
        "items": ("t2i",),
        "cold": True,
        "need_s": 60.0,
    },
    # The same cold compile with XLA's LLVM module split into parts compiled in
    # parallel, set the way a user would: the pipeline's compiler_options (jit compiler
    # options, not XLA_FLAGS). XLA's CompileAndLink uses the thread pool PJRT hands it,
    # else one thread unless xla_gpu_force_compilation_parallelism says how many: 16,
    # the device machine's cores (the autotuners already use that many by default).
    # Elsewhere the split took 11-22 % off large GPU compiles with the same results;
    # zml turns it on for CUDA. Predicted: 37 -> ~31 s cold if code generation is a
    # third of the compile (t2i_cold's compile trace says how much it is). If it pays:
    # pipeline.DEFAULT_COMPILER_OPTIONS["gpu"] (with the host's core count).
    "t2i_cold_llvm_parallel": {
        "options": {
            "compiler_options": {
                "xla_gpu_enable_llvm_module_compilation_parallelism": True,
                "xla_gpu_force_compilation_parallelism": 16,
            }
        },
        "items": ("t2i",),
        "cold": True,
        "need_s": 60.0,
    },
    # The same cold compile without XLA's Triton GEMM fusions (cuBLAS for every matmul):
    # autotuning them compiles dozens of Triton kernels per fusion. Session 10: cold
    # 37.2 s against 25.6 s after the UNet's and the VAE's compiles in one process.
    "t2i_cold_no_triton_gemm": {
        "xla_flags": "--xla_gpu_enable_triton_gemm=false",
        "items": ("t2i",),
        "cold": True,
        "need_s": 60.0,
    },
    # ... and with no autotuning at all (XLA's default algorithms): the compile's floor
    # and what the sampler's steps lose for it.
    "t2i_cold_autotune_0": {
        "xla_flags": "--xla_gpu_autotune_level=0",
        "items": ("t2i",),
        "cold": True,
        "need_s": 60.0,
    },
    # The train step's compile (~100 s on the H200, a training run's first step) with
    # the same LLVM split, as process flags (the train step is not a pipeline call).
    "train_llvm_parallel": {
        "xla_flags": "--xla_gpu_enable_llvm_module_compilation_parallelism=true "
        "--xla_gpu_force_compilation_parallelism=16",
        "items": ("train_step",),
        "need_s": 150.0,
        "default": False,
    },
    # The sampler with its parameters in the layouts XLA picks (the pipeline's
    # param_layouts=True). The batch-16 UNet's 98 kernel transposes of conv weights
    # take 1.1 ms of each call on the H200; if XLA leaves them inside the sampler's
    # loop, that is ~55 ms of the 50-step call (the goal needs -50 ms), and the t2i
    # profile's counts say so. (Before session 12 the t2i item ignored this option.)
    # Chosen layouts are kept for one program, so this sampler is not split in three
    # (the default's split costs nothing per call: 1632 vs 1632 ms on the CPU).
    "t2i_param_layouts": {"options": {"param_layouts": True}, "items": ("t2i",), "need_s": 70.0},
    # The UNet with its parameters in the layouts XLA picks (jaxdiff.layouts; the
    # pipeline's param_layouts=True). Session 9: the 98 per-call kernel transposes
    # (1.1 ms of GPU time per call) were gone, the wall time was not lower (b2 10.4 vs
    # 10.3 ms, b16 36.5 vs 35.5 ms, across processes); the rerun is in one run.
    "param_layouts": _unet_option(80.0, param_layouts=True),
    # The UNet as fast as the library can run it today, for the batch-16 goal (33.7 ms
    # back to back in session 11, goal 32): parameters in XLA's chosen layouts (the 98
    # conv-weight transposes, 1.1 ms of device time per call, leave) and cuDNN
    # attention for the heads of 160 (deviceless: 60 kernels and ~0.4 ms of traffic
    # fewer per call). Predicted: ~-1.5 ms back to back, ~32.2 ms. Since change 38 the
    # default keeps the kernels in cuDNN's order (no transposes either): this now adds
    # chosen layouts for whatever else XLA would move (nothing, deviceless) to the heads.
    "unet_layouts_head_256": {
        "options": {"param_layouts": True},
        "patch": ("jaxdiff.models.attention", "_CUDNN_MAX_HEAD", 256),
        "items": ("unet_b2", "unet_b16"),
        "need_s": 80.0,
    },
    # CUDA graphs for the convolutions and loops too: XLA's default command buffers
    # (fusions, cuBLAS, cuDNN graphs, custom calls) leave every cuDNN convolution a
    # separate launch. Session 8: UNet b2 10.1 -> 9.8 ms, b16 unchanged. Session 9 (with
    # compiler-chosen parameter layouts, then the default): cuDNN failed to record a
    # convolution into the graph (status 5003). Now the sampler, whose 50-step loop
    # could run as one graph (WHILE).
    "command_buffers": {
        "xla_flags": "--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE,+CONDITIONAL",
        "items": ("t2i",),
        "need_s": 60.0,
    },
    # The pipeline's own default, a progress bar ticked from each sampling step
    # (jax.debug.callback in the loop): what it costs users on a GPU, where a host
    # callback may hold the stream. CPU, session 14 (20 steps, interleaved, 10 calls
    # each): 2042 vs 2085 ms median, 1715 vs 1723 ms min: within the noise.
    "t2i_progress": {
        "options": {"progress": True},
        "items": ("t2i",),
        "need_s": 50.0,
        "default": False,
    },
    # Let XLA use Triton for every matmul, so the GEGLU product and the norms can
    # fuse into the matmuls that read them (2.3 + 3.2 ms of elementwise kernels in the
    # batch-16 UNet on the H200); the risk is slower matmuls than cuBLAS's.
    "triton_gemm_any": {"xla_flags": "--xla_gpu_triton_gemm_any=true", "items": ("unet_b16",)},
    # XLA's experimental fusion of elementwise producers into cuDNN convolutions (the
    # GroupNorm-apply + SiLU that feed each 3x3 conv: ~2.4 ms of the batch-16 UNet).
    "conv_fusion": {
        "xla_flags": "--xla_gpu_experimental_enable_conv_fusion=true",
        "items": ("unet_b16",),
    },
    # The sub-pixel form of nearest x2 upsampling + 3x3 conv for every upsampler,
    # the UNet's too (the GPU default takes it from 64x64 inputs: the VAE's, measured
    # 42.2 -> 39.5 ms in session 8). The UNet's three upsamplers are ~8 % of its FLOPs
    # and would do 4/9 of that.
    "subpixel_upsample": {
        "patch": ("jaxdiff.models.layers", "_SUBPIXEL_UPSAMPLE", True),
        "items": ("unet_b16",),
    },
    # The train step with its state (fp32 params, AdamW moments) in layouts XLA picks
    # (jaxdiff.layouts), in and out: the session-8 profile had ~7 ms per step of
    # transposes. Session 9: 124.9 ms (n=1) against 104.1 ms, another process.
    "train_layouts": {
        "options": {"train_layouts": True},
        "items": ("train_step",),
        "need_s": 150.0,
        "default": False,
    },
    # train_layouts plus CUDA graphs for the step's ~1200 small kernels (per-leaf
    # norms and updates). Session 9: cut at its deadline before its first step.
    "train_layouts_command_buffers": {
        "options": {"train_layouts": True},
        "xla_flags": "--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE,+CONDITIONAL",
        "items": ("train_step",),
        "need_s": 150.0,
        "default": False,
    },
    # One read of x for both GroupNorm sums instead of two. Session 8: UNet b16
    # unchanged (36.6 vs 36.5 ms), VAE 40.3 vs 42.2 ms from a single timed call.
    "groupnorm_one_pass": {
        "patch": ("jaxdiff.models.layers", "_ONE_PASS_GROUPNORM", True),
        "items": ("vae_decode",),
        "default": False,
    },
    # GroupNorm's two-pass sums each in two steps, the last spatial axis first
    # (switch layers._GROUPNORM_STAGED_SUMS). Session 11's batch-16 trace: each pass
    # is one column reduction, [16, 4096, 320] -> [16, 32, 10] in 31 µs (~1.4 TB/s,
    # too few outputs to fill the GPU; the VAE's 512² ones run at ~4.3 TB/s), 1.9 ms
    # of each call in all. Predicted: -0.5 to -1 ms per batch-16 call (the sampler
    # needs -1 ms per step for 1.6 s); the VAE's large ones about unchanged.
    "groupnorm_staged_sums": {
        "patch": ("jaxdiff.models.layers", "_GROUPNORM_STAGED_SUMS", True),
        "items": ("unet_b16", "vae_decode"),
        "need_s": 80.0,
    },
    # cuDNN's flash attention also for heads of 160 (switch
    # attention._CUDNN_MAX_HEAD, 128 -> 256: what cuDNN and jax's check allow on
    # Hopper). SD 1.5's 1280-channel blocks (6 transformer blocks, 12 attentions per
    # call) now run XLA's einsum attention. gpu_hlo.py (deviceless, H200 target, batch
    # 16): 953 -> 893 kernels per call, 1.2 GB less traffic (~0.26 ms at 4.8 TB/s), 32
    # cuDNN attentions instead of 20. Predicted: -0.3 to -0.5 ms per batch-16 call and
    # per sampler step (~-20 ms per 50-step call).
    "cudnn_head_256": {
        "patch": ("jaxdiff.models.attention", "_CUDNN_MAX_HEAD", 256),
        "items": ("unet_b2", "unet_b16", "t2i"),
        "need_s": 80.0,
    },
    # GEGLU's projection and gate as one Pallas (Triton) kernel that writes only the
    # gated product (attention._GEGLU_FUSED, jaxdiff.models.geglu_kernel), instead of a
    # cuBLAS GEMM writing both halves and XLA's product kernel reading them back: the
    # product kernels took 1.27 ms of each batch-16 UNet call in session 11's profile
    # (16 per call, 0.92 ms of traffic per sampler step deviceless). The question is
    # whether Triton's GEMM with this epilogue (128 x 128 x 64 tiles per half, 8 warps,
    # 3 stages, untuned) keeps up with cuBLAS. Predicted per batch-16 call and per step:
    # ~-1.1 ms if it runs as fast as cuBLAS, ~-0.2 ms at 75 % of its speed (NOTES,
    # session 17).
    "geglu_fused": {
        "patch": ("jaxdiff.models.attention", "_GEGLU_FUSED", True),
        "items": ("unet_b16", "t2i"),
        "need_s": 80.0,
    },
    # GroupNorm's statistics from one Pallas kernel that reads each [256 rows, 64
    # channels] tile once and writes its per-channel mean and M2, combined per group
    # exactly (layers._GROUPNORM_PALLAS, jaxdiff.models.groupnorm_kernel), instead of
    # XLA's two column reductions over the whole input (~1.4 TB/s on the H200; 1.94 ms
    # of norm reductions per batch-16 UNet call in session 11's profile).
    "groupnorm_pallas": {
        "patch": ("jaxdiff.models.layers", "_GROUPNORM_PALLAS", True),
        "items": ("unet_b16", "vae_decode", "t2i"),
        "need_s": 80.0,
    },
    # The 1x1 convolutions as dots, cuBLAS GEMMs instead of cuDNN convolutions
    # (layers._GPU_1X1_DOT): SD 1.5's UNet has 46 (proj_in, proj_out, conv_shortcut).
    # XLA transposes each of their kernels at every UNet call for cuDNN (a dot reads
    # them as they are; the sampler's loop has them transposed once, outside), and each
    # cuDNN convolution launches outside XLA's CUDA graphs. Deviceless (H200): UNet b2
    # 934 -> 900 kernels per call, b16 915 -> 882 (+0.07 ms of traffic: the up-blocks'
    # 12 input/skip concatenations become kernels of their own); the sampler's loop
    # 752 -> 764 kernels per step, so not for the sampler. For the batch-2 call goal,
    # where each kernel costs ~11 us of a call: predicted -0.2 to -0.4 ms per call.
    # Since change 38 (kernels in cuDNN's order, no transposes) only the concatenations
    # are left of its effect: deviceless b2 759 -> 771 kernels, b16 764 -> 782.
    "conv1x1_dot": {
        "patch": ("jaxdiff.models.layers", "_GPU_1X1_DOT", True),
        "items": ("unet_b2", "unet_b16"),
        "need_s": 70.0,
    },
    # The UNet items with the plain params, as before change 37: XLA joins the
    # self-attentions' q/k/v kernels, the cross-attentions' k/v kernels and the 22
    # resnets' time-embedding kernels in every call (18 concatenations, the largest
    # 52 MB), slices the merged products apart, and the call passes 686 parameter
    # arrays instead of 581. Deviceless (H200), this -> the default: UNet b2 934 -> 857
    # kernels per call, 1.20 -> 1.13 ms of non-library traffic (714 -> 635 kernels with
    # session 19's every candidate); b16 915 -> 862 kernels, 3.68 -> 3.62 ms. Predicted for the
    # default: b2 -0.4 to -0.7 ms per call (kernels, traffic and host time), b16 -0.2
    # to -0.4 ms.
    "unet_unfused": _unet_option(fused_projections=False),
    # The UNet items with the convolution kernels in Flax's [H, W, I, O], as before
    # change 38: XLA transposes each of the 98 into cuDNN's [O, H, W, I] in every call.
    # Kept as [O, H, W, I] (unet.ohwi_kernels) and turned back inside the program, the
    # transpose is a relabelling. Deviceless (H200), this -> the default: UNet b2 857 ->
    # 759 kernels per call, b16 862 -> 764, 0.49 ms less traffic per call each (what
    # param_layouts does, with a plain jit). Predicted: b16 -0.6 to -1.1 ms per call
    # (session 11's profile: the transposes took 1.09 ms), b2 -0.3 to -0.6 ms.
    "unet_hwio_kernels": _unet_option(ohwi_kernels=False),
    # Every candidate at once, for when each has paid alone (run when named): the
    # sampler with cuDNN attention for heads of 160, no Triton GEMMs and both Pallas
    # kernels, and the UNet with those kernels and the heads (their patches: those of
    # the experiments they join, below). The UNet's kernel transposes are gone from the
    # default since change 38, so its chosen layouts and the 1x1 convolutions as dots
    # are no longer candidates (deviceless, the dots now add 12-18 kernels per call).
    "t2i_all_candidates": {
        "items": ("t2i",),
        "need_s": 60.0,
        "default": False,
    },
    "unet_all_candidates": {
        "items": ("unet_b2", "unet_b16"),
        "need_s": 80.0,
        "default": False,
    },
    # The sampler as before change 28: every step recomputes the cross-attentions' keys
    # and values of the (fixed) text context. XLA left them in the loop: one merged GEMM
    # [1232, 768] x [768, 24960] per step, a copy of its concatenated weights and 44
    # slices, transposes and pads after it. gpu_hlo.py (deviceless, H200): 848 kernels
    # per loop step with this, 814 with the default. Predicted: the default is ~0.2 ms
    # per step (~10 ms per 50-step call) faster than this.
    "no_cross_kv": {
        "patch": ("jaxdiff.pipeline", "_PRECOMPUTE_CROSS_KV", False),
        "items": ("t2i",),
        "need_s": 60.0,
        "default": False,  # session14_forms runs both
    },
    # Before change 30: XLA's dot merger joined the self-attentions' q/k/v weights and
    # the 22 resnets' time-embedding projections in every step (13 concatenations in
    # the loop, the largest [1280, 20160], plus 15 bias adds), and the GroupNorms'
    # bf16 params were converted to fp32 in every step (16 kernels). The pipeline now
    # joins the weights once per call and keeps the norms' params in fp32
    # (pipeline._MERGE_WEIGHTS, _FP32_NORM_PARAMS). gpu_hlo.py (deviceless, H200):
    # 814 -> 752 kernels per loop step, 41 -> 12 loop-invariant, non-library traffic
    # 3.30 -> 3.21 ms per step; the fp32 norm params alone: batch-16 UNet 936 -> 915
    # kernels per call, VAE decode 357 -> 337 (the UNet and VAE items take the
    # pipeline's dtypes). Predicted: the default -0.1 to -0.15 ms per step (-5 to -8 ms
    # per 50-step call), a few hundredths of a ms per UNet or VAE call.
    "invariants_in_loop": {
        "patches": (
            ("jaxdiff.pipeline", "_MERGE_WEIGHTS", False),
            ("jaxdiff.pipeline", "_FP32_NORM_PARAMS", False),
        ),
        "items": ("unet_b16", "vae_decode", "t2i"),
        "need_s": 70.0,
        "default": False,  # session14_forms runs it
    },
    # Before change 29: the resnets' time-embedding add folded into conv1's cuDNN call
    # as a side input, the broadcast embedding written out at full size first.
    # gpu_hlo.py (H200, batch 16): 936 -> 953 kernels per UNet call, 814 -> 831 per
    # sampler step, ~0.15 ms more traffic each. Predicted: the default -0.15 to -0.2 ms
    # per call and per step. (The train step keeps this form: temb_in_norm=False.)
    "temb_side_input": {
        "patch": ("jaxdiff.models.layers", "_TEMB_IN_NORM", False),
        "items": ("unet_b16", "t2i"),
        "need_s": 80.0,
        "default": False,  # session14_forms runs both
    },
    # The sampler and the UNet as session 14 compiled them (changes 28 to 30
    # undone): their joint A/B in one experiment's time. Its patches are those of
    # no_cross_kv, temb_side_input and invariants_in_loop (set after variant_patches).
    "session14_forms": {
        "items": ("unet_b16", "t2i"),
        "need_s": 80.0,
    },
    # t2i_param_layouts and groupnorm_staged_sums on the sampler, in one process: what
    # they give the 1.6 s goal together (run when named, after each has been measured
    # alone).
    "t2i_layouts_staged_sums": {
        "patch": ("jaxdiff.models.layers", "_GROUPNORM_STAGED_SUMS", True),
        "options": {"param_layouts": True},
        "items": ("t2i",),
        "need_s": 70.0,
        "default": False,
    },
    # No merging of the to_q/to_k/to_v matmuls that share an input. Session 8: 36.4 vs
    # 36.5 ms.
    "no_dot_merger": {
        "xla_flags": "--xla_gpu_dot_merger_threshold_mb=0",
        "items": ("unet_b16",),
        "default": False,
    },
    # cuDNN's GEMM fusions (elementwise work fused into cuDNN matmuls on Hopper). Not
    # measured yet.
    "cudnn_gemm_fusion": {
        "xla_flags": "--xla_gpu_cudnn_gemm_fusion_level=2",
        "items": ("unet_b16",),
        "default": False,
    },
    # Autotuning without its checks (XLA's default level 4 re-initialises buffers and
    # compares every candidate with the reference). Session 8: UNet b16 compile 22.8 vs
    # 23.1 s, runtime unchanged.
    "autotune_1": {
        "xla_flags": "--xla_gpu_autotune_level=1",
        "items": ("unet_b16",),
        "default": False,
    },
    # No autotuning: how much of the compile is autotuning, at what runtime cost.
    "autotune_0": {
        "xla_flags": "--xla_gpu_autotune_level=0",
        "items": ("unet_b16",),
        "default": False,
    },
}
VARIANT_NEED_S = 45.0
# The run's shared XLA cache directory, for the jaxdiff workers (see run()).
ENV_XLA_CACHE = "JAXDIFF_BENCH_XLA_CACHE"
# Items in priority order per contender; names are shared so the table lines up.
ITEMS = {
    "jaxdiff": (
        "matmul",
        "unet_b2",
        "unet_b16",
        "vae_decode",
        "train_step",
        "t2i",
        "unet_b16_xla",  # only when named (--items): session 8 measured it, 67.5 ms
    ),
    "torch": (
        "matmul",
        "unet_b2",
        "unet_b16",
        "vae_decode",
        "train_step",
        "t2i",
        "unet_b2_bf16",
        "unet_b16_bf16",
    ),
    "flax039": ("unet_b2", "unet_b16", "vae_decode", "train_step", "t2i"),
    "torch_compile": ("unet_b16", "unet_b2"),
}
# Items also timed back to back (``_Runner.pipelined``), every contender alike: the
# per-call times include each call's host work before its first kernel, which a loop
# that does not wait for each result overlaps with the previous call's kernels.
PIPELINED = ("unet_b2", "unet_b16", "vae_decode", "train_step")
ROW_ORDER = (
    "matmul",
    "unet_b2",
    "unet_b16",
    "unet_b16_xla",
    "unet_b2_bf16",
    "unet_b16_bf16",
    "vae_decode",
    "train_step",
    "t2i",
)
PROMPTS = [
    "a photo of a cat",
    "a watercolour painting of a lighthouse at dusk",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit on a wooden table",
]
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
GUIDANCE = 7.5
LR = 1e-5

_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)
_SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
_SD15_CLIP = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": _SD15_UNET,
        "vae": _SD15_VAE,
        "clip": _SD15_CLIP,
        "batches": {"unet_b2": 2, "unet_b16": 16, "vae_decode": 8, "train_step": 8, "t2i": 8},
        "steps": 50,
        "matmul": 8192,
        "repeats": {
            "matmul": 10,
            "unet_b2": 20,
            "unet_b16": 10,
            "vae_decode": 5,
            "train_step": 5,
            "t2i": 2,
        },
    },
    # Same code paths at toy sizes, for a CPU smoke run (--tiny).
    "tiny": {
        "unet": dict(
            _SD15_UNET,
            sample_size=8,
            block_out_channels=(32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2,
            cross_attention_dim=32,
        ),
        "vae": dict(
            _SD15_VAE,
            block_out_channels=(32, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            sample_size=16,
        ),
        "clip": dict(
            _SD15_CLIP,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        "batches": {"unet_b2": 2, "unet_b16": 4, "vae_decode": 2, "train_step": 2, "t2i": 2},
        "steps": 3,
        "matmul": 256,
        "repeats": {k: 2 for k in ("matmul", "unet_b2", "unet_b16", "vae_decode", "train_step")}
        | {"t2i": 1},
    },
}


# ---------------------------------------------------------------- shared pieces


def _base(item: str) -> str:
    """The shapes' item of a variant: "unet_b16_xla" and "unet_b16" share inputs and repeats."""
    return item.replace("_bf16", "").replace("_xla", "")


def _spec(cfg: dict, item: str) -> tuple[int, int]:
    """(batch, latent side) of an item."""
    return cfg["batches"].get(_base(item), 0), cfg["unet"]["sample_size"]


def _inputs(cfg: dict, item: str, seed: int = 0) -> dict[str, np.ndarray]:
    """NCHW numpy inputs of an item; every contender transposes to its own layout."""
    rng = np.random.default_rng(seed)
    b, s = _spec(cfg, item)
    d = cfg["unet"]["cross_attention_dim"]
    base = _base(item)
    if base.startswith("unet"):
        return {
            "x": rng.standard_normal((b, 4, s, s), np.float32),
            "t": np.linspace(1, 981, b).astype(np.int32),
            "ctx": rng.standard_normal((b, 77, d), np.float32),
        }
    if base == "vae_decode":
        return {"z": rng.standard_normal((b, 4, s, s), np.float32)}
    if base == "train_step":
        return {
            "latents": rng.standard_normal((b, 4, s, s), np.float32),
            "ids": rng.integers(0, 500, (b, 77)).astype(np.int32),
        }
    if base == "t2i":
        return {"noise": rng.standard_normal((b, 4, s, s), np.float32)}
    return {}


def _prompts(cfg: dict) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(cfg["batches"]["t2i"])]


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def random_params(abstract: Any, seed: int = 0) -> Any:
    """Random values for a params tree of ShapeDtypeStructs, shaped like a trained net's.

    Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.02^2), biases and embeddings
    ~ N(0, 0.02^2): activations keep their scale through a deep net (no under- or
    overflow in bf16), and no array is all zeros (which can time faster than data).
    Each leaf is a random window of one pool of 2^24 normal draws, made on the
    host: drawing SD 1.5's billion values one by one takes half a minute, and a
    jitted per-leaf draw compiles for minutes.
    """
    import jax
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 24, dtype=np.float32)
    out = {}
    for path, s in traverse_util.flatten_dict(dict(abstract)).items():
        size = int(np.prod(s.shape))
        if size <= pool.size:
            start = int(rng.integers(0, pool.size - size + 1))
            n = pool[start : start + size].reshape(s.shape).copy()
        else:
            n = np.resize(pool, s.shape)
        name = path[-1]
        if name == "kernel":
            n *= np.float32(1.0 / np.sqrt(max(int(np.prod(s.shape[:-1])), 1)))
        elif name == "scale":
            n = 1.0 + np.float32(0.02) * n
        else:
            n *= np.float32(0.02)
        out[path] = jax.device_put(n.astype(s.dtype))
    return traverse_util.unflatten_dict(out)


def sd_config(cfg: dict, vocab_size: int, bos: int, eos: int):
    """jaxdiff's ``SDConfig`` for a benchmark config (the same diffusers dicts the peers use)."""
    from jaxdiff.models.autoencoder import AutoencoderConfig
    from jaxdiff.models.clip import CLIPTextConfig
    from jaxdiff.models.sd import SDConfig
    from jaxdiff.models.unet import UNetConfig
    from jaxdiff.schedules import SchedulerConfig

    return SDConfig(
        unet=UNetConfig.from_diffusers(cfg["unet"]),
        vae=AutoencoderConfig.from_diffusers(cfg["vae"]),
        text_encoder=CLIPTextConfig(
            **cfg["clip"],
            vocab_size=vocab_size,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        scheduler=SchedulerConfig.from_dict(SCHEDULER),
    )


def train_setup(unet_params: Any, compute_dtype: Any, fsdp_min_size: int = 0):
    """(optimizer, StepConfig) of the benchmark's train step: the UNet trains with
    global-norm clipping and AdamW (diffusers' train_text_to_image settings), no EMA.
    ``fsdp_min_size``: the one the state is sharded with (the tests; one device here)."""
    import optax

    from jaxdiff.train import optim
    from jaxdiff.train.step import StepConfig

    tx = optim.make_optimizer(
        optim.trainable_labels({"unet": unet_params}, ("unet",)),
        optax.constant_schedule(LR),
        weight_decay=1e-2,
        clip_norm=1.0,
        **({"fsdp_min_size": fsdp_min_size} if fsdp_min_size else {}),
    )
    return tx, StepConfig(trainable=("unet",), compute_dtype=compute_dtype, ema_decay=None)


class _Runner:
    """Times the items of one contender under a deadline and saves after each item."""

    def __init__(self, name: str, cfg: dict, deadline: float, result_path: Path, sync):
        self.name, self.cfg, self.deadline, self.path, self.sync = (
            name,
            cfg,
            deadline,
            result_path,
            sync,
        )
        self.selected: set[str] = set()
        self.options: dict[str, Any] = {}  # a variant's "options"
        self.result: dict[str, Any] = {"contender": name, "items": {}, "info": {}}
        self.t0 = time.time()
        self._compile_events: list[tuple[str, float]] | None = None
        self.save()

    def watch_compiles(self) -> None:
        """From now on, record jax's compile phases during each item's first call
        (``compile_phases``: tracing, lowering to StableHLO, XLA's compile, from
        ``jax.monitoring``), to see where a compile's seconds go."""
        from jax import monitoring

        self._compile_events = []
        events = self._compile_events
        monitoring.register_event_duration_secs_listener(
            lambda name, secs, **_: events.append((name, float(secs)))
        )

    def mark(self, stage: str) -> None:
        """Note the worker's elapsed seconds at the end of ``stage`` (info["timeline"]
        and the log): where a worker's share of the device call went, for planning
        the next call's budget."""
        elapsed = round(time.time() - self.t0, 1)
        self.result["info"].setdefault("timeline", []).append([stage, elapsed])
        print(f"[{self.name}] +{elapsed:.0f} s: {stage}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.path)

    def wants(self, item: str) -> bool:
        """Whether ``item`` should run: selected, and the deadline not passed."""
        return (not self.selected or item in self.selected) and time.time() < self.deadline

    def skip_reason(self, item: str) -> str:
        return "not selected" if self.selected and item not in self.selected else "over budget"

    def skip(self, item: str, why: str) -> None:
        self.result["items"][item] = {"skipped": why}
        self.save()

    def add(self, item: str, **fields) -> None:
        """Attach computed fields (callables, run now) to an item that was measured."""
        entry = self.result["items"].get(item, {})
        if "median_s" not in entry:
            return
        for key, make in fields.items():
            try:
                entry[key] = make()
            except Exception as e:  # a nice-to-have: never lose the timing over it
                entry[key + "_error"] = f"{type(e).__name__}: {e}"[:500]
        self.mark(f"{item}: {', '.join(fields)}")

    def _compile_trace_dir(self, item: str) -> Path | None:
        """Where to trace ``item``'s first call (the "trace_compile" option: a list of
        items), or None."""
        if item not in self.options.get("trace_compile", ()):
            return None
        return self.path.parent / f"compile_trace_{self.name}_{item}".replace("+", "-")

    def pipelined(self, fn, calls: int) -> float:
        """Seconds per call of ``calls`` calls issued back to back with one
        synchronisation at the end: what a loop that does not wait for each result
        (a training loop, a batch job) sees, the host's per-call work overlapping
        the device's. The timed calls (``run``) wait for each result instead."""
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn()
        self.sync(out)
        return (time.perf_counter() - t0) / calls

    def run(self, item: str, fn, extra: dict | None = None) -> None:
        """First call (compile + run), then repeats until done or out of time; then,
        for the items in PIPELINED, the same number of calls back to back."""
        if not self.wants(item):
            self.skip(item, self.skip_reason(item))
            return
        print(f"[{self.name}] {item} ...", file=sys.stderr, flush=True)
        if self._compile_events is not None:
            self._compile_events.clear()
        traced = self._compile_trace_dir(item)
        if traced is not None:
            import jax

            opts = jax.profiler.ProfileOptions()
            opts.python_tracer_level = 0  # XLA's own annotations, not Python frames
            try:
                jax.profiler.start_trace(str(traced), profiler_options=opts)
            except Exception as e:  # the timing matters more than the trace
                self.result["info"]["compile_trace_error"] = f"{type(e).__name__}: {e}"[:500]
                traced = None
        try:
            try:
                first, _ = common.timed(fn, self.sync)
            finally:
                if traced is not None:
                    jax.profiler.stop_trace()
            phases = compile_phases(self._compile_events or [])
            times = []
            for _ in range(self.cfg["repeats"].get(_base(item), 3)):
                if time.time() > self.deadline and times:
                    break
                times.append(common.timed(fn, self.sync)[0])
        except Exception as e:  # record and go on with the next item
            self.result["items"][item] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            self.save()
            print(f"[{self.name}] {item} failed: {e}", file=sys.stderr, flush=True)
            return
        s = common.summarize(times)
        s["first_call_s"] = first
        s["compile_s"] = max(first - s["median_s"], 0.0)
        if phases["programs"]:
            s["compile_phases"] = phases
        if traced is not None:
            try:
                summary = compile_trace_summary(traced)
                self.result["info"].setdefault("compile_trace", {})[item] = summary
            except Exception as e:  # the timing stands without it
                s["compile_trace_error"] = f"{type(e).__name__}: {e}"[:500]
            finally:  # never returned from the device as files
                shutil.rmtree(traced, ignore_errors=True)
        if _base(item) in PIPELINED and time.time() < self.deadline:
            try:
                s["pipelined_s"] = self.pipelined(fn, max(len(times), 3))
            except Exception as e:  # the synchronous timings stand without it
                s["pipelined_error"] = f"{type(e).__name__}: {e}"[:500]
        if extra:
            s.update(extra)
        self.result["items"][item] = s
        self.mark(item)
        print(
            f"[{self.name}] {item}: {common.fmt_s(s['median_s'])} "
            f"(first {common.fmt_s(first)}, n={s['n']})",
            file=sys.stderr,
            flush=True,
        )


# ---------------------------------------------------------------- contenders


def _worker_jaxdiff(cfg: dict, runner: _Runner, work: Path) -> None:
    import jax
    import jax.numpy as jnp
    from transformers import CLIPTokenizer

    from jaxdiff import layouts
    from jaxdiff.flops import count_flops
    from jaxdiff.models.attention import ENV_ATTENTION
    from jaxdiff.models.autoencoder import vae_decode
    from jaxdiff.models.sd import abstract_params, apply_unet
    from jaxdiff.models.unet import UNet2DConditionModel, fuse_projections, ohwi_kernels
    from jaxdiff.pipeline import StableDiffusion, inference_param_dtype
    from jaxdiff.tokenizer import save_clip_tokenizer
    from jaxdiff.train import step as train_step_module
    from jaxdiff.train.step import init_state, jit_train_step, make_train_step, split_frozen

    info = runner.result["info"]
    info.update(jax=jax.__version__, devices=[str(d) for d in jax.devices()])
    runner.watch_compiles()
    tok_dir = save_clip_tokenizer(work / "tokenizer", PROMPTS * 3, num_merges=200)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    config = sd_config(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    t0 = time.perf_counter()
    params32 = random_params(abstract_params(config))
    # bf16, the norms' params fp32: what the pipeline keeps for inference.
    params16 = jax.tree_util.tree_map_with_path(
        lambda path, a: a.astype(inference_param_dtype(path, jnp.bfloat16)), params32
    )
    jax.block_until_ready(params16)
    info["init_s"] = time.perf_counter() - t0
    runner.mark("random parameters")
    bf16 = jnp.bfloat16

    # The ceiling: one big bf16 matmul, as the floor column of DESIGN.md uses.
    n = cfg["matmul"]
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (n, n), bf16)
    b = jax.random.normal(kb, (n, n), bf16)
    mm = jax.jit(jnp.dot)
    runner.run("matmul", lambda: mm(a, b), {"flop": 2.0 * n**3})
    mm_item = runner.result["items"].get("matmul", {})
    if "median_s" in mm_item:
        info["ceiling_flops_per_s"] = 2.0 * n**3 / mm_item["median_s"]

    info["attention"] = os.environ.get(ENV_ATTENTION, "auto")

    # The UNet's weights as a program calling it many times keeps them: the projections
    # XLA would join in every call joined once (fuse_projections, change 37) and the
    # convolution kernels in cuDNN's order (ohwi_kernels, change 38), unless the
    # "fused_projections" / "ohwi_kernels" options say otherwise (the experiments
    # unet_unfused and unet_hwio_kernels).
    fused = runner.options.get("fused_projections", True)
    ohwi = runner.options.get("ohwi_kernels", True)
    if fused:
        unet_weights = jax.jit(fuse_projections, static_argnums=1)(params16["unet"], config.unet)
    else:
        unet_weights = (params16["unet"], None)
    if ohwi:
        unet_weights = (jax.jit(ohwi_kernels)(unet_weights[0]), unet_weights[1])
    info["unet_weights"] = ", ".join(
        ["fused projections" if fused else "plain", "OHWI kernels" if ohwi else "HWIO kernels"]
    )

    def unet_apply(w, x, t, ctx):
        p, merged = w
        return apply_unet(p, x, t, ctx, config, bf16, merged=merged, ohwi_kernels=ohwi)

    # The attention kernel is picked (from JAXDIFF_ATTENTION) when this is traced.
    unet_fn = jax.jit(unet_apply)
    # With the "param_layouts" option (the experiment of that name; the default where
    # the library makes it one, layouts.AUTO_BACKENDS), the UNet runs as the pipeline's
    # param_layouts=True does: parameters in the layouts XLA picks, one copy for both
    # batches; otherwise plain jax.jit.
    use_layouts = runner.options.get(
        "param_layouts", jax.default_backend() in layouts.AUTO_BACKENDS
    )
    info["param_layouts"] = "chosen" if use_layouts else "default"
    unet_layouts = layouts.LayoutCache(0, lambda e: info.update(param_layouts_error=e[:1000]))
    held = {"unet": unet_weights}

    def unet_call(x, t, ctx):
        if use_layouts:  # (None once compiling with chosen layouts has failed)
            done = unet_layouts.call(x.shape, unet_apply, (held["unet"], x, t, ctx))
            if done is not None:
                out, (held["unet"], *_) = done
                return out
        return unet_fn(unet_weights, x, t, ctx)

    def unet_compiled(x, t, ctx):
        # After the timed calls, so the first call's time still includes the compile
        # (lower().compile() shares the jit's executable cache).
        laid = unet_layouts.executable(x.shape) if use_layouts else None
        return laid or unet_fn.lower(unet_weights, x, t, ctx).compile()

    def model_flops(fn, *args) -> float:
        """Matmul/conv FLOPs of ``fn(*args)`` from its jaxpr, attention traced as XLA's
        two matmuls (cuDNN's fused kernel is opaque there, and XLA's own cost analysis
        counts neither it nor cuDNN's convolutions)."""
        saved = os.environ.get(ENV_ATTENTION)
        os.environ[ENV_ATTENTION] = "xla"
        try:
            return count_flops(fn, *args)["total"]
        finally:
            if saved is None:
                os.environ.pop(ENV_ATTENTION)
            else:
                os.environ[ENV_ATTENTION] = saved

    # Variants keep summaries only (a device call returns at most 8 files), unless
    # their options ask for the optimized HLO ("profile_files"): then that alone, under
    # the variant's name.
    main = runner.name == "jaxdiff"
    hlo_only = not main and bool(runner.options.get("profile_files"))
    stem = runner.name.replace("+", "-")  # (returned file names: letters, digits, . _ -)

    def profile(item: str, call, calls: int, hlo=None, files: bool = False) -> None:
        """Where ``item``'s time goes: a trace of ``calls`` runs of ``call`` (compiled
        already), summed per kernel and per kind (``hlo()``: the executable's optimized
        HLO text, which names the fusions) into info["profile"][item]; with ``files``
        the trace and the HLO (main contender; a "profile_files" variant: the HLO) are
        copied next to the results."""
        if "median_s" not in runner.result["items"].get(item, {}) or not runner.wants(item):
            return
        try:
            trace_dir = work / f"trace_{runner.name}_{item}"
            jax.block_until_ready(call())
            jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
            for _ in range(calls):
                jax.block_until_ready(call())
            jax.profiler.stop_trace()
            keep = runner.path.parent / f"{stem}_{item}.trace.json.gz" if files and main else None
            text = hlo() if hlo is not None else None
            summary = profile_summary(trace_dir, keep, hlo_text=text, calls=calls)
            if summary.get("span_ms"):  # wall time beyond the device's: host time
                wall_ms = runner.result["items"][item]["median_s"] * 1e3
                summary["host_ms"] = round(wall_ms - float(np.median(summary["span_ms"])), 3)
            info.setdefault("profile", {})[item] = dict(summary, calls=calls)
            if files and (main or hlo_only) and text:
                hlo_file = runner.path.parent / f"{stem}_{item}.hlo.txt.gz"
                hlo_file.write_bytes(gzip.compress(text.encode()))
        except Exception as e:  # the timings matter more than the profile
            info.setdefault("profile_errors", {})[item] = f"{type(e).__name__}: {e}"[:500]
        runner.mark(f"profile {item}")

    def fall_back(item: str) -> bool:
        """After ``item`` failed with the default attention: switch to XLA's, once.

        cuDNN's fused attention is new here (no GPU had run it before this script):
        if it fails, the remaining timings still come, on XLA's attention, and the
        report says so. True when the caller should rebuild and rerun ``item``.
        """
        error = runner.result["items"].get(item, {}).get("error", "")
        if not error or info["attention"] != "auto" or jax.default_backend() != "gpu":
            return False
        info["attention"] = f"xla (auto failed at {item})"
        info["auto_attention_error"] = error
        os.environ[ENV_ATTENTION] = "xla"
        jax.clear_caches()  # every jitted function (the UNet's, the sampler's) retraces
        return True

    unet_inputs = {}
    for item in ("unet_b2", "unet_b16"):
        inp = _inputs(cfg, item)
        x, t, ctx = jnp.asarray(_nhwc(inp["x"])), jnp.asarray(inp["t"]), jnp.asarray(inp["ctx"])
        unet_inputs[item] = args = (x, t, ctx)
        runner.run(item, functools.partial(unet_call, *args))
        if fall_back(item):
            runner.run(item, functools.partial(unet_call, *args))
        runner.add(
            item,
            flop=lambda args=args: model_flops(unet_apply, unet_weights, *args),
            cudnn_attention_calls=lambda args=args: (
                unet_compiled(*args).as_text().count("__cudnn$fmha")
            ),
        )

    if unet_layouts.formats is not None:
        info["param_layouts_moved"] = moved_layouts(unet_layouts.formats)
    # Host time per call by argument count, with no kernels to speak of: the UNet's
    # parameters passed to an executable that reads one input (jax's side only: unused
    # arguments are pruned) and one that takes them all (jax's and PJRT's).
    x = unet_inputs["unet_b2"][0]
    info.setdefault("dispatch_ms", {}).update(
        unet_params_pruned=dispatch_ms(lambda p, x: x + 1, params16["unet"], x)[0],
        unet_params_kept=dispatch_ms(lambda p, x: x + 1, params16["unet"], x, keep=True)[0],
        # What the UNet items pass (fused projections: 105 arrays fewer at SD 1.5).
        unet_weights_kept=dispatch_ms(lambda w, x: x + 1, unet_weights, x, keep=True)[0],
        no_params=dispatch_ms(lambda x: x + 1, x)[0],
    )
    runner.mark("dispatch_ms unet_params")
    # Batch 2: how much of a call is host time (its wall time minus the device span).
    x, t, ctx = unet_inputs["unet_b2"]
    profile("unet_b2", functools.partial(unet_call, x, t, ctx), 5)
    x, t, ctx = unet_inputs["unet_b16"]
    profile(
        "unet_b16",
        functools.partial(unet_call, x, t, ctx),
        3,
        hlo=lambda: unet_compiled(x, t, ctx).as_text(),
        files=True,
    )

    def vae_apply(p, z):
        return vae_decode(p, z, config.vae, bf16)

    dec = jax.jit(vae_apply)
    z = jnp.asarray(_nhwc(_inputs(cfg, "vae_decode")["z"]))
    runner.run("vae_decode", lambda: dec(params16["vae"], z))
    runner.add("vae_decode", flop=lambda: model_flops(vae_apply, params16["vae"], z))
    profile(
        "vae_decode",
        lambda: dec(params16["vae"], z),
        2,
        hlo=lambda: dec.lower(params16["vae"], z).compile().as_text(),
    )

    if runner.wants("train_step"):
        tx, step_cfg = train_setup(params32["unet"], bf16)
        # The experiment train_ohwi_kernels: the UNet's conv kernels in cuDNN's order in
        # the state (StepConfig.ohwi_kernels).
        train_params = params32
        if runner.options.get("train_ohwi_kernels"):
            step_cfg = dataclasses.replace(step_cfg, ohwi_kernels=True)
            train_params = dict(params32, unet=jax.jit(ohwi_kernels)(params32["unet"]))
        inp = _inputs(cfg, "train_step")
        batch = {
            "latents": jnp.asarray(_nhwc(inp["latents"])),
            "input_ids": jnp.asarray(inp["ids"] % config.text_encoder.vocab_size),
        }
        step_rng = jax.random.key(1)  # not state.rng: the state is donated
        train = {}

        def build_step():
            train["state"] = init_state(train_params, tx, step_cfg, jax.random.key(0))
            # As the training loop jits it: the frozen VAE and CLIP params not donated.
            train["step"] = jit_train_step(make_train_step(config, step_cfg, tx), ("unet",))
            train.pop("compiled", None)

        def compile_with_state_layouts():
            """The step with the state in layouts XLA picks, in and out (donated)."""
            state = train["state"]
            auto = layouts.auto_formats(state)
            compiled, (train["state"], *_) = layouts.compile_with_layouts(
                make_train_step(config, step_cfg, tx),
                (state, batch, step_rng),
                (0,),
                donate_argnums=(0,),
                out_shardings=(auto, None),
            )
            train["compiled"] = compiled
            info["train_layouts_moved"] = moved_layouts(compiled.input_formats[0][0])
            # The step's output state must come back in the layouts it reads.
            info["train_layouts_out_differ"] = len(
                layouts.format_differences(compiled.output_formats[0], compiled.input_formats[0][0])
            )

        def train_step():
            if runner.options.get("train_layouts") and "compiled" not in train:
                compile_with_state_layouts()
            step = train.get("compiled", train["step"])
            train["state"], metrics = step(train["state"], batch, step_rng)
            return train["state"], metrics

        build_step()
        runner.run("train_step", train_step)
        if fall_back("train_step"):
            build_step()
            runner.run("train_step", train_step)
        measured = "median_s" in runner.result["items"].get("train_step", {})
        if measured and not runner.options.get("train_layouts"):
            # The host's per-step cost of the state's arrays alone, passed as the step
            # takes them: through an executable that returns the donated ones (the
            # frozen params only read, unless train_donate_frozen).
            if train_step_module._DONATE_FROZEN:  # everything donated
                own, frozen = train["state"], {}
            else:
                own, frozen = split_frozen(train["state"], ("unet",))
            ms, own = dispatch_ms(lambda own, _: own, own, frozen, keep=True, donate=True)
            train["state"] = own.replace(params={**frozen, **own.params})
            info.setdefault("dispatch_ms", {})["train_state_donated"] = ms
            info["dispatch_ms"]["train_state_arrays"] = [
                len(jax.tree.leaves(own)),
                len(jax.tree.leaves(frozen)),
            ]
            runner.mark("dispatch_ms train_state_donated")
        runner.add(
            "train_step",
            flop=lambda: model_flops(
                make_train_step(config, step_cfg, tx), train["state"], batch, step_rng
            ),
        )
        profile(
            "train_step",
            train_step,
            2,
            hlo=lambda: (
                train["compiled"]
                if "compiled" in train
                else train["step"].lower(train["state"], batch, step_rng).compile()
            ).as_text(),
            files=True,
        )
        train.clear()
    else:
        runner.skip("train_step", runner.skip_reason("train_step"))

    if runner.wants("t2i"):
        pipe = StableDiffusion(
            config,
            params16,
            tokenizer,
            dtype=bf16,
            param_layouts=bool(use_layouts),
            compiler_options=runner.options.get("compiler_options"),
            split_programs=runner.options.get("split_programs", not use_layouts),
        )
        info["t2i_compiler_options"] = pipe.compiler_options
        info["t2i_split_programs"] = pipe.split_programs
        noise = _nhwc(_inputs(cfg, "t2i")["noise"])
        t2i = functools.partial(
            pipe.text_to_image,
            _prompts(cfg),
            steps=cfg["steps"],
            guidance_scale=GUIDANCE,
            sampler="ddim",
            latents=noise,
            progress=runner.options.get("progress", False),
        )
        runner.run("t2i", t2i)
        if fall_back("t2i"):
            runner.run("t2i", t2i)
        if pipe._layouts is not None:
            info["t2i_param_layouts"] = pipe._layouts.failed or "chosen"
        # Which images came out (compare across contenders: the layouts must not
        # change them beyond bf16 noise).
        runner.add("t2i", image_mean=lambda: float(np.asarray(t2i(), np.float64).mean()))
        # One call's kernels, by kind: what the 50 steps add up to, and whether the
        # per-call work of a UNet forward (the conv kernels' transposes) is in the loop.
        # (Not in the cold-compile experiments: their share is the compile's.)
        if not info.get("variant", {}).get("cold"):

            def t2i_hlo():
                exe = pipe.executable("text_to_image", *t2i.args, **t2i.keywords)
                if not pipe.split_programs:
                    return exe.as_text()
                # Three programs number their instructions each from scratch: the loop's
                # last, so that its names (x50 per call) win where the texts share one.
                return "\n".join(
                    exe_part.as_text() for exe_part in (exe.condition, exe.decode, exe.denoise)
                )

            profile("t2i", t2i, 1, hlo=t2i_hlo)
    else:
        runner.skip("t2i", runner.skip_reason("t2i"))

    # The same UNet with XLA's attention forced through the attention hook: what the
    # default (cuDNN's fused attention where it applies) gains over it.
    named = "unet_b16_xla" in runner.selected  # session 8 measured it: only when named
    if jax.default_backend() == "gpu" and named and runner.wants("unet_b16_xla"):

        def xla_attention(module, q, k, v):
            out = jax.nn.dot_product_attention(q, k, v, scale=module.scale, implementation="xla")
            return out.astype(q.dtype)

        model = UNet2DConditionModel(config.unet, dtype=bf16, attention_fn=xla_attention)
        fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
        x, t, ctx = unet_inputs["unet_b16"]
        runner.run("unet_b16_xla", lambda: fn(params16["unet"], x, t, ctx))
    elif not named:
        runner.skip("unet_b16_xla", "only when named (--items)")
    elif not runner.wants("unet_b16_xla"):
        runner.skip("unet_b16_xla", runner.skip_reason("unet_b16_xla"))


# jax.monitoring's duration events for one compile's phases -> compile_phases' keys.
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_s",
}

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


def compile_phases(events: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds per compile phase summed over ``events`` ((name, seconds) from
    ``jax.monitoring``), the longest single XLA compile, how many programs went
    through XLA's compile step and how many of those the persistent compilation cache
    answered (their "xla_s" is the cache read)."""
    out = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)
    xla = [secs for name, secs in events if COMPILE_EVENTS.get(name) == "xla_s"]
    for name, secs in events:
        if name in COMPILE_EVENTS:
            out[COMPILE_EVENTS[name]] += secs
    out = {k: round(v, 3) for k, v in out.items()}
    out["xla_max_s"] = round(max(xla, default=0.0), 3)
    out["programs"] = len(xla)
    out["cache_hits"] = sum(name == CACHE_HIT_EVENT for name, _ in events)
    return out


def variant_patches(spec: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """A variant's module patches: ``(module, constant, value)`` each."""
    return ([spec["patch"]] if "patch" in spec else []) + list(spec.get("patches", ()))


def _joined_patches(*names: str) -> tuple[tuple[str, str, Any], ...]:
    """The patches of the experiments ``names``, together."""
    return tuple(patch for name in names for patch in variant_patches(VARIANTS[name]))


VARIANTS["session14_forms"]["patches"] = _joined_patches(
    "no_cross_kv", "temb_side_input", "invariants_in_loop"
)
VARIANTS["t2i_all_candidates"]["patches"] = _joined_patches(
    "t2i_cold_candidate", "geglu_fused", "groupnorm_pallas"
)
VARIANTS["unet_all_candidates"]["patches"] = _joined_patches(
    "cudnn_head_256", "geglu_fused", "groupnorm_pallas"
)


def apply_patches(spec: dict[str, Any]) -> None:
    """Set a variant's module constants (before anything is traced)."""
    for module, attr, value in variant_patches(spec):
        setattr(importlib.import_module(module), attr, value)


def dispatch_ms(
    fn, *args, keep: bool = False, donate: bool = False, calls: int = 30
) -> tuple[float, Any]:
    """Median milliseconds of one call of the jitted ``fn(*args)`` until its result is
    ready (compiled first), and the first argument as it ends: with a trivial ``fn``,
    the host's per-call cost of its arguments. ``keep``: unused arguments stay in the
    executable (jax prunes them by default); ``donate``: the first argument is
    donated and ``fn`` must return it, which is passed to the next call (and
    returned: the one given is gone)."""
    import jax

    f = jax.jit(fn, keep_unused=keep, donate_argnums=(0,) if donate else ())
    args = list(args)
    times = []
    for _ in range(calls + 1):
        t0 = time.perf_counter()
        out = f(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        if donate:
            args[0] = out
    return round(float(np.median(times[1:])) * 1e3, 4), args[0]


def moved_layouts(formats: Any) -> dict[str, Any]:
    """How many of the arrays in ``formats`` XLA laid out other than row-major, and a
    few of them (path: major-to-minor order)."""
    from jax.tree_util import keystr, tree_flatten_with_path

    leaves = tree_flatten_with_path(formats)[0]
    moved = {}
    for path, f in leaves:
        order = tuple(f.layout.major_to_minor) if f.layout is not None else ()
        if order != tuple(range(len(order))):
            moved[keystr(path)] = list(order)
    return {"count": len(moved), "of": len(leaves), "examples": dict(list(moved.items())[:5])}


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name, spelled as profiler kernels are ('.' -> '_'), -> its op_name."""
    pattern = r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"'
    return {m.group(1).replace(".", "_"): m.group(2) for m in re.finditer(pattern, hlo_text, re.M)}


def kernel_kind(kernel: str, op_name: str | None) -> str:
    """A coarse bucket for a profiled kernel: library kernels by their names, XLA's
    fusions by the op that named them, the module they sit in, and forward/backward
    (``jvp(`` / ``transpose(`` in the op name, as ``jax.value_and_grad`` writes them)."""
    k = kernel.lower()
    # Pallas kernels, named by jaxdiff (attention._GEGLU_FUSED, layers._GROUPNORM_PALLAS).
    if "geglu_matmul" in k:
        return "GEGLU matmul, Pallas (library)"
    if "groupnorm_stats" in k:
        return "GroupNorm statistics, Pallas"
    if "pallas_call" in k:
        return "Pallas kernel"
    if any(s in k for s in ("sdpa", "fmha", "flash")):
        return "fused attention (library)"
    if "xmma" in k or re.search(r"conv(?!ert)", k):  # (not XLA's "loop_convert_fusion")
        return "convolution (library)"
    if any(s in k for s in ("nvjet", "gemm", "cutlass", "cublas")):
        return "matmul (library)"
    if op_name is None:
        return "unmapped"
    phase = " bwd" if "transpose(" in op_name else (" fwd" if "jvp(" in op_name else "")
    # Path components without their transformation wrappers: "transpose(jvp(UNet))"
    # -> "UNet", "jit(silu)" -> "silu".
    parts = [re.sub(r"^(?:\w+\()+|\)+$", "", c) for c in op_name.split("/")]
    # A module, or one of its methods (nn.apply(..., method=...): "AutoencoderKL.decode").
    modules = [c for c in parts if re.fullmatch(r"[A-Z]\w+(?:\.\w+)?", c)]
    where = modules[0] if modules else "outside modules"
    leaf = re.sub(r"\W.*", "", parts[-1]) or "?"
    # The submodule or function the op sits in, numbering dropped: norm1 -> norm,
    # net_0 -> net (GEGLU's projection).
    role = re.sub(r"_?\d+$", "", parts[-2]) if modules and len(parts) > 2 else ""
    return f"{where}{phase}: {role + '/' if role else ''}{leaf}"


def device_spans(events: list[dict], device: set, calls: int) -> list[float]:
    """Milliseconds from each traced call's first device kernel to its last: the
    device events split at their ``calls - 1`` widest gaps. What a call's wall time
    has beyond its span is host time (argument handling, launch, synchronisation)."""
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        for e in events
        if e.get("ph") == "X" and "ts" in e and (not device or e.get("pid") in device)
    )
    if not spans or calls < 1:
        return []
    ends = np.maximum.accumulate([b for _, b in spans])
    gaps = [(spans[i + 1][0] - ends[i], i) for i in range(len(spans) - 1)]
    cuts = sorted(i for _, i in sorted(gaps, reverse=True)[: calls - 1])
    out, start = [], 0
    for i in [*cuts, len(spans) - 1]:
        out.append((ends[i] - spans[start][0]) / 1e3)
        start = i + 1
    return [round(float(x), 3) for x in out]


def _trace_events(trace_dir: Path, copy_to: Path | None = None) -> list[dict]:
    """The events of the newest ``jax.profiler`` trace (perfetto JSON) under
    ``trace_dir``, after copying its file to ``copy_to`` if given."""
    traces = sorted(trace_dir.rglob("*.trace.json.gz"))
    if not traces:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    if copy_to is not None:
        shutil.copyfile(traces[-1], copy_to)
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))
    return events.get("traceEvents", events) if isinstance(events, dict) else events


def compile_trace_summary(trace_dir: Path, top: int = 60) -> dict:
    """Host time per event name in a trace of a first call (compile and run), taken
    with the Python tracer off: XLA annotates its compile with events ("HLO passes
    through layout assignment", each pass, the autotuners, LLVM and PTX), so this
    says where a compile's seconds go. Events nest, so the totals overlap. Removes
    the trace (the device returns a few files only). Returns {"top": [[name, ms,
    count], ...], "events": how many host events}."""
    events = _trace_events(trace_dir)
    shutil.rmtree(trace_dir, ignore_errors=True)
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    host = {pid for pid, n in names.items() if "host" in n.lower()} or set(names)
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in host:
            entry = totals.setdefault(str(e.get("name", "?"))[:120], [0.0, 0])
            entry[0] += float(e.get("dur", 0.0)) / 1e3
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {
        "top": [[n, round(ms, 1), c] for n, (ms, c) in ranked[:top]],
        "events": sum(c for _, c in totals.values()),
    }


def profile_summary(
    trace_dir: Path,
    out_file: Path | None,
    top: int = 40,
    hlo_text: str | None = None,
    calls: int = 0,
) -> dict:
    """Device time per kernel from a ``jax.profiler`` trace (perfetto JSON).

    Sums the complete events of the device tracks (process names with "GPU" or
    "device"; all tracks when there are none, as on CPU) by kernel name, and, with
    the executable's optimized ``hlo_text``, by :func:`kernel_kind`. Copies the trace
    to ``out_file`` if given. Returns {"total_ms", "top": [[name, ms, count], ...],
    "by_kind": [[kind, ms, count], ...], "mapped_ms"} (over all traced calls), and with
    ``calls`` (how many calls the trace holds) and a device track, "span_ms":
    :func:`device_spans`.
    """
    events = _trace_events(trace_dir, out_file)
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, n in names.items() if "GPU" in n or "device" in n.lower()}
    threads = {
        (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    totals: dict[str, list[float]] = {}
    per_thread: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") != "X" or (device and e.get("pid") not in device):
            continue
        ms = float(e.get("dur", 0.0)) / 1e3
        for key, table in (
            (str(e.get("name", "?"))[:120], totals),
            (threads.get((e.get("pid"), e.get("tid")), str(e.get("tid"))), per_thread),
        ):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += ms
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    summary = {
        "tracks": sorted(names[p] for p in device) if device else "all",
        "total_ms": sum(v[0] for v in totals.values()),
        "top": [[n, round(ms, 3), c] for n, (ms, c) in ranked[:top]],
        # Which lines of the device's track the events sit on (streams; any line
        # that repeats kernels, as per-op lines would, shows up here).
        "threads": [[n, round(ms, 3), c] for n, (ms, c) in sorted(per_thread.items())],
    }
    if calls and device:  # (a CPU trace has no device track to split)
        summary["span_ms"] = device_spans(events, device, calls)
    if hlo_text:
        ops = hlo_op_names(hlo_text)
        kinds: dict[str, list[float]] = {}
        for name, (ms, count) in totals.items():
            entry = kinds.setdefault(kernel_kind(name, ops.get(name)), [0.0, 0])
            entry[0] += ms
            entry[1] += count
        ranked_kinds = sorted(kinds.items(), key=lambda kv: -kv[1][0])
        summary["by_kind"] = [[k, round(ms, 3), c] for k, (ms, c) in ranked_kinds]
        summary["mapped_ms"] = sum(ms for n, (ms, _) in totals.items() if n in ops)
    return summary


def _torch_setup(cfg: dict, work: Path, compile_unet: bool):
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxdiff.tokenizer import save_clip_tokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # fp16 is what the DESIGN.md yardsticks used; CPU kernels lack some fp16 paths.
    half = torch.float16 if dev == "cuda" else torch.bfloat16
    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "half": str(half),
    }
    tok_dir = save_clip_tokenizer(work / "tokenizer_torch", PROMPTS * 3, num_merges=200)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    with torch.device(dev):
        unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        vae = diffusers.AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **cfg["clip"],
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        )
    return torch, diffusers, dev, half, info, tokenizer, unet, vae, text_encoder


def _torch_unet(torch, cfg: dict, item: str, dev: str, dtype, net):
    inp = _inputs(cfg, item)
    x = torch.from_numpy(inp["x"]).to(dev, dtype)
    t = torch.from_numpy(inp["t"]).to(dev).long()
    ctx = torch.from_numpy(inp["ctx"]).to(dev, dtype)

    def call():
        with torch.inference_mode():
            return net(x, t, encoder_hidden_states=ctx).sample

    return call


def _torch_decode(torch, cfg: dict, dev: str, half, vae):
    vae_half = vae.to(half).eval()
    z = torch.from_numpy(_inputs(cfg, "vae_decode")["z"]).to(dev, half)

    def decode():
        with torch.inference_mode():
            return vae_half.decode(z).sample

    return decode


def _torch_train(torch, diffusers, cfg: dict, dev: str, half, unet, text_encoder, vocab: int):
    """diffusers' train_text_to_image.py step with --mixed_precision bf16 (fp32 weights)."""
    train_unet = diffusers.UNet2DConditionModel(**cfg["unet"]).to(dev)
    train_unet.load_state_dict(unet.state_dict())
    train_unet.train()
    opt = torch.optim.AdamW(
        train_unet.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
    )
    sched = diffusers.DDPMScheduler.from_config(SCHEDULER)
    inp = _inputs(cfg, "train_step")
    latents = torch.from_numpy(inp["latents"]).to(dev)
    ids = torch.from_numpy(inp["ids"] % vocab).to(dev).long()
    te = text_encoder.to(half).eval()

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=dev)
        noisy = sched.add_noise(latents, noise, t)
        with torch.no_grad():
            ctx = te(ids)[0]
        with torch.autocast(dev, dtype=torch.bfloat16):
            pred = train_unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _torch_t2i(torch, diffusers, cfg: dict, dev: str, half, parts: dict):
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts["vae"].to(half),
        text_encoder=parts["text_encoder"].to(half),
        tokenizer=parts["tokenizer"],
        unet=parts["unet"].to(half),
        scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.from_numpy(_inputs(cfg, "t2i")["noise"]).to(dev, half)
    prompts = _prompts(cfg)

    def t2i():
        with torch.inference_mode():
            return pipe(
                prompts,
                num_inference_steps=cfg["steps"],
                guidance_scale=GUIDANCE,
                latents=noise,
                output_type="np",
            ).images

    return t2i


def _worker_torch(cfg: dict, runner: _Runner, work: Path, compiled: bool) -> None:
    torch, diffusers, dev, half, info, tokenizer, unet, vae, text_encoder = _torch_setup(
        cfg, work, compiled
    )
    runner.result["info"].update(info)

    def sync(_):
        if dev == "cuda":
            torch.cuda.synchronize()

    runner.sync = sync
    torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers' training scripts allow
    items = ITEMS["torch_compile" if compiled else "torch"]

    if "matmul" in items:
        n = cfg["matmul"]
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        runner.run("matmul", lambda: a @ b, {"flop": 2.0 * n**3})

    # The training copy is made from the fp32 weights before the inference copy is cast.
    train_fn = None
    if "train_step" in items and runner.wants("train_step"):
        train_fn = _torch_train(
            torch, diffusers, cfg, dev, half, unet, text_encoder, len(tokenizer)
        )
    unet_half = unet.to(half).eval()
    model = torch.compile(unet_half) if compiled else unet_half
    for item in items:
        if item == "matmul":
            continue
        if not runner.wants(item):
            runner.skip(item, runner.skip_reason(item))
        elif item in ("unet_b2", "unet_b16"):
            runner.run(item, _torch_unet(torch, cfg, item, dev, half, model))
        elif item.endswith("_bf16"):
            net = unet_half.to(torch.bfloat16)
            runner.run(item, _torch_unet(torch, cfg, item, dev, torch.bfloat16, net))
        elif item == "vae_decode":
            runner.run(item, _torch_decode(torch, cfg, dev, half, vae))
        elif item == "train_step" and train_fn is not None:
            runner.run(item, train_fn)
            train_fn = None  # frees the training copy and its optimizer state
            if dev == "cuda":
                torch.cuda.empty_cache()
        elif item == "t2i":
            parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_half)
            runner.run(item, _torch_t2i(torch, diffusers, cfg, dev, half, parts))


def _worker_flax039(cfg: dict, runner: _Runner, work: Path) -> None:
    import diffusers
    import flax
    import jax
    import jax.numpy as jnp
    import transformers
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxDDIMScheduler,
        FlaxDDPMScheduler,
        FlaxStableDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )
    from flax.jax_utils import replicate
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    from benchmarks.flax039_train import diffusers_flax_train_step
    from jaxdiff.tokenizer import save_clip_tokenizer

    runner.result["info"].update(
        jax=jax.__version__,
        flax=flax.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        devices=[str(d) for d in jax.devices()],
    )
    bf16 = jnp.bfloat16
    tok_dir = save_clip_tokenizer(work / "tokenizer_flax", PROMPTS * 3, num_merges=200)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet_cfg = {k: v for k, v in cfg["unet"].items() if k != "norm_num_groups"}
    unet = FlaxUNet2DConditionModel(**unet_cfg, dtype=bf16)
    unet32 = FlaxUNet2DConditionModel(**unet_cfg, dtype=bf16)  # fp32 params, bf16 compute
    vae = FlaxAutoencoderKL(**cfg["vae"], dtype=bf16)
    clip_cfg = CLIPTextConfig(
        **cfg["clip"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    text_encoder = FlaxCLIPTextModel(clip_cfg, dtype=bf16, _do_init=False)
    key = jax.random.PRNGKey(0)
    unet_abs = jax.eval_shape(unet.init_weights, key)
    vae_abs = jax.eval_shape(vae.init_weights, key)
    text_abs = jax.eval_shape(lambda k: text_encoder.init_weights(k, (1, 77)), key)
    params32 = {
        "unet": random_params(unet_abs, 1),
        "vae": random_params(vae_abs, 2),
        "text_encoder": random_params(text_abs, 3),
    }
    p16 = jax.tree.map(lambda a: a.astype(bf16), params32)

    unet_fn = jax.jit(
        lambda p, x, t, c: unet.apply({"params": p}, x, t, encoder_hidden_states=c).sample
    )
    for item in ("unet_b2", "unet_b16"):
        inp = _inputs(cfg, item)
        x, t = jnp.asarray(inp["x"], bf16), jnp.asarray(inp["t"])
        ctx = jnp.asarray(inp["ctx"], bf16)
        runner.run(item, lambda x=x, t=t, ctx=ctx: unet_fn(p16["unet"], x, t, ctx))

    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
    z = jnp.asarray(_inputs(cfg, "vae_decode")["z"], bf16)
    runner.run("vae_decode", lambda: dec(p16["vae"], z))

    if runner.wants("train_step"):
        # diffusers' train_text_to_image_flax.py step with --mixed_precision bf16.
        tx, step_fn = diffusers_flax_train_step(
            unet32, text_encoder, p16["text_encoder"], FlaxDDPMScheduler.from_config(SCHEDULER), LR
        )
        train_params = params32["unet"]
        state_box = [(train_params, tx.init(train_params), jnp.zeros((), jnp.int32))]
        step = jax.jit(step_fn, donate_argnums=0)
        inp = _inputs(cfg, "train_step")
        batch = {
            "latents": jnp.asarray(inp["latents"]),
            "input_ids": jnp.asarray(inp["ids"] % len(tokenizer)),
        }
        rng = jax.random.PRNGKey(1)

        def train_step():
            state_box[0], loss = step(state_box[0], batch, rng)
            return state_box[0], loss

        runner.run("train_step", train_step)
        del state_box, params32
    else:
        runner.skip("train_step", runner.skip_reason("train_step"))

    if runner.wants("t2i"):
        scheduler = FlaxDDIMScheduler.from_config(SCHEDULER)
        pipe = FlaxStableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            dtype=bf16,
        )
        pipe.set_progress_bar_config(disable=True)
        ndev = jax.local_device_count()
        pparams = replicate({**p16, "scheduler": scheduler.create_state()})
        prompts = _prompts(cfg)
        b = len(prompts)
        if b % ndev:
            runner.skip("t2i", f"{b} images do not split over {ndev} devices")
            return
        noise = jnp.asarray(_inputs(cfg, "t2i")["noise"]).reshape(ndev, b // ndev, 4, *z.shape[2:])
        seeds = jax.random.split(jax.random.PRNGKey(0), ndev)

        def t2i():
            ids = pipe.prepare_inputs(prompts).reshape(ndev, b // ndev, -1)
            return pipe(
                ids,
                pparams,
                seeds,
                num_inference_steps=cfg["steps"],
                guidance_scale=GUIDANCE,
                latents=noise,
                jit=True,
            ).images

        runner.run("t2i", t2i)
    else:
        runner.skip("t2i", runner.skip_reason("t2i"))


def _worker_main(args: argparse.Namespace) -> None:
    cfg = CONFIGS[args.config]
    work = Path(args.workdir)
    name = args.worker + (f"+{args.variant}" if args.variant else "")
    runner = _Runner(name, cfg, args.deadline, Path(args.result), sync=lambda _: None)
    runner.selected = set(args.items or ())
    if args.variant:
        spec = VARIANTS[args.variant]
        apply_patches(spec)
        runner.options.update(spec.get("options", {}))
        runner.result["info"]["variant"] = {
            k: v for k, v in spec.items() if k not in ("items", "default", "need_s")
        }
        # --items narrows an experiment's own items (run() launches none it leaves
        # empty): a cold compile stays the process's first.
        runner.selected = set(spec["items"]) & set(args.items or spec["items"])
    if args.worker in ("jaxdiff", "flax039"):
        import jax

        runner.sync = jax.block_until_ready
        if os.environ.get(ENV_XLA_CACHE):
            jax.config.update("jax_compilation_cache_dir", os.environ[ENV_XLA_CACHE])
        runner.result["info"]["xla_cache"] = os.environ.get(ENV_XLA_CACHE) or "none"
    if args.worker == "jaxdiff":
        _worker_jaxdiff(cfg, runner, work)
    elif args.worker == "flax039":
        _worker_flax039(cfg, runner, work)
    else:
        _worker_torch(cfg, runner, work, compiled=args.worker == "torch_compile")
    runner.save()


# ---------------------------------------------------------------- driver


def install_wheels(wheels: Path, site: Path) -> str | None:
    """pip-install the wheels in ``wheels`` into ``site`` (no index, no deps); None if none."""
    whls = sorted(str(p) for p in wheels.glob("*.whl"))
    if not whls:
        return None
    if site.exists():
        return str(site)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--target", str(site), *whls]
    subprocess.run(cmd, check=True)
    return str(site)


def _have(module: str, pythonpath: str | None) -> bool:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = [sys.executable, "-c", f"import {module}"]
    return subprocess.run(probe, env=env, capture_output=True).returncode == 0


def _report(results: dict[str, dict], cfg: dict) -> tuple[str, dict]:
    names = list(results)  # run order: jaxdiff, its variants, the peers
    items = [i for i in ROW_ORDER if any(i in results[c]["items"] for c in names)]
    jd = results.get("jaxdiff", {}).get("items", {})
    ceiling = results.get("jaxdiff", {}).get("info", {}).get("ceiling_flops_per_s")

    def cell(c, i):
        r = results[c]["items"].get(i)
        if r is None:
            return "-"
        if "skipped" in r:
            return "skipped"
        if "error" in r:
            return "error"
        return common.fmt_s(r.get("median_s"))

    def med(c, i):
        return results.get(c, {}).get("items", {}).get(i, {}).get("median_s")

    peers = [c for c in names if not c.startswith("jaxdiff")]
    variants = [c for c in names if c.startswith("jaxdiff+")]
    headers = ["item"] + names + [f"jaxdiff/{p}" for p in peers]
    headers += [f"{v[len('jaxdiff') :]}/jaxdiff" for v in variants] + ["jaxdiff % of ceiling"]
    rows = []
    for i in items:
        frac = "-"
        flop = jd.get(i, {}).get("flop")
        if ceiling and flop and med("jaxdiff", i) and i != "matmul":
            frac = f"{100 * flop / med('jaxdiff', i) / ceiling:.0f}%"
        rows.append(
            [i]
            + [cell(c, i) for c in names]
            + [common.fmt_x(common.ratio(med("jaxdiff", i), med(p, i))) for p in peers]
            + [common.fmt_x(common.ratio(med(v, i), med("jaxdiff", i))) for v in variants]
            + [frac]
        )
    for i in items:
        if i == "matmul":
            continue
        comp = [results[c]["items"].get(i, {}).get("compile_s") for c in names]
        if any(v is not None for v in comp):
            cells = [common.fmt_s(v) for v in comp]
            rows.append([f"compile {i}"] + cells + [""] * (len(peers) + len(variants) + 1))
    for i in items:
        back = [results[c]["items"].get(i, {}).get("pipelined_s") for c in names]
        if any(v is not None for v in back):
            by = dict(zip(names, back, strict=True))
            ratios = [common.fmt_x(common.ratio(by.get("jaxdiff"), by[p])) for p in peers]
            rows.append(
                [f"back to back {i}"]
                + [common.fmt_s(v) for v in back]
                + ratios
                + [""] * (len(variants) + 1)
            )
    lines = [common.table(headers, rows)]
    train_b = cfg["batches"].get("train_step")
    for c in names:
        r = results[c]["items"].get("train_step", {})
        if "median_s" in r and train_b:
            back = r.get("pipelined_s")
            lines.append(
                f"train images/s {c}: {train_b / r['median_s']:.1f} waiting for each step"
                + (f", {train_b / back:.1f} back to back" if back else "")
            )
    if ceiling:
        lines.append(f"\nbf16 matmul ceiling (jaxdiff/XLA): {ceiling / 1e12:.3g} TFLOP/s")
    for i in ("unet_b2", "unet_b16", "vae_decode", "train_step"):
        flop = jd.get(i, {}).get("flop")
        if flop:
            b = cfg["batches"][i]
            lines.append(
                f"matmul+conv FLOPs {i}: {flop / 1e9:.4g} GFLOP ({flop / b / 1e9:.4g} per sample)"
            )
    return "\n".join(lines), {"headers": headers, "rows": rows}


def run(args: argparse.Namespace) -> dict:
    t_start = time.time()
    end = t_start + args.budget
    cfg = CONFIGS["tiny" if args.tiny else "sd15"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jaxdiff-gpu-"))
    notes: list[str] = []
    # In the order given (the first ones get their share first), else CONTENDERS'.
    contenders = list(dict.fromkeys(args.contenders or CONTENDERS))
    # By default all experiments, when jaxdiff itself runs (and not in --tiny smoke runs).
    default = [v for v, spec in VARIANTS.items() if spec.get("default", True)]
    if args.tiny or "jaxdiff" not in contenders:
        default = []
    variants = default if args.variants is None else args.variants
    if variants:
        at = contenders.index("jaxdiff") + 1 if "jaxdiff" in contenders else 0
        contenders[at:at] = [f"jaxdiff+{v}" for v in variants]
        if not args.tiny and any(not VARIANTS[v].get("cold") for v in variants):
            notes.append(
                "experiments share one XLA cache (autotuning results reused): their "
                "compile times are not cold ones, except those of the t2i_cold* ones"
            )

    wheels = Path(args.wheels)
    pypaths: dict[str, str | None] = {"jaxdiff": None}
    try:
        pypaths["torch"] = install_wheels(wheels / "torch", Path("/tmp/site-torch"))
        pypaths["flax039"] = install_wheels(wheels / "flax039", Path("/tmp/site-flax039"))
    except subprocess.CalledProcessError as e:
        notes.append(f"installing carried wheels failed: {e}")
    pypaths["torch_compile"] = pypaths.get("torch")
    if args.peer_python:  # a local venv (setup_peer.sh) runs flax039 on CPU
        pypaths["flax039"] = None

    results: dict[str, dict] = {}

    def need_s(c: str) -> float:
        base, _, variant = c.partition("+")
        return VARIANTS[variant].get("need_s", VARIANT_NEED_S) if variant else NEEDS_S[base]

    for c in contenders:
        base, _, variant = c.partition("+")
        now = time.time()
        if now > end - 10:
            notes.append(f"{c}: skipped, over the time budget")
            continue
        if variant and args.items and not set(VARIANTS[variant]["items"]) & set(args.items):
            notes.append(f"{c}: skipped, none of its items is in --items")
            continue
        python = args.peer_python if (c == "flax039" and args.peer_python) else sys.executable
        module = "diffusers" if base != "jaxdiff" else "jaxdiff"
        extra = pypaths.get(base)
        path = os.pathsep.join(p for p in [extra, str(common.REPO)] if p)
        if base != "jaxdiff" and python == sys.executable and not _have(module, path):
            notes.append(f"{c}: skipped, no diffusers (carry .bench/wheels, see gpu_wheels.sh)")
            continue
        if c == "torch_compile" and args.tiny and not args.contenders:
            notes.append("torch_compile: skipped in --tiny mode unless named in --contenders")
            continue
        deadline = min(now + need_s(c), end)
        result_path = out / f"gpu_{c}.json"
        env = common.worker_env()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [extra, str(common.REPO), os.environ.get("PYTHONPATH", "")] if p
        )
        if variant and not VARIANTS[variant].get("cold"):
            # One persistent XLA cache for the run's experiments, empty at its start
            # (jaxdiff's own worker runs without one, as a user's first process): the
            # later experiments reuse the earlier ones' autotuning results (JAX turns
            # on XLA's per-fusion autotune cache beside it), which cuts their
            # compiles, not their run times.
            env[ENV_XLA_CACHE] = str(work / "xla-cache")
        if args.tiny:
            env["JAX_PLATFORMS"] = "cpu"
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see cpu.py: torch on a shared CPU
        elif "JAX_PLATFORMS" in env and env["JAX_PLATFORMS"] == "cpu" and c != "torch":
            env.pop("JAX_PLATFORMS")
        if variant and VARIANTS[variant].get("xla_flags"):
            flags = [env.get("XLA_FLAGS", ""), VARIANTS[variant]["xla_flags"]]
            env["XLA_FLAGS"] = " ".join(f for f in flags if f)
        argv = [python, "-m", "benchmarks.gpu", "--worker", base, "--workdir", str(work)]
        if variant:
            argv += ["--variant", variant]
        argv += ["--deadline", str(deadline), "--result", str(result_path)]
        argv += ["--config", "tiny" if args.tiny else "sd15"]
        if args.items:
            argv += ["--items", *args.items]
        print(f"== {c} (until +{deadline - t_start:.0f} s of {args.budget:.0f} s)", flush=True)
        log = open(out / f"gpu_{c}.log", "w")  # noqa: SIM115
        try:
            proc = subprocess.Popen(argv, cwd=common.REPO, env=env, stdout=log, stderr=log)
            # Hard stop: the share plus a grace for the item in flight, never past the end.
            proc.wait(timeout=max(min(deadline + args.grace, end) - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            notes.append(f"{c}: killed at its deadline; items not reported were cut off")
        finally:
            log.close()
        if proc.returncode not in (0, None, -9):
            tail = (out / f"gpu_{c}.log").read_text().splitlines()[-15:]
            notes.append(f"{c}: exit code {proc.returncode}: " + " | ".join(tail)[-1500:])
        if result_path.exists():
            results[c] = json.loads(result_path.read_text())
            result_path.unlink()
        for line in (out / f"gpu_{c}.log").read_text().splitlines():
            if line.startswith(f"[{c}]") and (":" in line) and "..." not in line:
                print("  " + line, flush=True)

    # One log file for all contenders (what comes back from the device is counted in files).
    with open(out / "gpu.log", "w") as log:
        for c in contenders:
            part = out / f"gpu_{c}.log"
            if part.exists():
                log.write(f"==== {c}\n{part.read_text()}\n")
                part.unlink()
    text, table = _report(results, cfg)
    report = {
        "benchmark": "gpu",
        "config": "tiny" if args.tiny else "sd15",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": common.host_info(),
        "budget_s": args.budget,
        "wall_s": time.time() - t_start,
        "results": results,
        "table": table,
        "notes": notes,
    }
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    (out / "gpu.txt").write_text(text + "\n\n" + "\n".join(f"note: {n}" for n in notes) + "\n")
    print()
    print(text)
    for n in notes:
        print("note:", n)
    print(f"wall {report['wall_s']:.0f} s of a {args.budget:.0f} s budget; wrote {out}/gpu.json")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"))
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run")
    p.add_argument("--grace", type=float, default=45.0, help="overrun allowed per contender")
    p.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke run)")
    p.add_argument("--contenders", nargs="*", choices=CONTENDERS)
    p.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        help="jaxdiff experiments to run after jaxdiff (default: all when jaxdiff runs; "
        "none with --tiny)",
    )
    p.add_argument("--items", nargs="*", choices=ROW_ORDER, help="subset of items (default all)")
    p.add_argument("--wheels", default=str(common.REPO / ".bench" / "wheels"))
    p.add_argument("--peer-python", help="python of a diffusers-Flax 0.39 venv (CPU runs)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="GPU_JSON",
        help="run nothing: merge these runs' gpu.json into one table under --out",
    )
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--config", default="sd15", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def merge(paths: list[str], out: Path) -> dict:
    """One table from several runs' ``gpu.json`` (e.g. the two calls of one lease).

    Contenders are taken from each file in turn; an item measured in a later file
    replaces the same item of an earlier one, items only skipped there do not.
    Writes ``gpu.json`` and ``gpu.txt`` under ``out``.
    """
    reports = [json.loads(Path(p).read_text()) for p in paths]
    configs = {r["config"] for r in reports}
    if len(configs) != 1:
        raise SystemExit(f"cannot merge runs of different configs: {sorted(configs)}")
    results: dict[str, dict] = {}
    for report in reports:
        for name, res in report["results"].items():
            merged = results.setdefault(name, {"contender": name, "items": {}, "info": {}})
            merged["info"].update(res.get("info", {}))
            for item, entry in res.get("items", {}).items():
                if "median_s" in entry or item not in merged["items"]:
                    merged["items"][item] = entry
    config = configs.pop()
    text, table = _report(results, CONFIGS[config])
    sources = [f"{path} ({report['date']})" for path, report in zip(paths, reports, strict=True)]
    merged_report = {
        "benchmark": "gpu",
        "config": config,
        "merged_from": sources,
        "results": results,
        "table": table,
        "notes": [n for r in reports for n in r.get("notes", [])],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(merged_report, indent=1))
    (out / "gpu.txt").write_text(text + "\n\nmerged from:\n" + "\n".join(sources) + "\n")
    print(text)
    print("merged from:", *sources, sep="\n  ")
    return merged_report


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker_main(args)
        return
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    run(args)


if __name__ == "__main__":
    main()
