"""The CLIP text transformer (Radford et al. 2021) that conditions Stable Diffusion.

A pre-LayerNorm causal transformer over BPE tokens: token + learned position
embeddings, ``num_hidden_layers`` blocks of (LN -> multi-head self-attention ->
residual, LN -> MLP -> residual) and a final LayerNorm. The UNet attends to the
whole ``last_hidden_state`` [B, 77, D]; ``pooled_output`` is the state at the
end-of-text token.

The two text towers of Stable Diffusion:

=================  ======  ======  =====  ====  ===========  ==========
model              vocab   hidden  MLP    heads layers       activation
=================  ======  ======  =====  ====  ===========  ==========
SD 1.x ViT-L/14    49408   768     3072   12    12           quick_gelu
SD 2.x OpenCLIP-H  49408   1024    4096   16    23 (of 24)   gelu
=================  ======  ======  =====  ====  ===========  ==========

Both have 77 positions. SD 2.x keeps 23 of OpenCLIP-H's 24 text layers (it
conditions on the penultimate layer), so its ``num_hidden_layers`` is 23.

Submodules are named as the Hub checkpoints of transformers' ``CLIPTextModel``
name theirs (``text_model.encoder.layers.3.self_attn.q_proj.weight`` <->
``text_model/encoder/layers_3/self_attn/q_proj/kernel``), so
:func:`jaxdiff.weights.common.state_dict_to_params` loads them by the fixed
rule. transformers 5.x drops the ``text_model.`` prefix when it saves or
returns ``state_dict()``; :func:`canonical_clip_state_dict` puts it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import gelu_erf

Dtype = Any

_ACTIVATIONS = {
    # CLIP's original sigmoid approximation of GELU (OpenAI ViT-L/14).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # Exact (erf) GELU, as torch.nn.functional.gelu (OpenCLIP ViT-H/14).
    "gelu": gelu_erf,
}
# Before transformers PR #24773 CLIP configs carried eos_token_id=2, which is not the
# real end-of-text id (49407); for those the EOS is found as the largest token id.
_LEGACY_EOS_ID = 2
_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of :class:`CLIPTextModel`, named as transformers' ``config.json``.

    Defaults are SD 1.x's ViT-L/14 text tower.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CLIPTextConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig: unsupported hidden_act {self.hidden_act!r}; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(
                f"CLIPTextConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Build from transformers' ``text_encoder/config.json`` for a ``CLIPTextModel``.

        Keys this class does not model (``projection_dim``, dropouts, initialiser
        ranges, bookkeeping such as ``transformers_version``) are ignored: they do
        not change the forward pass. JSON ``null`` token ids fall back to the defaults.

        Args:
          config: the parsed JSON dict.

        Returns:
          The config.

        Raises:
          ValueError: for a config of another model type or an unsupported value.
        """
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            hint = " (take its 'text_config')" if "text_config" in config else ""
            raise ValueError(
                f"CLIPTextConfig.from_transformers: model_type {model_type!r} is not "
                f"'clip_text_model'{hint}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields and v is not None}
        return cls(**kwargs)

    def to_transformers(self) -> dict[str, Any]:
        """A dict that transformers' ``CLIPTextConfig(**d)`` accepts (and a valid config.json)."""
        out = dataclasses.asdict(self)
        out.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
        return out


# --------------------------------------------------------------------------- modules


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, length, d = x.shape

        def heads(name: str) -> jax.Array:  # [B, L, N, head_dim]
            y = nn.Dense(d, dtype=self.dtype, name=name)(x)
            return y.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)

        # Scale 1/sqrt(head_dim) (the default); softmax in fp32 inside.
        h = jax.nn.dot_product_attention(
            heads("q_proj"), heads("k_proj"), heads("v_proj"), is_causal=True
        )
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(h.reshape(b, length, d))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


