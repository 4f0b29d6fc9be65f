"""CLIP text encoder parity with transformers' PyTorch CLIPTextModel at tiny random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxdiff.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    abstract_clip_params,
    canonical_clip_state_dict,
    clip_encode,
    init_clip,
)
from jaxdiff.weights.common import (
    WeightsMismatchError,
    params_to_state_dict,
    state_dict_to_params,
)

TOL = 1e-4
VOCAB = 1000
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    max_position_embeddings=77,
)
# SD 1.x-like: quick_gelu and the legacy eos_token_id=2 (EOS = largest id, as 49407 is).
SD1 = dict(TINY, num_hidden_layers=2, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)
# SD 2.x-like (OpenCLIP-H shape rules): gelu, and a real eos id that the pad id equals.
SD2 = dict(
    TINY,
    num_hidden_layers=3,
    hidden_act="gelu",
    bos_token_id=VOCAB - 2,
    eos_token_id=VOCAB - 1,
    pad_token_id=VOCAB - 1,
)
EOS_POS = (9, 76, 30)  # where each test sequence ends


def make_ids(kind: str, length: int) -> np.ndarray:
    """Token ids [3, length]: BOS, random words, EOS at EOS_POS[i], padding after."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB - 2, size=(3, length))
    ids[:, 0] = 0 if kind == "sd1" else VOCAB - 2
    for i, p in enumerate(EOS_POS):
        p = min(p, length - 1)
        # Legacy rule finds the EOS as the largest id; real CLIP's EOS (49407) is the largest.
        ids[i, p] = VOCAB - 1
        # SD1-style tokenizers pad with the EOS too; put a pad id 1 on one row instead.
        ids[i, p + 1 :] = 1 if i == 2 else VOCAB - 1
    return ids


