"""Tests of ``quantize-kv``: matches, rejections, numerics (off = dense), golden lines, Session."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import condfx
from condfx.graph_text import graph_text
from condfx.passes import PassError
from condfx.passes.quantize_kv import QCA, QuantizeKV, QuantizeKVConfig
from condfx.runtime.session import Session
from tests._data import require_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@functools.cache
def _stories():
    from condfx.models_zoo import load

    model, _ = load(require_data("stories260K.bin"))
    return model.eval()


@functools.cache
def _captured(name: str, dtype: torch.dtype = torch.float32):
    from condfx.models_zoo import build_zoo

    model = (_stories() if name == "stories260K" else build_zoo(name)).to(dtype)
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = _logits(model(ids))
    return condfx.capture(model, (ids[:, :8].clone(),)), ids, dense


def _run(name, spec, dtype=torch.float32):
    gm, ids, dense = _captured(name, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result = condfx.apply(gm, spec)
    with torch.no_grad():
        return result, _logits(result.graph_module(ids)), dense


def test_matches_every_attention_region_fused_or_not():
    for spec in ("quantize-kv{method=kivi,bits=2,group=8}", "fuse-attention, quantize-kv{bits=3,group=8}"):
        result, _, _ = _run("llama-tiny", spec)
        gm = result.graph_module
        assert result.reports[-1].rewritten == 2
        assert sum(n.target is QCA for n in gm.graph.nodes) == 2
        targets = {str(n.target) for n in gm.graph.nodes}
        assert not any("scaled_dot_product" in t or t == "condfx.attention.default" for t in targets)


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny"])
@pytest.mark.parametrize(
    "method", ["kivi", "xquant,latent=x", "xquant,latent=svd", "xquant-cl"]
)
def test_numerics_quantization_off_is_dense_float64(name, method):
    # float64: the SVD latent, the copied RoPE / QK-norm path and the CL deltas are exact algebra
    spec = f"quantize-kv{{method={method},bits=32,group=4,residual=3}}"
    result, out, dense = _run(name, spec, torch.float64)
    assert result.reports[-1].rewritten == 2
    assert (out - dense).abs().max().item() < 1e-10


@pytest.mark.parametrize("method", ["kivi", "xquant,latent=x", "xquant,latent=svd", "xquant-cl"])
def test_numerics_off_and_16_bits_on_stories260k(method):
    _, off, dense = _run("stories260K", f"quantize-kv{{method={method},bits=32,group=8}}")
    assert (off - dense).abs().max().item() < 1e-5  # float32: bits=32 reads through the exact path
    _, half, _ = _run("stories260K", f"quantize-kv{{method={method},bits=16,group=8,residual=4}}")
    assert 0 < (half - dense).abs().max().item() < 2e-2
    errors = []
    for bits in (2, 3, 4):
        _, out, _ = _run("stories260K", f"quantize-kv{{method={method},bits={bits},group=8,residual=4}}")
        errors.append((out - dense).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2] > 0


def test_numerics_residual_window_covering_sequence_is_dense():
    _, out, dense = _run("stories260K", "quantize-kv{method=kivi,bits=2,group=8,residual=40}")
    assert (out - dense).abs().max().item() < 1e-5


def test_numerics_report_bytes_per_token():
    spec = "quantize-kv{method=kivi,bits=2,group=8,residual=16,context=1024}"
    result, _, _ = _run("stories260K", spec)
    rep = result.reports[-1]
    # 5 layers, K and V of 4 heads x 8 dims; 2-bit codes + fp16 scale/zero per 8 values;
    # K leaves the window in chunks of 8 tokens, V one token at a time; the tail is float32, the
    # model's dtype, as the cache layout stores it (the report reads the layouts)
    code = 32 * 2 / 8 + 4 * 32 / 8
    k = (1008 * code + 16 * 128) / 1024
    v = (1008 * code + 16 * 128) / 1024
    assert rep.fp16_bytes_per_token == 5 * 128
    assert rep.kv_bytes_per_token == pytest.approx(5 * (k + v))
    assert "KV cache at 1024 tokens" in rep.to_markdown()


def test_numerics_sink_tokens_stay_full_precision():
    spec = "quantize-kv{method=xquant-cl,bits=2,group=8,residual=4,sink=%d,context=1024}"
    r0, plain, dense = _run("stories260K", spec % 0)
    r1, sunk, _ = _run("stories260K", spec % 1)
    assert not torch.equal(plain, sunk)
    # the first token's own logits never read a quantized key; the bytes grow by one float32 row
    torch.testing.assert_close(sunk[:, :1], dense[:, :1])
    extra = r1.reports[-1].kv_bytes_per_token - r0.reports[-1].kv_bytes_per_token
    assert 0 < extra < 5 * 64 * 4 / 1024 + 1e-9


def test_numerics_first_layers_get_more_bits():
    _, low, dense = _run("stories260K", "quantize-kv{method=xquant,bits=2,group=8,residual=4}")
    _, mixed, _ = _run(
        "stories260K", "quantize-kv{method=xquant,bits=2,group=8,residual=4,first_layers=2,first_bits=4}"
    )
    assert (mixed - dense).pow(2).mean() < (low - dense).pow(2).mean()


@pytest.mark.parametrize("method", ["kivi", "xquant,latent=x", "xquant,latent=svd", "xquant-cl"])
def test_numerics_rotate_is_lossless_without_quantization_and_changes_the_error(method):
    _, off, dense = _run("stories260K", f"quantize-kv{{method={method},bits=16,group=8,rotate=true}}")
    assert (off - dense).abs().max().item() < 2e-2  # R Rᵀ = I: only the float16 rounding remains
    spec = f"quantize-kv{{method={method},bits=2,group=8,residual=4,rotate=%s}}"
    r_plain, plain, _ = _run("stories260K", spec % "false")
    r_rot, rot, _ = _run("stories260K", spec % "true")
    assert not torch.allclose(plain, rot)
    assert 0 < (rot - dense).pow(2).mean().item() < 0.1  # still a working quantized cache
    assert r_rot.reports[-1].kv_bytes_per_token == r_plain.reports[-1].kv_bytes_per_token


def test_rotation_is_orthogonal_block_hadamard():
    from condfx.passes.quantize_kv import hadamard, rotation

    r = rotation(192)  # three 64-blocks
    torch.testing.assert_close(r @ r.T, torch.eye(192, dtype=torch.float64))
    torch.testing.assert_close(r[:64, :64], hadamard(64))
    assert r[:64, 64:].abs().max() == 0 and hadamard(4)[1].tolist() == [0.5, -0.5, 0.5, -0.5]


@pytest.mark.parametrize("method", ["kivi", "xquant,latent=svd"])
def test_numerics_separate_k_and_v_bits(method):
    spec = f"quantize-kv{{method={method},bits=2,group=8,residual=4,context=512%s}}"
    results = {opt: _run("stories260K", spec % opt) for opt in ("", ",k_bits=4", ",v_bits=4",
                                                                 ",k_bits=32,v_bits=32")}
    dense = results[""][2]
    err = {opt: (out - dense).pow(2).mean().item() for opt, (_, out, _) in results.items()}
    assert err[",k_bits=4"] < err[""] and err[",v_bits=4"] < err[""]
    assert err[",k_bits=32,v_bits=32"] < 1e-10  # both off: the exact path
    base = results[""][0].reports[-1].kv_bytes_per_token
    # 5 layers x 32 channels x 2 more bits per value, for the quantized tokens of one stream
    gm = results[",k_bits=4"][0].graph_module
    assert gm.meta["condfx_kv_quant"][0]["k_bits"] == 4 and gm.meta["condfx_kv_quant"][0]["v_bits"] == 2
    k_extra = results[",k_bits=4"][0].reports[-1].kv_bytes_per_token - base
    v_extra = results[",v_bits=4"][0].reports[-1].kv_bytes_per_token - base
    assert k_extra == pytest.approx(5 * 8 * (512 - 8) / 512)  # K leaves the window in chunks of 8
    assert v_extra == pytest.approx(5 * 8 * (512 - 4) / 512)


def test_golden_llama_tiny_kivi_layer0():
    result, _, _ = _run("llama-tiny", "fuse-attention, quantize-kv{method=kivi,bits=2,group=4,residual=3}")
    lines = graph_text(result.graph_module).splitlines()
    first = next(i for i, line in enumerate(lines) if "quantized_cache_attention" in line)
    keep = [line for line in lines[: first + 1] if any(w in line for w in ("condfx.", "flatten", "permute"))]
    assert_expected_inline("\n".join(keep), """\