def _layer_norm(cfg: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Flax LayerNorm reduces in fp32 even for bf16 inputs; params stay fp32.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = x + CLIPAttention(cfg, self.dtype, name="self_attn")(
            _layer_norm(cfg, self.dtype, "layer_norm1")(x)
        )
        return x + CLIPMLP(cfg, self.dtype, name="mlp")(
            _layer_norm(cfg, self.dtype, "layer_norm2")(x)
        )


class CLIPEmbeddings(nn.Module):
    """``token_embedding[input_ids] + position_embedding[0:L]``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        pos = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=self.dtype,
            name="position_embedding",
        )
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
            states.append(x)
        return x, tuple(states)


class CLIPTextTransformer(nn.Module):
    """Embeddings -> encoder -> ``final_layer_norm``, plus EOS pooling."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array):
        cfg = self.config
        x = CLIPEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        x, states = CLIPEncoder(cfg, self.dtype, name="encoder")(x)
        last = _layer_norm(cfg, self.dtype, "final_layer_norm")(x)
        if cfg.eos_token_id == _LEGACY_EOS_ID:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # First occurrence (argmax returns the first maximum); pad may equal eos.
            eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return last, pooled, states


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` in Flax (text tower only, no projection).

    Attributes:
      config: the :class:`CLIPTextConfig`.
      dtype: computation dtype (params stay float32; LayerNorm and softmax reduce in fp32).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False):
        """Encode token ids.

        Args:
          input_ids: [B, L] integer token ids, L <= max_position_embeddings
            (Stable Diffusion pads/truncates to 77 with the tokenizer).
          output_hidden_states: also return every layer's input/output.

        Returns:
          ``(last_hidden_state [B, L, D], pooled_output [B, D])``, and with
          ``output_hidden_states`` a third element: a tuple of ``num_hidden_layers + 1``
          arrays [B, L, D] (the embeddings, then each layer's output, before the final
          LayerNorm; as transformers' ``hidden_states``). "Clip skip" ``k`` uses
          ``hidden_states[-(k + 1)]`` passed through ``final_layer_norm``.
          ``pooled_output`` is ``last_hidden_state`` at the end-of-text token: the
          position of the largest id when ``eos_token_id == 2`` (legacy configs), else
          the first position equal to ``eos_token_id``.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(
                f"CLIPTextModel: input_ids must be [B, L], got shape {input_ids.shape}"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIPTextModel: input_ids must be integers, got {input_ids.dtype}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIPTextModel: sequence length {input_ids.shape[1]} exceeds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        last, pooled, states = CLIPTextTransformer(cfg, self.dtype, name="text_model")(input_ids)
        if output_hidden_states:
            return last, pooled, states
        return last, pooled


# --------------------------------------------------------------------------- functions


def init_clip(config: CLIPTextConfig, rng: jax.Array, dtype: Dtype = jnp.float32) -> dict:
    """Randomly initialised params (float32) of :class:`CLIPTextModel`.

    Args:
      config: model config.
      rng: PRNG key.
      dtype: computation dtype of the module used for init.

    Returns:
      The ``params`` pytree (nested dict).
    """
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return CLIPTextModel(config, dtype).init(rng, ids)["params"]


def abstract_clip_params(config: CLIPTextConfig, dtype: Dtype = jnp.float32) -> Any:
    """Params tree of ``jax.ShapeDtypeStruct`` (no compute, no memory), via ``jax.eval_shape``."""
    return jax.eval_shape(lambda: init_clip(config, jax.random.key(0), dtype))


def clip_encode(
    params: Any,
    input_ids: jax.Array,
    config: CLIPTextConfig,
    dtype: Dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Pure-function form of :class:`CLIPTextModel` (jit with ``config`` static).

    Args:
      params: the text encoder params pytree.
      input_ids: [B, L] integer token ids.
      config: model config.
      dtype: computation dtype.

    Returns:
      ``(last_hidden_state [B, L, D], pooled_output [B, D])``.
    """
    return CLIPTextModel(config, dtype).apply({"params": params}, input_ids)


def canonical_clip_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Give every key the ``text_model.`` prefix that Hub ``CLIPTextModel`` checkpoints use.

    transformers 5.x names ``CLIPTextModel`` weights without it (``embeddings....``)
    while checkpoints saved by earlier versions, including every Stable Diffusion
    ``text_encoder/``, have it (``text_model.embeddings....``). Keys that already
    carry the prefix are left alone.

    Args:
      state_dict: PyTorch-named weights, either convention.

    Returns:
      A new dict with ``text_model.``-prefixed keys.
    """
    return {(k if k.startswith(_PREFIX) else _PREFIX + k): v for k, v in state_dict.items()}
