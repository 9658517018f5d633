"""EgoLCD memory: window, Long-Term Sparse KV Cache, MemoryPolicy, state round trip, losses, LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from egolcd.attention import LayerKV
from egolcd.config import MEMORY_POLICIES, PRESETS, MemoryConfig
from egolcd.lora import LoRAConfig, attach_lora, load_lora, merge_lora, save_lora, trainable_parameters
from egolcd.losses import LossWeights, memory_regulation_loss, teacher_forcing_loss
from egolcd.memory import LongTermSparseKVCache, MemoryChunk, MemoryPolicy
from egolcd.transformer import EgoLCDTransformer3DModel

TINY = PRESETS["tiny"].transformer
K = TINY["chunk_frames"]
HEADS, HEAD_DIM, LAYERS = TINY["num_attention_heads"], TINY["attention_head_dim"], TINY["num_layers"]


def fake_kv(n=8, chunk=0, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.full((n,), chunk * K), torch.arange(n), torch.zeros(n, dtype=torch.long)], -1)
    return LayerKV(
        torch.randn(b, n, HEADS, HEAD_DIM, generator=g),
        torch.randn(b, n, HEADS, HEAD_DIM, generator=g),
        pos[None].expand(b, -1, -1).clone(),
    )


def fake_chunk(chunk, embedding, n=8, importance=None):
    kvs = [fake_kv(n, chunk, seed=chunk * 10 + i) for i in range(LAYERS)]
    imp = [importance.clone() if importance is not None else torch.zeros(1, n) for _ in range(LAYERS)]
    return MemoryChunk(chunk=chunk, segment=chunk, kv=kvs, importance=imp, embedding=embedding)


def unit(v):
    v = torch.tensor(v, dtype=torch.float32)[None]
    return v / v.norm()


# ----------------------------------------------------------------------------- long-term store
def test_top_k_keeps_the_highest_importance_tokens():
    imp = torch.tensor([[0.1, 0.9, 0.0, 0.5, 0.2, 0.8, 0.3, 0.05]])
    item = fake_chunk(0, unit([1, 0]), importance=imp)
    kept = LongTermSparseKVCache.sparsify(item, keep_ratio=0.25)  # ceil(0.25 * 8) = 2
    assert kept.num_tokens == math.ceil(0.25 * 8)
    for layer in range(LAYERS):
        assert kept.kv[layer].pos[0, :, 1].tolist() == [1, 5]  # tokens 1 and 5, in time order
        assert torch.equal(kept.kv[layer].key, item.kv[layer].key[:, [1, 5]])


def test_key_norm_fallback_without_attention_mass():
    item = fake_chunk(0, unit([1, 0]))
    kept = LongTermSparseKVCache.sparsify(item, keep_ratio=0.5)
    norms = item.kv[0].key.flatten(2).norm(dim=-1)[0]
    expected = sorted(torch.topk(norms, 4).indices.tolist())
    assert kept.kv[0].pos[0, :, 1].tolist() == expected


def test_sparsify_ranks_every_layer_at_once_as_it_would_one_by_one():
    """The stacked ranking equals a per-layer top-k, with the key-norm fallback chosen per layer and row."""
    g = torch.Generator().manual_seed(3)
    kvs = [fake_kv(8, 0, b=2, seed=i) for i in range(LAYERS)]
    imp = [torch.rand(2, 8, generator=g) for _ in range(LAYERS)]
    imp[1][0] = 0.0  # layer 1, row 0: no mass recorded -> key norm
    item = MemoryChunk(chunk=0, segment=0, kv=kvs, importance=imp, embedding=unit([1, 0]))
    kept = LongTermSparseKVCache.sparsify(item, keep_ratio=0.375)  # ceil(0.375 * 8) = 3
    for layer in range(LAYERS):
        for row in range(2):
            score = imp[layer][row]
            if not (score > 0).any():
                score = kvs[layer].key[row].flatten(1).norm(dim=-1)
            want = sorted(torch.topk(score, 3).indices.tolist())
            assert kept.kv[layer].pos[row, :, 1].tolist() == want
            assert torch.equal(kept.kv[layer].value[row], kvs[layer].value[row, want])
            assert torch.equal(kept.importance[layer][row], imp[layer][row, want])


def test_chunks_scored_in_the_window_skip_the_fallback_check_with_the_same_result():
    """``MemoryPolicy.write`` marks a chunk whose every layer received attention mass (``mass_recorded``);
    ``sparsify`` then ranks by the mass without the per-row check, and keeps exactly what the check would."""
    model, x0, eps, t, text, embs = model_and_clip(n_chunks=4)
    policy = MemoryPolicy.from_name("egolcd", K, MemoryConfig(window_chunks=2, keep_ratio=0.5, top_m=1))
    state = policy.init_state()
    with torch.no_grad():
        for i in range(3):
            ctx = policy.context(state, embs[i])
            out = model.forward_chunk(x0[:, :, i * K : (i + 1) * K], torch.zeros(1, K), text, ctx.layers,
                                      ctx.frame_start, return_kv=True, return_attention_mass=True)
            policy.write(state, ctx, out.kv, embs[i], i, out.attention_mass)
    scored, newest = state.window.chunks  # chunk 1 was scored by chunk 2's clean pass; chunk 2 by none yet
    assert scored.mass_recorded and not newest.mass_recorded
    unmarked = MemoryChunk(scored.chunk, scored.segment, scored.kv, scored.importance, scored.embedding)
    fast, checked = (LongTermSparseKVCache.sparsify(c, 0.5) for c in (scored, unmarked))
    for a, b in zip(fast.kv, checked.kv):
        assert torch.equal(a.key, b.key) and torch.equal(a.pos, b.pos)
    assert fast.mass_recorded and not checked.mass_recorded


def test_whole_entries_skip_the_importance_pass():
    """keep_ratio 1.0 without a token budget stores chunks whole, so no attention mass is computed for it."""
    item = fake_chunk(0, unit([1, 0]))
    kept = LongTermSparseKVCache.sparsify(item, keep_ratio=1.0)
    assert kept.num_tokens == item.num_tokens and torch.equal(kept.kv[0].key, item.kv[0].key)
    needs = {(r, t): MemoryPolicy(MemoryConfig(keep_ratio=r, max_tokens=t), K).needs_attention_mass
             for r, t in [(1.0, None), (0.5, None), (1.0, 64)]}
    assert needs == {(1.0, None): False, (0.5, None): True, (1.0, 64): True}
    assert not MemoryPolicy(MemoryConfig(policy="sink-window", keep_ratio=0.5), K).needs_attention_mass


def test_retrieval_returns_expected_entries_for_hand_built_embeddings():
    store = LongTermSparseKVCache(keep_ratio=0.5, max_entries=10)
    sink_e, stove_e, shelf_e = unit([1, 0, 0]), unit([0, 1, 0]), unit([0, 0, 1])
    for c, e in enumerate([sink_e, stove_e, shelf_e, unit([0.9, 0.1, 0])]):
        store.write(fake_chunk(c, e))
    got = store.retrieve(unit([1, 0.05, 0]), top_m=2)
    assert [e.chunk for e, _ in got] == [0, 3]  # the two sink-like entries, in time order
    assert got[0][1] > 0.99
    # threshold drops weak matches
    got = store.retrieve(unit([0, 1, 0]), top_m=3, threshold=0.5)
    assert [e.chunk for e, _ in got] == [1]
    # forced segments count inside top_m and come first: no more than top_m entries, ever
    got = store.retrieve(unit([0, 1, 0]), top_m=1, forced_segments=[2])
    assert [e.chunk for e, _ in got] == [2]
    got = store.retrieve(unit([0, 1, 0]), top_m=2, forced_segments=[2])
    assert [e.chunk for e, _ in got] == [1, 2]


def test_forced_entries_most_recent_first_and_top_m_skips_the_current_segment():
    store = LongTermSparseKVCache(keep_ratio=0.5, max_entries=10)
    e = unit([1, 0, 0])
    for c in range(4):  # chunks 0-2 of segment 7, chunk 3 of segment 9, all with the same key
        item = fake_chunk(c, e)
        item.segment = 7 if c < 3 else 9
        store.write(item)
    got = store.retrieve(e, top_m=2, forced_segments=[7])
    assert [x.chunk for x, _ in got] == [1, 2]  # the two most recent of the forced segment
    got = store.retrieve(e, top_m=2, skip_segment=9)
    assert all(x.segment != 9 for x, _ in got) and len(got) == 2
    got = store.retrieve(e, top_m=4, skip_segment=7)
    assert [x.chunk for x, _ in got] == [3]


def test_aligned_revisit_puts_the_entry_at_the_same_place_in_its_segment_next_to_the_sink():
    store = LongTermSparseKVCache(keep_ratio=0.5, max_entries=10)
    for c in range(6):  # chunk 0: segment 0; chunks 1-3: segment 1 (the place revisited); chunks 4-5: segment 2
        item = fake_chunk(c, unit([1, 0, 0]) if c < 4 else unit([0, 1, 0]))
        item.segment = 0 if c == 0 else (1 if c < 4 else 2)
        store.write(item)
    for j, aligned in [(0, 1), (1, 2), (2, 3), (7, 3)]:  # a revisit longer than the first visit: its last chunk
        got = store.retrieve(unit([0, 1, 0]), top_m=3, forced_segments=[1], skip_segment=9, progress=j)
        assert got[-1][0].chunk == aligned and len(got) == 3
        assert all(e.segment == 1 for e, _ in got)
    got = store.retrieve(unit([0, 1, 0]), top_m=3, forced_segments=[1], progress=0)
    assert [e.chunk for e, _ in got][-1] == 1
    got = store.retrieve(unit([0, 1, 0]), top_m=2, forced_segments=[1], progress=1)
    assert [e.chunk for e, _ in got] == [3, 2]  # ties: the later entry first
    # one forced entry + similarity picks: the picks first, in time order, the aligned entry last
    got = store.retrieve(unit([0, 1, 0]), top_m=1 + 2, forced_segments=[0], progress=0)
    assert [e.chunk for e, _ in got] == [4, 5, 0]


def test_policy_reads_the_aligned_first_visit_chunk_at_a_fixed_offset():
    """Each chunk of a revisit finds the first-visit chunk at the same place in its segment at one fixed
    frame offset, whatever else is retrieved: the offset a model can learn to copy from."""
    cfg = MemoryConfig(policy="egolcd", window_chunks=2, keep_ratio=1.0, top_m=3, max_entries=32)
    policy = MemoryPolicy(cfg, chunk_frames=K)
    state = policy.init_state()
    segments = [0, 1, 1, 2, 2, 2, 3, 3, 4, 4]  # segment 4 revisits segment 1 (chunks 1-2)
    offsets = []
    for c, seg in enumerate(segments):
        emb = unit([1, 0, 0]) if seg != 2 else unit([0, 1, 0])
        revisit = [1] if seg == 4 else []
        ctx = policy.context(state, emb, revisit, segment=seg)
        if seg == 4:
            last = [s for s in ctx.spans if s.kind == "retrieved"][-1]
            assert last.chunk == 1 + (c - 8)  # the same place in the first visit
            slot = [s for s in ctx.spans if s.kind != "window"].index(last)
            offsets.append(ctx.frame_start - slot * K)
        policy.write(state, ctx, fake_chunk(c, emb).kv, emb, seg)
    assert len(offsets) == 2 and offsets[0] == offsets[1] == (cfg.window_chunks + 2) * K


def colocated_revisit_walk(policy_name: str):
    """Chunks of segments 0, 1, 1, 2, 2, 2, 3, 3 (segment 3 revisits 1) under ``policy_name`` with
    ``revisit_position: current``: yields ``(chunk, segment, context)``, then writes the chunk."""
    cfg = MemoryConfig(policy=policy_name, window_chunks=2, keep_ratio=1.0, top_m=3, revisit_position="current")
    policy = MemoryPolicy(cfg, chunk_frames=K)
    state = policy.init_state()
    for c, seg in enumerate([0, 1, 1, 2, 2, 2, 3, 3]):
        emb = unit([1, 0, 0])
        ctx = policy.context(state, emb, [1] if seg == 3 else [], segment=seg)
        yield c, seg, ctx
        policy.write(state, ctx, fake_chunk(c, emb).kv, emb, seg)


def current_chunk_frames(ctx, span) -> bool:
    frames = ctx.layers[0].pos[0, span.start : span.end, 0].unique().tolist()
    return frames[0] == ctx.frame_start and frames[-1] < ctx.frame_start + K


def test_colocated_revisit_entry_takes_the_current_chunks_frame_positions():
    for c, seg, ctx in colocated_revisit_walk("egolcd"):
        if seg == 3:
            last = [s for s in ctx.spans if s.kind == "retrieved"][-1]
            assert last.chunk == c - 5  # the aligned first-visit chunk
            assert current_chunk_frames(ctx, last)
            others = [s for s in ctx.spans if s is not last]
            assert all(ctx.layers[0].pos[0, s.start : s.end, 0].max() < ctx.frame_start for s in others)
    with pytest.raises(ValueError, match="revisit_position"):
        MemoryConfig(revisit_position="nowhere")


def test_dense_reads_the_colocated_revisit_entry_too():
    """With ``revisit_position: current``, dense keeps its whole history and also reads the aligned first-visit
    chunk on the current chunk's positions, as egolcd does: its context is a superset of egolcd's."""
    for c, seg, ctx in colocated_revisit_walk("dense"):
        retrieved = [s for s in ctx.spans if s.kind == "retrieved"]
        assert len([s for s in ctx.spans if s.kind == "window"]) == c  # the whole history, as always
        if seg == 3:
            assert [s.chunk for s in retrieved] == [c - 5]  # the aligned first-visit chunk, once more
            assert current_chunk_frames(ctx, retrieved[0])
        else:
            assert not retrieved
    slot = MemoryPolicy(MemoryConfig(policy="dense", revisit_position="slot"), chunk_frames=K)
    assert not slot.colocates  # the default layout: dense is the plain full history


def test_budgets_hold_over_500_chunks():
    cfg = MemoryConfig(policy="egolcd", window_chunks=2, keep_ratio=0.25, top_m=2, max_entries=6, max_tokens=10)
    policy = MemoryPolicy(cfg, chunk_frames=K)
    state = policy.init_state()
    n_tok = 8
    for c in range(500):
        emb = unit([math.cos(c), math.sin(c)])
        ctx = policy.context(state, emb)
        assert ctx.tokens_per_layer <= 10 + 1 * n_tok + 2 * n_tok  # long-term + sink + window
        kv = [fake_kv(n_tok, 0, seed=c).shift_frames(ctx.frame_start) for _ in range(LAYERS)]
        mass = [torch.rand(1, ctx.tokens_per_layer) for _ in range(LAYERS)] if ctx.layers else None
        policy.write(state, ctx, kv, emb, segment=c % 7, attention_mass=mass)
        assert len(state.store.entries) <= 6
        assert state.store.tokens_per_layer() <= 10
        if ctx.layers is not None:  # positions stay bounded whatever the length
            assert int(ctx.layers[0].pos[..., 0].max()) < (2 + 1 + 2 + 1) * K
    assert state.chunk == 500 and state.window.sink_chunk is not None


# ----------------------------------------------------------------------------- policies
def run_policy(name, n_chunks=12, n_tok=8):
    policy = MemoryPolicy.from_name(name, K, MemoryConfig(window_chunks=2, keep_ratio=0.25, top_m=2, max_entries=4))
    state = policy.init_state()
    sizes = []
    for c in range(n_chunks):
        emb = unit([1.0, float(c)])
        ctx = policy.context(state, emb)
        sizes.append(ctx.tokens_per_layer)
        kv = [fake_kv(n_tok, 0, seed=c).shift_frames(ctx.frame_start) for _ in range(LAYERS)]
        policy.write(state, ctx, kv, emb, segment=c)
    return sizes, ctx


def test_named_policies_visible_tokens():
    n = 8
    dense, _ = run_policy("dense")
    assert dense == [c * n for c in range(12)]
    window, _ = run_policy("window")
    assert window == [0, n] + [2 * n] * 10
    none, _ = run_policy("none")
    assert none == [0] + [n] * 11
    sink, ctx = run_policy("sink-window")
    assert sink == [0, n, 2 * n] + [3 * n] * 9
    assert [s.kind for s in ctx.spans] == ["sink", "window", "window"]
    ego, ctx = run_policy("egolcd")
    k = math.ceil(0.25 * n)
    assert ego[:3] == [0, n, 2 * n] and ego[3] == 3 * n  # chunk 0 became the sink
    assert ego[-1] == 2 * k + 3 * n  # 2 retrieved sparse entries + sink + window
    assert [s.kind for s in ctx.spans] == ["retrieved", "retrieved", "sink", "window", "window"]
    with pytest.raises(ValueError, match="unknown memory policy"):
        MemoryPolicy.from_name("bogus", K)


def test_context_positions_are_reindexed():
    _, ctx = run_policy("egolcd")
    pos = ctx.layers[0].pos[0, :, 0]
    spans = ctx.spans
    # slots: retrieved at [0,K), [K,2K), sink at [2K,3K); window keeps offsets; current starts at 5K
    assert ctx.frame_start == 5 * K
    assert set(pos[spans[0].start : spans[0].end].tolist()) == {0}
    assert set(pos[spans[2].start : spans[2].end].tolist()) == {2 * K}
    assert set(pos[spans[4].start : spans[4].end].tolist()) == {4 * K}
    dense_sizes, dctx = run_policy("dense")
    assert dctx.frame_start == dctx.abs_frame_start  # dense: absolute positions


def model_and_clip(n_chunks=4, seed=0):
    torch.manual_seed(seed)
    model = EgoLCDTransformer3DModel(**TINY).eval()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, TINY["in_channels"], n_chunks * K, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.rand(1, n_chunks, generator=g)
    text = torch.randn(1, 5, TINY["text_dim"], generator=g)
    embs = [unit([1.0, float(i % 2), 0.3 * i]) for i in range(n_chunks)]
    return model, x0, eps, t, text, embs


@pytest.mark.parametrize("name", MEMORY_POLICIES)
def test_training_path_equals_inference_path(name):
    """Teacher forcing over a clip sees exactly the tokens, and computes exactly the outputs, that the
    chunk-by-chunk inference loop computes when it generates the same latents."""
    model, x0, eps, t, text, embs = model_and_clip(n_chunks=6)
    cfg = MemoryConfig(window_chunks=2, keep_ratio=0.5, top_m=1, max_entries=3)
    policy = MemoryPolicy.from_name(name, K, cfg)
    with torch.no_grad():
        train = teacher_forcing_loss(model, policy, x0, eps, t, text, embs, weights=LossWeights(variant="none"))
        # inference loop (as the pipeline runs it): read context, denoise, clean pass, write
        state = policy.init_state()
        for i in range(6):
            sl = slice(i * K, (i + 1) * K)
            ctx = policy.context(state, embs[i])
            assert ctx.describe() == train.contexts[i].describe()
            if ctx.layers is not None:
                for a, b in zip(ctx.layers, train.contexts[i].layers):
                    assert torch.equal(a.key, b.key) and torch.equal(a.pos, b.pos)
            ti = t[:, i : i + 1]
            x_t = (1 - ti)[..., None, None, None] * x0[:, :, sl] + ti[..., None, None, None] * eps[:, :, sl]
            pred = model.forward_chunk(x_t, (ti * 1000).expand(-1, K), text, ctx.layers, ctx.frame_start).sample
            assert torch.equal(pred, train.predictions[i])
            clean = model.forward_chunk(
                x0[:, :, sl], torch.zeros(1, K), text, ctx.layers, ctx.frame_start,
                return_kv=True, return_attention_mass=policy.needs_attention_mass,
            )
            policy.write(state, ctx, clean.kv, embs[i], i, clean.attention_mass)


def test_dense_policy_equals_block_causal_forward_on_clean_clip():
    """With `dense`, teacher forcing at t=0 for every chunk is the block-causal full forward."""
    model, x0, eps, _, text, embs = model_and_clip(n_chunks=3)
    policy = MemoryPolicy.from_name("dense", K)
    t0 = torch.zeros(1, 3)
    with torch.no_grad():
        train = teacher_forcing_loss(model, policy, x0, eps, t0, text, embs, weights=LossWeights(variant="none"))
        full = model(x0, torch.zeros(1, x0.shape[2]), text, return_dict=False)[0]
    assert (torch.cat(train.predictions, dim=2) - full).abs().max() < 1e-4


# ----------------------------------------------------------------------------- state
def test_state_round_trip_is_exact(tmp_path):
    model, x0, eps, t, text, embs = model_and_clip(n_chunks=6)
    policy = MemoryPolicy.from_name("egolcd", K, MemoryConfig(window_chunks=2, keep_ratio=0.5, top_m=1))

    def step(state, i):
        sl = slice(i * K, (i + 1) * K)
        ctx = policy.context(state, embs[i])
        out = model.forward_chunk(x0[:, :, sl], torch.zeros(1, K), text, ctx.layers, ctx.frame_start,
                                  return_kv=True, return_attention_mass=True)
        policy.write(state, ctx, out.kv, embs[i], i, out.attention_mass)
        return out.sample

    with torch.no_grad():
        state = policy.init_state()
        for i in range(4):
            step(state, i)
        policy.save_state(state, tmp_path / "mem.safetensors", extra={"seed": 3}, extra_tensors={"z": x0})
        saved_flags = [c.mass_recorded for c in state.window.chunks + state.store.entries]
        tail = [step(state, i) for i in (4, 5)]
        restored, extra, extra_tensors = policy.load_state(tmp_path / "mem.safetensors")
        assert extra == {"seed": 3} and restored.chunk == 4 and torch.equal(extra_tensors["z"], x0)
        flags = [c.mass_recorded for c in restored.window.chunks + restored.store.entries]
        assert flags == saved_flags and any(flags) and not all(flags)  # the newest chunk is not scored yet
        tail2 = [step(restored, i) for i in (4, 5)]
    for a, b in zip(tail, tail2):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="policy"):
        MemoryPolicy.from_name("window", K).load_state(tmp_path / "mem.safetensors")
    with pytest.raises(FileNotFoundError):
        policy.load_state(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a readable"):
        policy.load_state(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- losses
def test_memory_regulation_loss_is_zero_for_dense_and_positive_otherwise():
    model, x0, eps, t, text, embs = model_and_clip(n_chunks=5)
    dense = teacher_forcing_loss(model, MemoryPolicy.from_name("dense", K), x0, eps, t, text, embs)
    assert dense.memory.item() == 0.0
    window = teacher_forcing_loss(model, MemoryPolicy.from_name("none", K), x0, eps, t, text, embs)
    assert window.memory.item() > 1e-6
    assert torch.isclose(window.loss, window.flow + 0.1 * window.memory)
    o = torch.randn(2, 3, 4)
    assert memory_regulation_loss([(o, o.clone())]).item() == 0.0


def test_anchor_variant_uses_retrieved_latents():
    model, x0, eps, t, text, embs = model_and_clip(n_chunks=6)
    cfg = MemoryConfig(window_chunks=1, sink=False, keep_ratio=0.5, top_m=1)
    out = teacher_forcing_loss(model, MemoryPolicy(cfg, K), x0, eps, t, text, embs,
                               weights=LossWeights(memory=0.5, variant="anchor"))
    assert out.memory.item() > 0 and any(s.kind == "retrieved" for c in out.contexts for s in c.spans)
    none = teacher_forcing_loss(model, MemoryPolicy.from_name("window", K), x0, eps, t, text, embs,
                                weights=LossWeights(memory=0.5, variant="anchor"))
    assert none.memory.item() == 0.0  # nothing retrieved -> no anchor term


def test_losses_give_gradients_only_to_lora_parameters():
    model, x0, eps, t, text, embs = model_and_clip(n_chunks=4)
    model.train()
    attach_lora(model, LoRAConfig(rank=2))
    # make LoRA non-trivial so MR gradients reach lora_A too
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    out = teacher_forcing_loss(model, MemoryPolicy.from_name("egolcd", K), x0, eps, t, text, embs,
                               weights=LossWeights(memory=1.0))
    out.loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_lora_save_load_merge(tmp_path):
    torch.manual_seed(0)
    model = EgoLCDTransformer3DModel(**TINY).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, LoRAConfig(rank=4, alpha=8))
    assert all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable_parameters(model)) == 4 * 2 * LAYERS
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    x, text = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 3, TINY["text_dim"])
    with torch.no_grad():
        adapted = model(x, torch.tensor([300.0]), text, return_dict=False)[0]
    save_lora(model, tmp_path / "lora")
    fresh = EgoLCDTransformer3DModel(**TINY).eval()
    fresh.load_state_dict(base_state)
    load_lora(fresh, tmp_path / "lora")
    with torch.no_grad():
        assert (fresh(x, torch.tensor([300.0]), text, return_dict=False)[0] - adapted).abs().max() < 1e-5
    merge_lora(fresh)
    assert not any("lora" in k for k in fresh.state_dict())
    assert set(fresh.state_dict()) == set(base_state)
    with torch.no_grad():
        assert (fresh(x, torch.tensor([300.0]), text, return_dict=False)[0] - adapted).abs().max() < 1e-4
    with pytest.raises(FileNotFoundError):
        load_lora(fresh, tmp_path / "nothing")


@pytest.mark.parametrize("inference", [False, True])
def test_retrieval_reuses_its_last_ranking_only_when_ranking_would_give_it_again(inference):
    """The store's memo of its last similarity-only retrieval never changes a result: over a random run of
    writes (own and other segments), evictions, changing and in-place modified queries, every retrieval
    equals the same retrieval by a fresh store holding the same entries (no memo). Under inference mode
    (tensors without version counters) too, except for stored keys modified in place, which egolcd never does."""
    with torch.inference_mode(inference):
        _retrieval_memo_run(inference)


def _retrieval_memo_run(inference):
    g = torch.Generator().manual_seed(7)
    keys = [torch.nn.functional.normalize(torch.randn(1, 4, generator=g), dim=-1) for _ in range(4)]
    store = LongTermSparseKVCache(keep_ratio=1.0, max_entries=6)
    reused = 0
    for step in range(300):
        r = torch.rand((), generator=g).item()
        segment = (step // 8) % 4 if r < 0.85 else int(torch.randint(0, 4, (), generator=g))  # mostly in order
        if r < 0.6 or r > 0.85:
            store.write(MemoryChunk(step, segment, [fake_kv(2, step)], [torch.zeros(1, 2)], keys[segment]))
        elif r < 0.63:
            keys[segment].mul_(-1.0)  # in place: a memo of this query must not survive it
        elif r < 0.66 and not inference:
            keys[(segment + 1) % 4].mul_(-1.0)  # another segment's key, held by entries: nor this
        query = keys[segment] if r < 0.75 else keys[segment].clone()
        skip = segment if r < 0.95 else None
        top_m, threshold = 1 + (step // 40) % 3, (None, 0.0)[(step // 60) % 2]
        memo_before = store._memo
        if memo_before is not None:  # a memo never holds an entry the store has dropped
            held = {e.uid for e in store.entries}
            assert all(e.uid in held for e, _ in memo_before.result)
        got = store.retrieve(query, top_m, threshold, skip_segment=skip)
        fresh = LongTermSparseKVCache(keep_ratio=1.0, max_entries=6, entries=list(store.entries))
        want = fresh.retrieve(query, top_m, threshold, skip_segment=skip)
        assert [(e.uid, s) for e, s in got] == [(e.uid, s) for e, s in want]
        reused += store._memo is memo_before and bool(got)
    assert reused > 10  # the memo was exercised, not only rebuilt
