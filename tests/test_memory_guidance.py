"""Memory guidance: classifier-free guidance on the retrieved long-term entries of a revisit's chunks.

Its unconditional branch is the same context less the retrieved entries; with rotary positions the
sink and window keep their offsets to the current chunk, so that branch is the sink-window policy's.
"""

from __future__ import annotations

import pytest
import torch
from test_fast_path import PRESET, K, make_inputs  # the same tiny inputs
from test_fast_path_equality import RESERVE, make_model

from egolcd.chunk_loop import chunk_denoiser
from egolcd.flow import get_sampler, get_sigmas
from egolcd.memory import ContextArena, MemoryPolicy
from egolcd.pipeline import generate_chunk

pytestmark = pytest.mark.usefixtures("one_thread_module")


@torch.inference_mode()
def memory_after(model, chunks: int = 7):
    """An egolcd memory state after ``chunks`` chunks (segments change every 2 chunks)."""
    policy = MemoryPolicy.from_name("egolcd", K, PRESET.memory)
    state, arena = policy.init_state(), ContextArena(reserve=RESERVE)
    text, keys, noise = make_inputs(chunks + 2)
    sigmas, sample = get_sigmas(2, 5.0), get_sampler("euler")
    for c in range(chunks):
        seg = (c // 2) % len(text)
        generate_chunk(model, policy, state, noise[c], text[seg], keys[seg], seg, [], sigmas, sample, arena=arena)
    return policy, state, arena, text, keys, noise[chunks]


@torch.inference_mode()
def test_without_retrieved_is_the_sink_window_context():
    model = make_model()
    policy, state, arena, text, keys, x = memory_after(model)
    ctx = policy.context(state, keys[1], revisit=[1], arena=arena, segment=2, count_retrieval=False)
    assert ctx.retrieved_tokens > 0 and any(s.segment == 1 for s in ctx.spans if s.kind == "retrieved")
    bare = ctx.without_retrieved()
    assert [s["kind"] for s in bare.describe()] == [s["kind"] for s in ctx.describe() if s["kind"] != "retrieved"]
    assert bare.tokens_per_layer == ctx.tokens_per_layer - ctx.retrieved_tokens
    sink_window = MemoryPolicy.from_name("sink-window", K, PRESET.memory).context(state, keys[1], segment=2)
    assert bare.tokens_per_layer == sink_window.tokens_per_layer
    t = torch.tensor([0.7])
    v_bare = chunk_denoiser(model, bare, text[2])(x, t)
    v_sink_window = chunk_denoiser(model, sink_window, text[2])(x, t)
    torch.testing.assert_close(v_bare, v_sink_window, atol=1e-5, rtol=1e-4)  # offsets kept, positions shifted


@torch.inference_mode()
def test_memory_guidance_extrapolates_from_sink_window_towards_memory():
    model = make_model()
    policy, state, arena, text, keys, x = memory_after(model)
    ctx = policy.context(state, keys[1], revisit=[1], arena=arena, segment=2, count_retrieval=False)
    t = torch.tensor([0.9])
    v_mem = chunk_denoiser(model, ctx, text[2])(x, t).clone()
    v_bare = chunk_denoiser(model, ctx.without_retrieved(), text[2])(x, t)
    assert (v_mem - v_bare).abs().max() > 1e-3  # the retrieved entries change the prediction
    torch.testing.assert_close(chunk_denoiser(model, ctx, text[2], memory_guidance=1.0)(x, t), v_mem)
    torch.testing.assert_close(chunk_denoiser(model, ctx, text[2], memory_guidance=0.0)(x, t), v_bare)
    v_g = chunk_denoiser(model, ctx, text[2], memory_guidance=2.5)(x, t)
    torch.testing.assert_close(v_g, v_bare + 2.5 * (v_mem - v_bare), atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_memory_guidance_applies_only_to_a_revisits_chunks():
    model = make_model()
    sigmas, sample = get_sigmas(2, 5.0), get_sampler("euler")
    outs = {}
    for revisit in ([], [1]):
        for g in (1.0, 3.0):
            policy, state, arena, text, keys, x = memory_after(model)
            outs[len(revisit), g], _ = generate_chunk(
                model, policy, state, x, text[2], keys[1], 2, revisit, sigmas, sample, arena=arena, memory_guidance=g
            )
    torch.testing.assert_close(outs[0, 1.0], outs[0, 3.0], atol=0, rtol=0)  # no revisit: guidance is off
    assert (outs[1, 1.0] - outs[1, 3.0]).abs().max() > 1e-3