def build(kind: str):
    torch.manual_seed(0 if kind == "sd1" else 1)
    tcfg = transformers.CLIPTextConfig(**(SD1 if kind == "sd1" else SD2))
    tm = transformers.CLIPTextModel(tcfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so every parameter is exercised
        for name, p in tm.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = CLIPTextConfig.from_transformers(tcfg.to_dict())
    # transformers 5.x drops the "text_model." prefix of Hub checkpoints.
    sd = canonical_clip_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    params = state_dict_to_params(
        sd, abstract_clip_params(cfg), what="text_encoder", ignore=[r"position_ids$"]
    )
    return tm, cfg, sd, params


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def model(request):
    return (request.param, *build(request.param))


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_matches_transformers(model):
    kind, tm, cfg, _, params = model
    assert cfg.hidden_act == ("quick_gelu" if kind == "sd1" else "gelu")
    for length in (77, 20):
        ids = make_ids(kind, length)
        with torch.no_grad():
            ref = tm(torch.from_numpy(ids), output_hidden_states=True)
        last, pooled, states = jax.jit(
            CLIPTextModel(cfg).apply, static_argnames="output_hidden_states"
        )({"params": params}, jnp.asarray(ids), output_hidden_states=True)
        assert last.shape == (3, length, 32) and pooled.shape == (3, 32)
        d_last = maxdiff(last, ref.last_hidden_state.numpy())
        d_pool = maxdiff(pooled, ref.pooler_output.numpy())
        assert len(states) == cfg.num_hidden_layers + 1 == len(ref.hidden_states)
        d_states = max(maxdiff(a, b.numpy()) for a, b in zip(states, ref.hidden_states))
        print(
            f"\n[{kind} L={length}] max|diff| last {d_last:.2e} pooled {d_pool:.2e} "
            f"hidden_states {d_states:.2e}"
        )
        assert d_last <= TOL and d_pool <= TOL and d_states <= TOL
        # The pooled state sits at the end-of-text token, independently of the reference:
        # first EOS (even when padding repeats it) or, legacy, the largest id.
        pos = [min(p, length - 1) for p in EOS_POS]
        np.testing.assert_array_equal(pooled, np.asarray(last)[np.arange(3), pos])


def test_pure_function_and_no_hidden_states(model):
    _, _, cfg, _, params = model
    ids = jnp.asarray(make_ids("sd1", 8))
    out = clip_encode(params, ids, cfg)
    assert len(out) == 2
    last, pooled, states = CLIPTextModel(cfg).apply(
        {"params": params}, ids, output_hidden_states=True
    )
    np.testing.assert_array_equal(out[0], last)
    np.testing.assert_array_equal(out[1], pooled)
    # The last hidden state is the final layer's output before final_layer_norm.
    assert maxdiff(states[-1], last) > 1e-3


def test_bfloat16_compute(model):
    kind, _, cfg, _, params = model
    ids = jnp.asarray(make_ids(kind, 77))
    last16, pooled16 = jax.jit(clip_encode, static_argnums=(2, 3))(params, ids, cfg, jnp.bfloat16)
    last, _ = clip_encode(params, ids, cfg)
    assert last16.dtype == pooled16.dtype == jnp.bfloat16
    d = maxdiff(last16, last)
    print(f"\n[{kind} bf16 vs fp32] max|diff| last {d:.2e}")
    assert d < 0.1 * float(jnp.max(jnp.abs(last)))


def test_params_round_trip_exactly(model):
    _, _, _, sd, params = model
    back = params_to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape == (VOCAB, 32)
    assert "q_proj" in params["text_model"]["encoder"]["layers_1"]["self_attn"]


def test_config_round_trip():
    for kw in (SD1, SD2):
        cfg = CLIPTextConfig(**kw)
        d = cfg.to_transformers()
        assert d["architectures"] == ["CLIPTextModel"]
        tcfg = transformers.CLIPTextConfig(**d)
        assert CLIPTextConfig.from_transformers(tcfg.to_dict()) == cfg
        assert CLIPTextConfig.from_transformers(d) == cfg
        hash(cfg)  # static argument to jit


@pytest.mark.parametrize("tower", ["vit_l_14", "open_clip_h_23"])
def test_sd_text_towers_load_by_name(tower):
    """Full-size SD 1.x / 2.x towers: every transformers weight lands on our abstract tree.

    The reference is built on torch's meta device and the "weights" are zero-stride
    numpy views, so neither side allocates the real 123M / 340M parameters.
    """
    if tower == "vit_l_14":
        cfg = CLIPTextConfig()  # defaults: SD 1.x ViT-L/14
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (768, 12, 64)
        assert cfg.hidden_act == "quick_gelu"
    else:
        cfg = CLIPTextConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
        )
    with torch.device("meta"):
        tm = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
    bare = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in tm.state_dict().items()}
    abstract = abstract_clip_params(cfg)
    # transformers 5.x state dicts lack the Hub checkpoints' "text_model." prefix.
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        state_dict_to_params(bare, abstract)
    canon = canonical_clip_state_dict(bare)
    assert canonical_clip_state_dict(canon).keys() == canon.keys()  # idempotent
    params = state_dict_to_params(canon, abstract, ignore=[r"position_ids$"])
    n_ours = sum(x.size for x in jax.tree.leaves(params))
    assert n_ours == sum(p.numel() for p in tm.parameters())
    assert sorted(params["text_model"]["encoder"]) == sorted(
        f"layers_{i}" for i in range(cfg.num_hidden_layers)
    )


def test_init_is_random():
    params = init_clip(CLIPTextConfig(**SD2), jax.random.key(0))
    emb = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert emb.shape == (VOCAB, 32) and float(jnp.std(emb)) > 0


@pytest.mark.parametrize(
    "override, match",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"hidden_size": 30}, "divisible"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"model_type": "clip", "text_config": {}}, "text_config"),
    ],
)
def test_bad_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig.from_transformers({**SD1, "model_type": "clip_text_model", **override})


def test_bad_input_raises():
    cfg = CLIPTextConfig(**SD1)
    params = abstract_clip_params(cfg)
    run = lambda ids: jax.eval_shape(lambda p, i: clip_encode(p, i, cfg), params, ids)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        run(jnp.zeros((77,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        run(jnp.zeros((1, 77), jnp.float32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run(jnp.zeros((1, 78), jnp.int32))
