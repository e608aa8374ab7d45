"""Thin hybrid models: config and layer map, decode == prefill, caches, padding, generation, save/load."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastattn.models import PRESETS, HybridConfig, HybridLM, cache_nbytes, hybrid_layer_map
from fastattn.models.kda import causal_conv
from test_models_utils import TINY, make_model, rel

# ---- config and layer map ------------------------------------------------------------------------------


def test_layer_map_reference_and_small_depths():
    assert hybrid_layer_map(28) == (0, 2, 6, 11, 13, 18, 21)
    assert hybrid_layer_map(8) == (0, 5)
    assert hybrid_layer_map(4) == (0,)
    assert hybrid_layer_map(1) == (0,)
    cfg = HybridConfig.from_preset("hybrid-kda")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "attention"] == [0, 2, 6, 11, 13, 18, 21]
    assert HybridConfig.from_preset("hybrid-kda-eva").layer_types == tuple(
        "eva" if t == "attention" else t for t in cfg.layer_types)
    assert set(HybridConfig.from_preset("eva").layer_types) == {"eva"}
    assert set(HybridConfig.from_preset("attention").layer_types) == {"attention"}


@given(st.integers(1, 96))
def test_layer_map_rule(depth):
    kept = hybrid_layer_map(depth)
    assert kept[0] == 0 and list(kept) == sorted(set(kept)) and kept[-1] < depth
    assert len(kept) == min(depth, max(1, round(7 * depth / 28)))


BAD_CONFIGS = [
    (dict(num_attention_heads=3, num_key_value_heads=2), ValueError, "multiple of"),
    (dict(head_dim=15), ValueError, "head_dim must be even"),
    (dict(head_dim=512), ValueError, "head_dim must be <= 256"),
    (dict(layer_types=("attention",) * 3), ValueError, "num_hidden_layers=4"),
    (dict(layer_types=("attention", "mamba", "kda", "kda")), ValueError, r"layer_types\[1\]"),
    (dict(layer_types="attention"), TypeError, "sequence of mixer names"),
    (dict(hidden_size=0), ValueError, "hidden_size must be >= 1"),
    (dict(hidden_size=32.0), TypeError, "hidden_size must be an int"),
    (dict(kda_lower_bound=-6.0), ValueError, "kda_lower_bound"),
    (dict(kda_chunk_size=48), ValueError, "kda_chunk_size"),
    (dict(kda_conv_activation="gelu"), ValueError, "kda_conv_activation"),
    (dict(eva_window_size=10, eva_chunk_size=4), ValueError, "multiple of"),
    (dict(eva_local="global"), ValueError, "eva_local"),
    (dict(rms_norm_eps=0.0), ValueError, "rms_norm_eps"),
    (dict(pad_token_id=97), ValueError, "pad_token_id"),
]


@pytest.mark.parametrize("changes,exc,match", BAD_CONFIGS)
def test_bad_configs_rejected(changes, exc, match):
    with pytest.raises(exc, match=match):
        HybridConfig(**{**TINY, **changes})


def test_bad_preset_and_dict():
    with pytest.raises(ValueError, match="preset must be one of"):
        HybridConfig.from_preset("mamba", **TINY)
    with pytest.raises(ValueError, match="derives layer_types"):
        HybridConfig.from_preset("eva", layer_types=("eva",) * 4, **TINY)
    d = HybridConfig(**TINY).to_dict()
    assert HybridConfig.from_dict(d) == HybridConfig(**TINY)
    with pytest.raises(ValueError, match="unknown config keys"):
        HybridConfig.from_dict({**d, "num_experts": 8})
    with pytest.raises(ValueError, match="model_type"):
        HybridConfig.from_dict({**d, "model_type": "qwen3"})
    with pytest.raises(TypeError, match="HybridConfig"):
        HybridLM(d)


# ---- decode == prefill ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return make_model(request.param)


@pytest.mark.parametrize("split", [1, 7, 19])
def test_decode_equals_full_forward(model, split):
    """Prefill of `split` tokens, then one token at a time, equals one forward (and its cache bytes the formula)."""
    torch.manual_seed(1)
    T, B = 27, 2
    ids = torch.randint(0, TINY["vocab_size"], (B, T))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(B)
        parts = [model(ids[:, :split], cache=cache)]
        for t in range(split, T):
            parts.append(model(ids[:, t:t + 1], cache=cache))
            assert cache.nbytes == cache_nbytes(model.config, B, t + 1, torch.float32)["total"]
    assert rel(torch.cat(parts, 1), full) < 1e-5


def test_chunked_prefill_equals_full_forward(model):
    """Several multi-token calls (attention past masks, KDA state + conv tail across chunks, EVA decode)."""
    torch.manual_seed(2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 60))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, capacity=8)          # forces the KV buffers to grow
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 20), (20, 41), (41, 43), (43, 60))]
    assert rel(torch.cat(parts, 1), full) < 1e-5
    assert cache.length == 60
    by = cache.nbytes_by_mixer()
    assert by == cache_nbytes(model.config, 2, 60, torch.float32)


@pytest.mark.parametrize("options", [dict(kda_lower_bound=-5.0), dict(kda_conv_activation="silu", kda_conv_size=2),
                                     dict(kda_gate_rank=4, kda_chunk_size=32)])
def test_kda_options_decode_equals_full_forward(options):
    m = make_model("hybrid-kda", **options)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2)
        parts = [m(ids[:, :33], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(33, 40)]
    assert rel(torch.cat(parts, 1), full) < 1e-5


def test_logits_to_keep_and_hidden_states(model):
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        full, hidden = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
    assert len(hidden) == TINY["num_hidden_layers"] + 1 and hidden[0].shape == (1, 9, TINY["hidden_size"])
    assert last.shape == (1, 1, TINY["vocab_size"]) and rel(last, full[:, -1:]) < 1e-6


def test_training_forward_has_gradients():
    m = make_model("hybrid-kda-eva")
    m.train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    m(ids).logsumexp(-1).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith(("A_log", "dt_bias", "q_proj.weight", "mu", "phi")):
            assert p.grad.abs().sum() > 0, name


# ---- KDA layer pieces ----------------------------------------------------------------------------------

def test_causal_conv_tail_and_identity_init():
    x = torch.randn(2, 11, 6)
    w, b = torch.randn(6, 1, 4), torch.randn(6)
    full, _ = causal_conv(x, w, b, None, keep_tail=False)
    y1, tail = causal_conv(x[:, :2], w, b, None, keep_tail=True)      # shorter than the conv window
    y2, tail = causal_conv(x[:, 2:3], w, b, tail, keep_tail=True)
    y3, _ = causal_conv(x[:, 3:], w, b, tail, keep_tail=True)
    assert rel(torch.cat([y1, y2, y3], 1), full) < 1e-6
    mixer = HybridLM(HybridConfig.from_preset("hybrid-kda", **TINY)).layers[1].mixer
    xc = torch.randn(2, 11, mixer.conv_weight.shape[0])
    ident, _ = causal_conv(xc, mixer.conv_weight, mixer.conv_bias, None, keep_tail=False)
    assert torch.equal(ident, xc)
    A = mixer.A_log.exp()
    assert torch.all(mixer.g_b.weight == 0) and bool(((A >= 1 - 1e-5) & (A <= 16 + 1e-4)).all())


def test_in_proj_matches_separate_projections_and_follows_weight_updates():
    """The KDA layer's one-matmul in-projection (weights concatenated and kept at inference) equals the six
    separate projections, is rebuilt after an in-place update or a cast, and passes gradients to every weight."""
    m = make_model("hybrid-kda", attention_bias=True).eval()
    mixer = next(layer.mixer for layer in m.layers if layer.mixer_type == "kda")
    x = torch.randn(2, 7, TINY["hidden_size"])

    def separate(x):
        qkv = torch.cat([mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)], dim=-1)
        return qkv, mixer.f_a(x), mixer.g_a(x), mixer.b_proj(x)

    def check(x):
        with torch.no_grad():
            got, want = mixer.in_proj(x), separate(x)
        assert [t.shape for t in got] == [t.shape for t in want]
        for a, b in zip(got, want):
            assert rel(a, b) < 1e-6

    check(x)
    assert "in_proj" in mixer.derived._store        # kept: eval mode, no gradient
    with torch.no_grad():
        mixer.k_proj.weight.add_(0.5)
        mixer.b_proj.weight.mul_(-2.0)
        mixer.q_proj.bias.add_(1.0)
    check(x)
    m.double()
    check(x.double())
    assert mixer._gate_params()[0].dtype == torch.float32
    with torch.no_grad():
        mixer.A_log.add_(0.25)
    assert torch.equal(mixer._gate_params()[0], mixer.A_log.float())
    sum(t.sum() for t in mixer.in_proj(x.double())).backward()
    for proj in (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.f_a, mixer.g_a, mixer.b_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert mixer.q_proj.bias.grad is not None


def test_derived_weights_kept_only_when_safe():
    """The kept in-projection is used only in eval mode without gradients or tracers; train()/eval() and .to()
    drop it (wrappers such as FSDP rewrite parameters without bumping their version); a model built under
    inference_mode (parameters without a version counter) runs, and so do frozen parameters with an input that
    needs a gradient afterwards."""
    m = make_model("hybrid-kda").train()
    mixer = next(layer.mixer for layer in m.layers if layer.mixer_type == "kda")
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        m(ids)
    assert not mixer.derived._store                 # training mode: built per call
    m.eval()
    with torch.no_grad():
        before = m(ids)
    assert mixer.derived._store
    with torch.no_grad():
        mixer.v_proj.weight.data.copy_(torch.randn_like(mixer.v_proj.weight))   # no version bump
    m.eval()                                        # clears: the change is seen
    assert not mixer.derived._store
    with torch.no_grad():
        after = m(ids)
    assert rel(after, before) > 1e-3
    m.double()
    assert not mixer.derived._store
    m.float()

    with torch.inference_mode():
        built_there = make_model("hybrid-kda").eval()
        assert torch.isfinite(built_there(ids)).all()
    with torch.inference_mode():
        m(ids)                                      # kept tensors are now inference tensors
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 20, TINY["hidden_size"], requires_grad=True)
    info = m._step_info(ids, None, None)
    mixer(x, info).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_kda_model_compiles_fullgraph():
    """torch.compile sees the per-call concatenation (no storage-pointer checks while tracing)."""
    m = make_model("hybrid-kda").eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        ref = m(ids)
        out = torch.compile(m, fullgraph=True, backend="eager")(ids)
    assert rel(out, ref) < 1e-6


def test_kda_model_same_logits_with_and_without_grad():
    """The cached inference weights and the per-call concatenation of the training path agree."""
    m = make_model("hybrid-kda")
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        inference = m(ids)
    training = m(ids)
    assert training.requires_grad
    assert rel(training.detach(), inference) < 1e-6


# ---- cache sizes ---------------------------------------------------------------------------------------

def test_cache_formula_qwen3_0_6b():
    """Research note section 7: 4096 B/token/layer, 14 GiB at 128K, Hybrid-KDA keeps < 26 %."""
    GiB = 2 ** 30
    base = HybridConfig()
    assert cache_nbytes(base, 1, 1)["attention"] == 4096 * 28
    assert cache_nbytes(base, 1, 131072)["total"] == 14 * GiB
    hyb = cache_nbytes(base.with_preset("hybrid-kda"), 1, 131072)
    assert hyb["attention"] == 3.5 * GiB
    assert hyb["kda"] == 21 * (2 ** 20 + (16 + 16) * 128 * 3 * 2)
    assert hyb["total"] / (14 * GiB) < 0.26
    eva = cache_nbytes(base.with_preset("eva"), 1, 131072)
    assert eva["total"] == 28 * 2 * 8 * 128 * 2 * (0 + 131072 // 16)


# ---- padding and generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["attention", "hybrid-kda"])
def test_left_padding_matches_unpadded_rows(preset):
    m = make_model(preset)
    torch.manual_seed(3)
    a, b = torch.randint(1, 97, (1, 13)), torch.randint(1, 97, (1, 6))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        cache = m.new_cache(2)
        out = m(ids, cache=cache, attention_mask=mask)
        step = m(torch.tensor([[5], [9]]), cache=cache)
        ref_a, ref_b = m(torch.cat([a, torch.tensor([[5]])], 1)), m(torch.cat([b, torch.tensor([[9]])], 1))
    assert rel(out[0], ref_a[0, :13]) < 1e-5 and rel(out[1, 7:], ref_b[0, :6]) < 1e-5
    assert rel(step[0], ref_a[0, 13:]) < 1e-5 and rel(step[1], ref_b[0, 6:]) < 1e-5


def test_bad_masks_rejected():
    m = make_model("hybrid-kda-eva")
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="eva layers"):
        m(ids, attention_mask=torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]))
    m = make_model("attention")
    with pytest.raises(ValueError, match="left padding only"):
        m(ids, attention_mask=torch.tensor([[1] * 5, [1, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="shape of input_ids"):
        m(ids, attention_mask=torch.ones(2, 4))
    cache = m.new_cache(2)
    m(ids, cache=cache)
    with pytest.raises(ValueError, match="cannot be padded again"):
        m(ids[:, :2], cache=cache, attention_mask=torch.tensor([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="batch size"):
        m(ids[:1], cache=cache)
    with pytest.raises(TypeError, match="int64"):
        m(ids.float())


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_ragged_batch_equals_single_prompts(preset):
    m = make_model(preset)
    prompts = [list(range(1, 21)), [4, 5, 9], [7] * 11]
    out = m.generate(prompts, max_new_tokens=10)
    assert out.shape == (3, 10)
    for i, p in enumerate(prompts):
        assert torch.equal(out[i], m.generate([p], max_new_tokens=10)[0])


def test_generate_stop_tokens_and_sampling():
    m = make_model("hybrid-kda")
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]
    free = m.generate(prompts, max_new_tokens=8)
    stop = int(free[0, 2])
    out = m.generate(prompts, max_new_tokens=8, eos_token_id=[stop], pad_token_id=0)
    first = int((free[0] == stop).nonzero()[0])
    assert torch.equal(out[0, :first + 1], free[0, :first + 1]) and torch.all(out[0, first + 1:] == 0)
    hits = (free[1] == stop).nonzero()
    if len(hits) == 0:
        assert torch.equal(out[1], free[1, :out.shape[1]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = m.generate(prompts, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, generator=g1)
    s2 = m.generate(prompts, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2) and s1.shape == (2, 6)
    greedy = m.generate(prompts, max_new_tokens=6, do_sample=True, top_k=1, generator=g1)
    assert torch.equal(greedy, free[:, :6])
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(prompts, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="eos_token_id"):
        m.generate(prompts, eos_token_id=1000)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate([[1, 2], []])


# ---- save / load ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    m = make_model("hybrid-kda-eva", dtype=dtype, tie_word_embeddings=False, eos_token_id=3)
    m.save_pretrained(tmp_path)
    back = HybridLM.from_pretrained(tmp_path)
    assert back.config == m.config and back.dtype == dtype
    for (k, v), (k2, v2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    if dtype == torch.float32:
        ids = torch.randint(0, 97, (1, 12))
        with torch.no_grad():
            assert torch.equal(m(ids), back(ids))
    cfg = (tmp_path / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 64')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="do not match the config"):
        HybridLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridLM.from_pretrained(tmp_path / "missing")
