"""Matmul/conv FLOPs of the GPU benchmark's SD 1.5 items, counted here on the CPU.

The same count ``benchmarks/gpu.py`` makes on the device (``jaxdiff.flops``,
attention traced as XLA's two matmuls), without a GPU: abstract params, the
GPU code path traced (``jax.default_backend`` reported as "gpu"), nothing
compiled. NOTES.md's "% of the matmul ceiling" figures for runs whose JSON
has no ``flop`` fields come from this table.

Run: python -m benchmarks.sd15_flops    (about 15 s)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["JAXDIFF_ATTENTION"] = "xla"
    import jax
    import jax.numpy as jnp

    from benchmarks import common, gpu
    from jaxdiff.flops import count_flops
    from jaxdiff.models.autoencoder import vae_decode
    from jaxdiff.models.sd import abstract_params, apply_unet
    from jaxdiff.train.step import init_state, make_train_step

    jax.default_backend = lambda: "gpu"  # trace the GPU branches (1x1 convs stay convs)
    cfg = gpu.CONFIGS["sd15"]
    config = gpu.sd_config(cfg, vocab_size=49408, bos=49406, eos=49407)  # CLIP's vocabulary
    bf16, f32, S = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
    p32 = abstract_params(config)
    p16 = jax.tree.map(lambda a: S(a.shape, bf16), p32)
    side = cfg["unet"]["sample_size"]
    batches = cfg["batches"]
    rows = []

    def add(item, batch, flops):
        rows.append(
            [item, str(batch), f"{flops['total'] / 1e9:.1f}", f"{flops['total'] / batch / 1e9:.1f}"]
        )

    for item in ("unet_b2", "unet_b16"):
        b = batches[item]
        flops = count_flops(
            lambda p, x, t, c: apply_unet(p, x, t, c, config, bf16),
            p16["unet"],
            S((b, side, side, 4), f32),
            S((b,), jnp.int32),
            S((b, 77, cfg["unet"]["cross_attention_dim"]), f32),
        )
        add(item, b, flops)
    b = batches["vae_decode"]
    flops = count_flops(
        lambda p, z: vae_decode(p, z, config.vae, bf16), p16["vae"], S((b, side, side, 4), f32)
    )
    add("vae_decode", b, flops)
    tx, step_cfg = gpu.train_setup(p32["unet"], bf16)
    state = jax.eval_shape(lambda p: init_state(p, tx, step_cfg, jax.random.key(0)), p32)
    b = batches["train_step"]
    batch = {"latents": S((b, side, side, 4), f32), "input_ids": S((b, 77), jnp.int32)}
    step = make_train_step(config, step_cfg, tx)
    add("train_step", b, count_flops(step, state, batch, jax.random.key(1)))
    print(common.table(["item", "batch", "GFLOP", "GFLOP per sample"], rows))


if __name__ == "__main__":
    main()