%42 = aten.permute.default(%41, [0, 2, 1, 3])
%43 = aten.flatten.using_ints(%42, 2)
%44 = condfx.fake_group_quantize.default(%43, 2, 4, -1)
%45 = aten.unflatten.int(%44, 2, [2, 16])
%46 = aten.permute.default(%45, [0, 2, 1, 3])
%47 = condfx.fake_group_quantize.default(%40, 2, 4, -2)
%48 = condfx.quantized_cache_attention.default(%32, %40, %41, %47, %46, 0.25, 0, 3, 4, 1, 0)""")


def test_idempotent_second_run_not_modified():
    result, _, _ = _run("llama-tiny", "quantize-kv{method=kivi,bits=2,group=8}")
    again = QuantizeKV(QuantizeKVConfig(method="kivi", bits=2, group=8))(result.graph_module)
    assert not again.modified and again.report.skipped[0][0] == "already quantized"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bits": 5}, r"bits must be one of \(2, 3, 4, 16, 32\); got 5"),
        ({"method": "kvquant"}, r"method must be one of \{xquant, xquant-cl, kivi\}"),
        ({"residual": 64, "context": 32}, "residual 64 is longer than the context 32"),
        ({"group": 0}, "group must be an int >= 1"),
        ({"latent": "pca"}, r"latent must be one of \{auto, x, svd, klt\}"),
        ({"k_budget": 3.0}, "k_budget applies to latent=klt only; got latent=auto"),
        ({"latent": "klt", "v_budget": -1}, r"v_budget must be a number of bits per channel in \[0, 32\]"),
        ({"latent": "klt", "method": "kivi"}, "latent=klt is a latent of method=xquant; got method=kivi"),
        ({"k_bits": 5}, r"k_bits must be 0 \(use bits\) or one of \(2, 3, 4, 16, 32\); got 5"),
        ({"rotate": "yes"}, "rotate must be a bool; got 'yes'"),
        ({"method": "xquant-cl", "v_bits": 2}, "need separate K and V streams; xquant-cl caches one"),
        ({"latent": "x", "k_bits": 2}, "need separate K and V streams; xquant with latent=x caches one"),
    ],
)
def test_rejects_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        QuantizeKVConfig(**options)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("quantize-kv{method=kivi,group=48}", r"group 48 must divide the K/V width \(heads x head dim\) 32"),
        ("quantize-kv{method=xquant-cl,group=48}", "group 48 must divide the model dimension 64"),
    ],
)
def test_rejects_group_not_dividing(spec, match):
    gm, _, _ = _captured("llama-tiny")
    before = graph_text(gm)
    with pytest.raises((ValueError, PassError), match=match):
        condfx.apply(gm, spec)
    assert graph_text(gm) == before  # the caller's module is untouched


def test_rejects_k_v_bits_when_a_layer_caches_x():
    gm, _, _ = _captured("stories260K")  # d = 2 d_kv: latent=auto caches X
    before = graph_text(gm)
    with pytest.raises((ValueError, PassError), match="k_bits 4 and v_bits 2 differ, but layer 0 caches X"):
        condfx.apply(gm, "quantize-kv{method=xquant,bits=2,k_bits=4,group=8}")
    assert graph_text(gm) == before


def test_rejects_model_without_attention():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    gm = condfx.capture(model, (torch.zeros(2, 4, dtype=torch.long),))
    with pytest.raises(PassError, match="found no attention region"):
        condfx.apply(gm, "quantize-kv{method=kivi}")


def test_rejects_fused_qkv_for_xquant_with_reason():
    gm, _, _ = _captured("gpt2-tiny")
    result = QuantizeKV(QuantizeKVConfig(method="xquant", group=8))(copy.deepcopy(gm))
    assert not result.modified
    assert {r for r, _ in result.report.skipped} == {"fused qkv projection"}


def test_numerics_session_decoding_equals_teacher_forced_stories260k():
    """Prefill 10 tokens, then one-token and multi-token steps through the Session's packed KIVI
    caches (the decode graph reads and updates them): the logits equal one forward of the
    quantize-kv graph (the teacher-forced evaluation)."""
    spec = "fuse-attention, quantize-kv{method=kivi,bits=2,group=8,residual=4,sink=1}"
    _, teacher, dense = _run("stories260K", spec)
    _, ids, _ = _captured("stories260K")
    session = Session.from_model(_stories(), passes=spec)
    steps = [session.prefill(ids[:, :10])]
    steps += [session.step(ids[:, t : t + 1]) for t in range(10, 30)]
    steps += [session.step(ids[:, 30:35]), session.step(ids[:, 35:40])]  # whole groups at once
    decoded = torch.cat(steps, 1)
    assert (decoded - teacher).abs().max().item() < 1e-3
    assert (teacher - dense).abs().max().item() > 0.1  # the cache really is quantized
    caches = session.caches
    k_codes, k_scale, k_zero, k_fp, v_codes, _, _, v_fp = caches[0].past()
    assert caches.nbytes() == sum(t.nbytes for c in caches.caches for t in c.past())
    assert k_codes.dtype == torch.uint8 and k_scale.dtype == torch.float16
    # 40 tokens, 1 sink, residual 4: K whole groups of 8 (32 packed), V per token (35 packed)
    assert (k_codes.shape[2], k_scale.shape[2], k_fp.shape[2]) == (32, 4, 8)
    assert (v_codes.shape[2], v_fp.shape[2]) == (35, 5)
    assert session.position == 40


# CI keeps latent=x (20-60 s each on stories260K); the others run under -m slow
@pytest.mark.parametrize("latent", ["x", *(pytest.param(v, marks=pytest.mark.slow) for v in ("svd", "cl", "svd,rotate=true,k_bits=4"))])
def test_numerics_session_xquant_decoding_equals_teacher_forced_stories260k(latent):
    """XQuant in decode form: the graph packs X (the SVD latents; CL: the deltas) into its stream and
    re-runs the k/v path over every cached token; prefill + 1-token and 5-token steps equal one forward."""
    method = "xquant-cl" if latent == "cl" else f"xquant,latent={latent}"  # rotated, K/V bits apart too
    spec = f"fuse-attention, quantize-kv{{method={method},bits=2,group=8,residual=4,sink=1}}"
    _, teacher, dense = _run("stories260K", spec)
    _, ids, _ = _captured("stories260K")
    session = Session.from_model(_stories(), passes=spec)
    steps = [session.prefill(ids[:, :10])] + [session.step(ids[:, t : t + 1]) for t in range(10, 30)]
    steps += [session.step(ids[:, 30:35]), session.step(ids[:, 35:40])]
    assert (torch.cat(steps, 1) - teacher).abs().max().item() < 1e-3
    assert (teacher - dense).abs().max().item() > 0.1
    past = session.caches[0].past()
    svd = latent.startswith("svd")
    assert len(past) == (8 if svd else 4) and past[0].dtype == torch.uint8
    # 40 tokens - 1 sink - 4 residual: 35 per token (X, V latent), 32 in whole groups (K latent)
    assert [t.shape[2] for t in past[::4]] == ([32, 35] if svd else [35])


@pytest.mark.parametrize("latent", ["x", pytest.param("svd", marks=pytest.mark.slow)])
def test_numerics_session_xquant_16_bits_equals_teacher_forced_stories260k(latent):
    """XQuant with 16 bits decodes through a float16 stream (its quantized tokens stored as float16
    values): prefill + 1-token and 5-token steps equal one forward of the quantize-kv graph."""
    spec = f"fuse-attention, quantize-kv{{method=xquant,latent={latent},bits=16,group=8,residual=4,sink=1}}"
    _, teacher, _ = _run("stories260K", spec)
    _, ids, _ = _captured("stories260K")
    session = Session.from_model(_stories(), passes=spec)
    steps = [session.prefill(ids[:, :10])] + [session.step(ids[:, t : t + 1]) for t in range(10, 30)]
    steps += [session.step(ids[:, 30:35]), session.step(ids[:, 35:40])]
    assert (torch.cat(steps, 1) - teacher).abs().max().item() < 1e-3
    past = session.caches[0].past()
    assert past[0].dtype == torch.float16 and past[1].numel() == 0  # float16 values, no scales
    assert session.cache_bytes() == sum(layout.nbytes(40, batch=2) for layout in session.backend.layers)


# CI keeps the combined case (split bits and rotation); each alone runs under -m slow
@pytest.mark.parametrize("opt", ["k_bits=3,rotate=true", *(pytest.param(v, marks=pytest.mark.slow) for v in ("rotate=true", "k_bits=4", "k_bits=16"))])
def test_numerics_session_rotated_or_split_bits_kivi_equals_teacher_forced_stories260k(opt):
    """Rotated and split-bit KIVI decode through packed K and V streams (``quantized_stream``, the
    path from each fake-quantize node re-run over the cached tokens): prefill + 1-token and 5-token
    steps equal one forward of the quantize-kv graph."""
    spec = f"fuse-attention, quantize-kv{{method=kivi,bits=2,group=8,residual=4,sink=1,{opt}}}"
    _, teacher, dense = _run("stories260K", spec)
    _, ids, _ = _captured("stories260K")
    session = Session.from_model(_stories(), passes=spec)
    steps = [session.prefill(ids[:, :10])] + [session.step(ids[:, t : t + 1]) for t in range(10, 30)]
    steps += [session.step(ids[:, 30:35]), session.step(ids[:, 35:40])]
    assert (torch.cat(steps, 1) - teacher).abs().max().item() < 1e-3
    assert (teacher - dense).abs().max().item() > 0.1
    layout = session.backend.layers[0]
    assert [(st.name, st.dim) for st in layout.streams] == [("k", -2), ("v", -1)]
    past = session.caches[0].past()
    assert past[4].dtype == torch.uint8 and [t.shape[2] for t in past[::4]] == [32, 35]
    assert session.cache_bytes() == sum(layout.nbytes(40, batch=2) for layout in session.backend.layers)


def _klt_gm(flat: bool = False):
    """stories260K captured, with q/k/v second moments: recorded on its own tokens, or flat (identity
    moments, so the bit allocation spreads over several runs of bits)."""
    from condfx.kv_calibrate import META_KEY, LayerKVStats, record_kv_stats

    gm, ids, _ = _captured("stories260K")
    gm = copy.deepcopy(gm)
    record_kv_stats(gm, [ids[:, :40]])
    if flat:
        gm.meta[META_KEY] = {layer: LayerKVStats(k=torch.eye(32, dtype=torch.float64), v=torch.eye(32, dtype=torch.float64),
                                                 q=torch.eye(8, dtype=torch.float64).expand(4, 8, 8), tokens=1)
                             for layer in gm.meta[META_KEY]}
    return gm


@pytest.mark.parametrize(("flat", "budgets"),
                         [pytest.param(False, "k_budget=14,v_budget=14", marks=pytest.mark.slow), (True, "k_budget=10.75,v_budget=16")])
def test_numerics_session_klt_decoding_equals_teacher_forced_stories260k(flat, budgets):
    """latent=klt in decode form (budgets that keep every coefficient): one packed stream per run of
    equal bits; prefill + 1-token and 5-token steps equal one forward."""
    spec = f"fuse-attention, quantize-kv{{method=xquant,latent=klt,group=4,residual=4,sink=1,{budgets}}}"
    gm, (_, ids, dense) = _klt_gm(flat), _captured("stories260K")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        teacher = _logits(condfx.apply(gm, spec).graph_module(ids)).detach()
        session = Session.from_graph(condfx.apply(gm, f"{spec}, add-kv-cache").graph_module)
    steps = [session.prefill(ids[:, :10])] + [session.step(ids[:, t : t + 1]) for t in range(10, 30)]
    steps += [session.step(ids[:, 30:35]), session.step(ids[:, 35:40])]
    assert (torch.cat(steps, 1) - teacher).abs().max().item() < 1e-3
    assert (teacher - dense).abs().max().item() > 0.01
    streams = session.backend.layers[0].streams
    assert sum(st.channels for st in streams if st.name.startswith("k")) == 32
    assert len(streams) > (2 if flat else 1)
    assert session.caches.nbytes() == sum(t.nbytes for c in session.caches.caches for t in c.past())


def test_klt_drops_coefficients_from_quantized_tokens_only():
    """A tight budget drops the low-variance coefficients from the quantized tokens (0-bit streams that
    keep only the full-precision tail: the residual window reads exact K / V); the Session decodes it."""
    spec = "fuse-attention, quantize-kv{method=xquant,latent=klt,group=4,residual=4,sink=1,k_budget=4,v_budget=6}"
    gm, (_, ids, dense) = _klt_gm(), _captured("stories260K")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result = condfx.apply(gm, spec)
        session = Session.from_graph(condfx.apply(gm, f"{spec}, add-kv-cache").graph_module)
    assert all(q["dropped"] > 0 for q in result.graph_module.meta["condfx_kv_quant"])
    teacher = _logits(result.graph_module(ids)).detach()
    assert (teacher[:, :5] - dense[:, :5]).abs().max().item() < 1e-4  # sink + residual only: exact
    assert (teacher - dense).abs().max().item() > 0.01
    steps = [session.prefill(ids[:, :10])] + [session.step(ids[:, t : t + 1]) for t in range(10, 30)]
    steps += [session.step(ids[:, 30:35]), session.step(ids[:, 35:40])]
    assert (torch.cat(steps, 1) - teacher).abs().max().item() < 1e-3
    streams = session.backend.layers[0].streams
    dropped = [st for st in streams if st.bits == 0]
    assert dropped and sum(st.channels for st in streams if st.name.startswith("k")) == 32
    past = dict(zip(session.backend.layers[0].io_names(), session.caches[0].past(), strict=True))
    d = next(f"{st.name}_0" for st in dropped)
    assert past[f"{d}_codes"].shape[-1] == 0 and past[f"{d}_scale"].numel() == 0  # nothing quantized kept
    # full precision: sink 1 + residual 4 (V, per token), + whole 4-token chunks (K, per channel)
    assert past[f"{d}_fp"].shape[2] == (8 if d.startswith("k") else 5)
    rep = result.reports[-1]
    assert rep.fp16_bytes_per_token / rep.kv_bytes_per_token > 2.5


def test_klt_bits_32_is_dense_without_statistics():
    result, out, dense = _run("stories260K", "quantize-kv{method=xquant,latent=klt,bits=32,group=8}")
    assert result.reports[-1].rewritten == 5 and (out - dense).abs().max().item() < 1e-5


def test_rejects_klt_budget_that_buys_nothing():
    gm = _klt_gm()
    with pytest.raises((ValueError, PassError), match=r"a k budget of 0.5 bits per channel buys nothing in layer 0; "
                       r"one block of 8 coefficients at 2 bits needs 1.5\."):
        condfx.apply(gm, "quantize-kv{method=xquant,latent=klt,group=8,k_budget=0.5,v_budget=4}")


def test_rejects_klt_without_statistics():
    with pytest.raises((ValueError, PassError), match="latent=klt needs calibration statistics for layer 0: run"):
        _run("stories260K", "quantize-kv{method=xquant,latent=klt,bits=2,group=8}")


def test_allocate_bits_spends_within_budget_and_follows_the_variance():
    from condfx.kv_calibrate import allocate_bits

    lam = torch.tensor([100.0] * 4 + [10.0] * 4 + [1e-4] * 4, dtype=torch.float64)
    bits = allocate_bits(lam, 4, 3 * 12)  # 36 bits: one block at 4 bits (16 + 32) does not fit
    assert bits == [0, 0, 0]
    bits = allocate_bits(lam, 4, 4 * 12 + 32)
    assert bits == sorted(bits, reverse=True) and bits[-1] == 0  # the near-empty block is dropped
    assert sum(4 * b + 32 * (b > 0) for b in bits) <= 4 * 12 + 32
    assert allocate_bits(lam, 4, 1000) == [4, 4, 4]
    # a drop penalty keeps the second block rather than a fourth bit on the first
    assert allocate_bits(lam[:8], 4, 80, drop=1.0) != allocate_bits(lam[:8], 4, 80, drop=100.0)
