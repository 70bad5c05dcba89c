"""Zoo models: build speed and shapes, sdpa/eager agreement, export, meta build, HF equivalence."""

from __future__ import annotations

import time

import pytest
import torch

from condfx.models_zoo import (
    META_ONLY,
    ZOO,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    ModelInfo,
    build_hf,
    build_zoo,
)

NAMES = sorted(n for n in ZOO if n not in META_ONLY)
OWN_PAIRS = [("llama-tiny", "llama-tiny-eager"), ("gpt2-tiny", "gpt2-tiny-eager")]
HF_PAIRS = [(f"hf-{k}", f"hf-{k}-eager") for k in ("llama", "qwen2", "qwen3", "gpt2")]


def _ids(b: int = 2, t: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=gen)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _warm_transformers():
    """Import the transformers model modules once so build times measure building, not imports."""
    for kind in ("llama", "qwen2", "qwen3", "gpt2"):
        build_hf(kind)


@pytest.mark.parametrize("name", NAMES)
def test_numerics_zoo_builds_fast_with_logits_shape(name):
    start = time.perf_counter()
    model = build_zoo(name)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{name} took {elapsed:.2f}s to build"
    assert not model.training
    assert isinstance(model.info, ModelInfo) and model.info.name == name
    with torch.no_grad():
        logits = model(_ids())
    assert logits.shape == (2, 9, model.info.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny", "gpt2-tiny", "hf-llama"])
def test_numerics_zoo_seeded_builds_are_deterministic(name):
    a, b, c = build_zoo(name, seed=0), build_zoo(name, seed=0), build_zoo(name, seed=1)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))


@pytest.mark.parametrize(("sdpa", "eager"), OWN_PAIRS + HF_PAIRS)
def test_numerics_sdpa_matches_eager(sdpa, eager):
    x = _ids(t=17)
    with torch.no_grad():
        torch.testing.assert_close(build_zoo(sdpa)(x), build_zoo(eager)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_numerics_gqa_qknorm_bias_sdpa_matches_eager(impl):
    cfg = dict(
        vocab_size=64,
        dim=48,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        hidden_dim=80,
        qk_norm=True,
        qkv_bias=True,
    )
    model = LlamaModel(LlamaConfig(**cfg, attn_impl=impl), seed=3)
    ref = LlamaModel(LlamaConfig(**cfg, attn_impl="eager"), seed=3)
    x = _ids(t=11) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_numerics_causal_prefix_independent_of_suffix():
    model = build_zoo("llama-tiny-eager")
    x = _ids(t=12)
    y = x.clone()
    y[:, 8:] = 7
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])


def _copy_hf_llama(hf, ours: LlamaModel) -> None:
    m, sd = hf.model, {}
    sd["tok_embeddings.weight"] = m.embed_tokens.weight
    sd["norm.weight"] = m.norm.weight
    sd["output.weight"] = hf.lm_head.weight
    for i, layer in enumerate(m.layers):
        p, a, f = f"layers.{i}.", layer.self_attn, layer.mlp
        sd[p + "attention_norm.weight"] = layer.input_layernorm.weight
        sd[p + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
        for ours_name, proj in (
            ("wq", a.q_proj),
            ("wk", a.k_proj),
            ("wv", a.v_proj),
            ("wo", a.o_proj),
        ):
            sd[p + f"attention.{ours_name}.weight"] = proj.weight
            if proj.bias is not None:
                sd[p + f"attention.{ours_name}.bias"] = proj.bias
        if hasattr(a, "q_norm"):
            sd[p + "attention.q_norm.weight"] = a.q_norm.weight
            sd[p + "attention.k_norm.weight"] = a.k_norm.weight
        for ours_name, proj in (("w1", f.gate_proj), ("w2", f.down_proj), ("w3", f.up_proj)):
            sd[p + f"feed_forward.{ours_name}.weight"] = proj.weight
    ours.load_state_dict(sd, strict=True)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("llama", {}),
        ("qwen2", {"qkv_bias": True}),
        ("qwen3", {"qk_norm": True}),
    ],
)
def test_numerics_own_llama_matches_hf(kind, extra):
    hf = build_hf(kind, seed=5)
    ours = LlamaModel(
        LlamaConfig(
            vocab_size=256,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            hidden_dim=172,
            rope_theta=hf.config.rope_parameters["rope_theta"],
            norm_eps=1e-5,
            **extra,
        )
    ).eval()
    _copy_hf_llama(hf, ours)
    x = _ids(t=13)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x), hf(input_ids=x, use_cache=False).logits, atol=1e-5, rtol=1e-4
        )


def test_numerics_own_gpt2_matches_hf():
    hf = build_hf("gpt2", seed=5)
    ours = GPT2Model(
        GPT2Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=256)
    ).eval()
    sd = {
        k.removeprefix("transformer."): v
        for k, v in hf.state_dict().items()
        if "attn.bias" not in k
    }
    for k, v in list(sd.items()):
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            sd[k] = v.t()  # HF Conv1D stores (in, out)
    ours.load_state_dict(sd, strict=False)
    x = _ids(t=13)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x), hf(input_ids=x, use_cache=False).logits, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-tiny-eager"])
def test_matches_export_with_dynamic_batch_and_seq(name):
    model = build_zoo(name)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(
        model, (_ids(2, 9),), dynamic_shapes=({0: batch, 1: seq},), strict=False
    )
    assert len(ep.range_constraints) == 2  # both dims stayed symbolic
    with torch.no_grad():
        for x in (_ids(3, 21, seed=1), _ids(1, 5, seed=2)):
            torch.testing.assert_close(ep.module()(x), model(x))


def test_matches_meta_build_of_7b_shape():
    model = build_zoo("llama-7b-shape", device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert 6.5e9 < n_params < 7.0e9
    assert model.info.n_layers == 32 and model.info.dim == 4096 and model.info.vocab_size == 32000
    with torch.device("meta"):
        LlamaModel(LlamaConfig(dim=128, n_heads=4, n_kv_heads=4))


def test_rejects_7b_shape_on_cpu():
    with pytest.raises(ValueError, match=r"llama-7b-shape.*device='meta'"):
        build_zoo("llama-7b-shape")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        ({"dim": 65}, r"dim \(65\) must be divisible by n_heads"),
        ({"attn_impl": "flash"}, r"attn_impl must be one of \{sdpa, eager\}; got 'flash'"),
        ({"n_layers": 0}, r"n_layers must be a positive int; got 0"),
    ],
)
def test_rejects_bad_llama_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LlamaConfig(**kwargs)


def test_rejects_bad_gpt2_config_and_hf_kind():
    with pytest.raises(ValueError, match=r"GPT2Config.dim \(30\) must be divisible"):
        GPT2Config(dim=30)
    with pytest.raises(ValueError, match=r"build_hf kind must be one of .*got 'mamba'"):
        build_hf("mamba")
