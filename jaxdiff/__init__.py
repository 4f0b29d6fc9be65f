"""jaxdiff: Stable Diffusion (latent diffusion) in JAX/Flax."""

__version__ = "0.1.0"
__all__ = ["StableDiffusion"]


def __getattr__(name: str):
    # Lazy, so `import jaxdiff` (and the CLI's argument parsing) does not import jax.
    if name == "StableDiffusion":
        from jaxdiff.pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
