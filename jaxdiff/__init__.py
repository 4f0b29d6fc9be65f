"""jaxdiff: Stable Diffusion (latent diffusion) in JAX/Flax."""

__version__ = "0.1.0"
__all__ = ["StableDiffusion", "enable_compile_cache"]


def __getattr__(name: str):
    # Lazy, so `import jaxdiff` (and the CLI's argument parsing) does not import jax.
    if name == "StableDiffusion":
        from jaxdiff.pipeline import StableDiffusion

        return StableDiffusion
    if name == "enable_compile_cache":
        from jaxdiff.compile_cache import enable_compile_cache

        return enable_compile_cache
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
