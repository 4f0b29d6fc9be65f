"""jaxdiff: Stable Diffusion (latent diffusion) in JAX/Flax."""

__version__ = "0.1.0"
