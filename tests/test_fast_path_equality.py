"""Issue 17: every change of the inference fast path against the plain path it replaces.

Per-prompt cache (text projection and cross-attention K/V once per segment prompt), the one-pass
importance (log-sum-exp from the attention, then exp(q.k - lse) over the context keys only), RoPE as one
complex multiply, fused modulation/gating kernels, and the arena skipping parts that did not move.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import egolcd.attention as attention_module
from egolcd.attention import (
    LayerKV,
    apply_rope,
    apply_rope_complex,
    attention,
    attention_and_mass,
    attention_mass,
    grid_positions,
    rope_cos_sin,
    rope_freqs,
    rope_freqs_at,
    rope_split,
)
from egolcd.bench import BenchConfig, run_policy
from egolcd.flow import get_sampler, get_sigmas
from egolcd.memory import ContextArena, MemoryPolicy
from egolcd.pipeline import generate_chunk
from egolcd.transformer import EgoLCDTransformer3DModel, PromptCache

pytestmark = pytest.mark.usefixtures("one_thread_module")

from test_fast_path import LATENT_HW, PRESET, K, make_inputs  # noqa: E402  (the same tiny inputs)

RESERVE = K * (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)


def make_model(fast: bool = True) -> EgoLCDTransformer3DModel:
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel.from_preset("tiny").eval()
    model.fast_path = fast
    return model


def random_context(model, tokens: int = 40, seed: int = 2) -> list[LayerKV]:
    g = torch.Generator().manual_seed(seed)
    h, d = model.config.num_attention_heads, model.config.attention_head_dim
    return [
        LayerKV(
            torch.randn(1, tokens, h, d, generator=g), torch.randn(1, tokens, h, d, generator=g),
            torch.randint(0, 6, (1, tokens, 3), generator=g),
        ).with_rotary()
        for _ in range(model.num_layers)
    ]


@torch.inference_mode()
def run_loop(model, policy_name: str, chunks: int, *, cached: bool, reuse: bool, stride: int = 1):
    """``chunks`` chunks through ``generate_chunk`` (segments change every 2 chunks, so retrieval moves)."""
    memory = replace(PRESET.memory, importance_query_stride=stride)
    policy = MemoryPolicy.from_name(policy_name, K, memory)
    state = policy.init_state()
    arena = ContextArena(reserve=RESERVE, reuse=reuse)
    text, keys, noise = make_inputs(chunks)
    prompts = {}
    sigmas, sample = get_sigmas(2, 5.0), get_sampler("euler")
    outs = []
    for c in range(chunks):
        seg = (c // 2) % len(text)
        if seg not in prompts:
            prompts[seg] = model.prompt_cache(text[seg]) if cached else text[seg]
        x0, _ = generate_chunk(model, policy, state, noise[c], prompts[seg], keys[seg], seg, [], sigmas, sample,
                               arena=arena)
        outs.append(x0)
    return outs, state, arena


def test_prompt_cache_forward_equals_token_states():
    """Item 1: text projection and cross-attention K/V from a PromptCache give the same forward."""
    model = make_model()
    text, _, noise = make_inputs(1)
    ctx = random_context(model)
    t = torch.full((1, K), 700.0)
    with torch.inference_mode():
        cache = model.prompt_cache(text[0])
        assert isinstance(cache, PromptCache) and len(cache.cross_kv) == model.num_layers
        plain = model.forward_chunk(noise[0], t, text[0], ctx, 6, return_kv=True, return_attention_mass=True)
        cached = model.forward_chunk(noise[0], t, cache, ctx, 6, return_kv=True, return_attention_mass=True)
    assert torch.allclose(cached.sample, plain.sample, atol=1e-6, rtol=0)
    for a, b in zip(cached.kv, plain.kv):
        assert torch.allclose(a.key, b.key, atol=1e-6, rtol=0) and torch.allclose(a.value, b.value, atol=1e-6, rtol=0)
    for a, b in zip(cached.attention_mass, plain.attention_mass):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_prompt_cache_is_refused_with_gradients():
    """Training keeps the plain path: a cache made from frozen weights would hide the text path's gradient."""
    model = make_model()
    text, _, noise = make_inputs(1)
    cache = model.prompt_cache(text[0])
    with pytest.raises(ValueError, match="PromptCache is for inference"):
        model.forward_chunk(noise[0], torch.zeros(1, K), cache)


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("num_context", [0, 1, 150])
def test_one_pass_importance_equals_the_exact_softmax_mass(stride, num_context):
    """Item 2: mass from the attention's log-sum-exp equals the full-softmax mass (METHOD.md: mean over
    heads and queries), with the CPU kernel's lse and with the blocked fallback used on other devices."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 96, 4, 16, generator=g) * 2
    k = torch.randn(1, num_context + 96, 4, 16, generator=g) * torch.rand(1, num_context + 96, 1, 1, generator=g) * 2
    v = torch.randn(1, num_context + 96, 4, 16, generator=g)
    exact = attention_mass(q[:, ::stride], k, num_context)
    out, mass = attention_and_mass(q, k, v, num_context, stride, query_block=7, explicit_max=0)  # several blocks
    assert mass.shape == exact.shape == (1, num_context)
    assert torch.allclose(mass, exact, atol=1e-7, rtol=1e-4)
    assert torch.equal(out, attention(q, k, v))  # the same kernel as the plain attention on CPU
    kernel = attention_module._flash_cpu
    attention_module._flash_cpu = None
    try:
        out_fb, mass_fb = attention_and_mass(q, k, v, num_context, stride, explicit_max=0)
    finally:
        attention_module._flash_cpu = kernel
    assert torch.allclose(mass_fb, exact, atol=1e-7, rtol=1e-4)
    assert torch.allclose(out_fb, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("num_context", [0, 1, 150])
@pytest.mark.parametrize("start", [0, 1, 60])
def test_small_problems_take_one_explicit_softmax_with_the_same_mass(stride, num_context, start):
    """Below ``EXPLICIT_MASS_SCORES`` (the tiny preset's clean pass) one explicit softmax gives the output
    and the mass: the same quantities as the attention and the exact mass."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 32, 2, 12, generator=g) * 2
    k = torch.randn(1, num_context + 32, 2, 12, generator=g) * 2
    v = torch.randn(1, num_context + 32, 2, 12, generator=g)
    assert q.shape[2] * q.shape[1] * k.shape[1] <= attention_module.EXPLICIT_MASS_SCORES  # the default takes it
    exact = attention_mass(q[:, ::stride], k, num_context, start=min(start, num_context))
    for explicit_max in (None, 1 << 30):
        out, mass = attention_and_mass(q, k, v, num_context, stride, start=min(start, num_context),
                                       explicit_max=explicit_max)
        assert mass.shape == exact.shape == (1, num_context - min(start, num_context))
        assert torch.allclose(mass, exact, atol=1e-7, rtol=1e-5)
        assert torch.allclose(out, attention(q, k, v), atol=1e-5, rtol=1e-5)  # float rounding of sharp softmaxes
    _, kernel_mass = attention_and_mass(q, k, v, num_context, stride, start=min(start, num_context), explicit_max=0)
    assert torch.allclose(kernel_mass, exact, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("start", [0, 60, 150])
def test_mass_of_a_context_suffix_is_the_same_slice_of_the_whole_mass(start):
    """Scoring only context keys ``start ..`` (the window) gives exactly that slice of the whole mass, in
    the one-pass kernel and the plain softmax, and no key before ``start`` is scored."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 96, 4, 16, generator=g) * 2
    k = torch.randn(1, 150 + 96, 4, 16, generator=g)
    v = torch.randn(1, 150 + 96, 4, 16, generator=g)
    whole = attention_mass(q, k, 150)
    part = attention_mass(q, k, 150, start=start)
    _, fast = attention_and_mass(q, k, v, 150, start=start, query_block=7, explicit_max=0)
    assert part.shape == fast.shape == (1, 150 - start)
    assert torch.allclose(part, whole[:, start:], atol=1e-7, rtol=1e-5)
    assert torch.allclose(fast, whole[:, start:], atol=1e-7, rtol=1e-4)


def test_scoring_only_the_window_keeps_exactly_the_same_memory(monkeypatch):
    """The clean pass scores only the window's tokens (``MemoryPolicy.mass_start``): the only chunks that are
    sparsified by it. The store keeps the same tokens as when every context token is scored."""
    out, state, _ = run_loop(make_model(), "egolcd", 12, cached=True, reuse=True)
    monkeypatch.setattr(MemoryPolicy, "mass_start", lambda self, ctx: 0)
    ref_out, ref_state, _ = run_loop(make_model(), "egolcd", 12, cached=True, reuse=True)
    assert state.store.entries and len(state.store.entries) == len(ref_state.store.entries)
    for a, b in zip(state.store.entries, ref_state.store.entries):
        assert a.chunk == b.chunk and all(torch.equal(x.pos, y.pos) for x, y in zip(a.kv, b.kv))
    for c, (a, b) in enumerate(zip(out, ref_out)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"chunk {c}"


def test_complex_rope_equals_the_pairwise_rotation():
    """Item 3: RoPE as one complex multiply, into a new tensor, in place, and into a buffer slice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 4, 24, generator=g)
    pos = torch.randint(-5, 40, (2, 30, 3), generator=g)
    cos, sin = rope_cos_sin(pos, 24)
    ref = apply_rope(x, cos, sin)
    freqs = rope_freqs(cos, sin)
    assert torch.allclose(apply_rope_complex(x, freqs), ref, atol=1e-6, rtol=0)
    buf = torch.zeros(2, 50, 4, 24)
    apply_rope_complex(x, freqs, out=buf[:, 10:40])
    assert torch.allclose(buf[:, 10:40], ref, atol=1e-6, rtol=0) and not buf[:, :10].any() and not buf[:, 40:].any()
    y = x.clone()
    apply_rope_complex(y, freqs, out=y)
    assert torch.allclose(y, ref, atol=1e-6, rtol=0)


def test_rotary_tables_equal_wan_frequencies_computed_per_axis():
    """Item 3: cos/sin from the cached frequency table are bit-identical to Wan's per-axis float64 formula, and
    the complex factors made straight from positions equal those made from cos/sin."""
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(-50, 400, (2, 30, 3), generator=g)
    head_dim, theta = 24, 10000.0
    ref_cos, ref_sin = [], []
    for axis, dim in enumerate(rope_split(head_dim)):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = pos[..., axis].to(torch.float64)[..., None] * freqs
        ref_cos.append(angles.cos().repeat_interleave(2, dim=-1).float())
        ref_sin.append(angles.sin().repeat_interleave(2, dim=-1).float())
    cos, sin = rope_cos_sin(pos, head_dim, theta)
    assert torch.equal(cos, torch.cat(ref_cos, -1)[:, :, None]) and torch.equal(sin, torch.cat(ref_sin, -1)[:, :, None])
    assert torch.equal(rope_freqs_at(pos, head_dim, theta), rope_freqs(cos, sin))
    with torch.inference_mode():  # the table made under inference mode still serves training
        rope_cos_sin(pos, 30)
    q = torch.randn(2, 30, 4, 30, requires_grad=True)
    apply_rope(q, *rope_cos_sin(pos, 30)).sum().backward()
    assert q.grad is not None


def test_a_chunks_rotary_is_made_once_and_reused():
    """Item 3: the denoising steps and the clean pass of a chunk share one rotary (same tensors); another
    frame start gets its own, with the same values as the plain computation."""
    model = EgoLCDTransformer3DModel.from_preset("tiny").eval()
    a = model._chunk_rotary(1, K, 4, 4, 6, torch.device("cpu"))
    assert model._chunk_rotary(1, K, 4, 4, 6, torch.device("cpu"))[3] is a[3]
    b = model._chunk_rotary(1, K, 4, 4, 9, torch.device("cpu"))
    pos = grid_positions(1, K, 4, 4, frame_start=9)
    assert torch.equal(b[0], pos) and torch.equal(b[1], rope_cos_sin(pos, model.head_dim)[0])


def test_fast_block_kernels_equal_the_plain_path():
    """Item 3: fused modulation/gating (addcmul), complex RoPE and one-pass importance in one forward, the
    same token states in both, against ``fast_path = False``."""
    text, _, noise = make_inputs(1)
    t = torch.full((1, K), 300.0)
    outs = []
    for fast in (False, True):
        model = make_model(fast)
        with torch.inference_mode():
            outs.append(model.forward_chunk(noise[0], t, text[0], random_context(model), 6, return_kv=True,
                                            return_attention_mass=True))
    plain, fast = outs
    assert torch.allclose(fast.sample, plain.sample, atol=1e-5, rtol=0)
    for a, b in zip(fast.attention_mass, plain.attention_mass):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("policy", ["egolcd", "sink-window", "dense"])
def test_arena_reuse_equals_copying_everything(policy):
    """Item 3: parts that sit where they sat (sink, retrieved slots kept, dense history) are not copied or
    rotated again, and the chunks are the same as with every part copied."""
    model = make_model()
    ref, _, _ = run_loop(model, policy, 10, cached=True, reuse=False)
    out, _, arena = run_loop(model, policy, 10, cached=True, reuse=True)
    assert arena.reused_tokens > 0
    for c, (a, b) in enumerate(zip(out, ref)):
        assert torch.equal(a, b), f"chunk {c}: {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("policy", ["egolcd", "window", "sink-window", "dense"])
def test_whole_fast_path_equals_plain_path_and_keeps_the_same_memory(policy):
    """All of it together over 12 chunks: the same chunks within float tolerance, and the memory policy
    keeps and retrieves exactly the same tokens (positions of every stored token equal)."""
    plain_out, plain_state, _ = run_loop(make_model(False), policy, 12, cached=False, reuse=False)
    fast_out, fast_state, _ = run_loop(make_model(True), policy, 12, cached=True, reuse=True)
    for c, (a, b) in enumerate(zip(fast_out, plain_out)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"chunk {c}: {(a - b).abs().max():.2e}"
    assert len(fast_state.store.entries) == len(plain_state.store.entries)
    for e_fast, e_plain in zip(fast_state.store.entries, plain_state.store.entries):
        assert e_fast.chunk == e_plain.chunk and e_fast.retrievals == e_plain.retrievals
        for kv_f, kv_p, s_f, s_p in zip(e_fast.kv, e_plain.kv, e_fast.importance, e_plain.importance):
            assert torch.equal(kv_f.pos, kv_p.pos)
            assert torch.allclose(s_f, s_p, atol=1e-6, rtol=1e-4)


def test_bench_fast_and_plain_do_the_same_work():
    fast = run_policy(BenchConfig(preset="tiny", chunks=6, steps=1, threads=1), "egolcd")
    plain = run_policy(BenchConfig(preset="tiny", chunks=6, steps=1, threads=1, fast_path=False), "egolcd")
    assert fast["context_tokens"] == plain["context_tokens"] and fast["memory_bytes"] == plain["memory_bytes"]
    assert fast["flops_per_chunk"] < plain["flops_per_chunk"]  # cross-attention K/V once per segment
