import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, SHORT_ATTENTION, GPTConfig, KVCache, causal_attention

TINY = dict(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def test_shapes_with_and_without_targets():
    m = tiny_model()
    idx = torch.randint(0, 40, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, 40) and loss is None
    logits, loss = m(idx, torch.randint(0, 40, (3, 11)))
    assert logits.shape == (3, 11, 40)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # near-uniform at init: loss close to ln(vocab)
    assert abs(loss.item() - math.log(40)) < 0.5


def test_full_block_ok_and_too_long_raises():
    m = tiny_model()
    m(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_causality():
    m = tiny_model().eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 40, (1, 12))
    base, _ = m(idx)
    for j in (0, 5, 11):
        idx2 = idx.clone()
        idx2[0, j] = (idx[0, j] + 7) % 40
        out, _ = m(idx2)
        assert torch.allclose(out[0, :j], base[0, :j], atol=1e-6), j
        assert (out[0, j:] - base[0, j:]).abs().amax(dim=-1).min() > 1e-6, j


def test_weight_tying():
    """One matrix serves as token embedding and output layer: counted once, and its gradient is the
    sum of what the two uses would get if they were separate matrices."""
    m = tiny_model()
    assert m.transformer.wte.weight is m.lm_head.weight
    assert m.num_params() == sum(p.numel() for n, p in m.named_parameters())   # the tied matrix once
    assert "lm_head.weight" not in dict(m.named_parameters())
    idx, tgt = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    m(idx, tgt)[1].backward()
    untied = tiny_model()
    untied.load_state_dict(m.state_dict())
    untied.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())   # now two matrices
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    untied(idx, tgt)[1].backward()
    both = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    assert untied.transformer.wte.weight.grad.abs().sum() > 0 and untied.lm_head.weight.grad.abs().sum() > 0
    assert torch.allclose(m.lm_head.weight.grad, both, atol=1e-6)


def test_ignore_index():
    m = tiny_model()
    torch.manual_seed(2)
    idx = torch.randint(0, 40, (2, 10))
    targets = torch.randint(0, 40, (2, 10))
    targets[0, :4] = -100
    targets[1, 7:] = -100
    logits, loss = m(idx, targets)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    # ignoring one more position does change it (the -100 positions are really the only ones skipped)
    t2 = targets.clone()
    t2[0, 4] = -100
    _, loss2 = m(idx, t2)
    assert not torch.allclose(loss, loss2)


def test_overfits_tiny_batch():
    m = tiny_model()
    torch.manual_seed(3)
    data = torch.randint(0, 40, (4, 17))
    idx, targets = data[:, :-1], data[:, 1:]
    opt = m.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(300):
        _, loss = m(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


def test_default_param_count():
    c = GPTConfig()
    V, P, L, C = c.vocab_size, c.block_size, c.n_layer, c.n_embd
    per_layer = (2 * C                    # ln_1
                 + C * 3 * C + 3 * C      # attn.c_attn
                 + C * C + C              # attn.c_proj
                 + 2 * C                  # ln_2
                 + C * 4 * C + 4 * C      # mlp.c_fc
                 + 4 * C * C + C)         # mlp.c_proj
    expected = V * C + P * C + L * per_layer + 2 * C  # wte (= lm_head), wpe, blocks, ln_f
    assert expected == 11_042_304
    m = GPT(c)
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - P * C


def test_init_std():
    m = tiny_model(n_layer=4, n_embd=64)
    small = 0.02 / math.sqrt(2 * 4)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - small) < 0.2 * small, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.1 * 0.02, name
        elif name.endswith("bias") and "ln_" not in name:
            assert torch.all(p == 0), name


def test_kv_cache_matches_full_forward():
    m = tiny_model(seed=4).eval()
    torch.manual_seed(5)
    seq = torch.randint(0, 40, (2, 15))
    cache = m.new_cache(batch_size=2, max_len=32)
    assert isinstance(cache, KVCache) and cache.pos == 0
    with torch.no_grad():
        logits, _ = m(seq[:, :5], cache=cache)
        assert cache.pos == 5
        full, _ = m(seq[:, :5])
        assert torch.allclose(logits, full, atol=1e-5)
        for t in range(5, 15):
            step, _ = m(seq[:, t:t + 1], cache=cache)
            assert step.shape == (2, 1, 40)
            assert cache.pos == t + 1
            full, _ = m(seq[:, :t + 1])
            assert torch.allclose(step[:, -1], full[:, -1], atol=1e-5), t


def test_logits_at_some_positions_are_the_full_forwards():
    """logits_at (a classification reads the logits at <CLS> alone): the last block and the output layer
    at one position per row give the full forward's logits there, at the last position or before it (a
    shorter prefix padded on the right); with a cache or targets it is refused."""
    m = tiny_model(seed=8).eval()
    seq = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full, _ = m(seq)
        for at in ([11, 11, 11], [11, 4, 0]):
            got, _ = m(seq, logits_at=torch.tensor(at))
            assert got.shape == (3, 1, 40)
            assert torch.allclose(got[:, 0], full[torch.arange(3), torch.tensor(at)], atol=1e-5)
        with pytest.raises(ValueError, match="logits_at"):
            m(seq, seq, logits_at=torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="logits_at"):
            m(seq, cache=m.new_cache(3, 12), logits_at=torch.tensor([1, 2, 3]))


def test_kv_cache_multi_token_on_nonempty_cache():
    m = tiny_model(seed=6).eval()
    torch.manual_seed(7)
    seq = torch.randint(0, 40, (2, 20))
    cache = m.new_cache(2, 20)
    with torch.no_grad():
        m(seq[:, :6], cache=cache)
        chunk, _ = m(seq[:, 6:13], cache=cache)  # T=7 on top of 6 cached
        m(seq[:, 13:14], cache=cache)
        chunk2, _ = m(seq[:, 14:20], cache=cache)
        full, _ = m(seq)
    assert cache.pos == 20
    assert torch.allclose(chunk, full[:, 6:13], atol=1e-5)
    assert torch.allclose(chunk2, full[:, 14:20], atol=1e-5)


def test_kv_cache_limits():
    m = tiny_model().eval()
    with pytest.raises(ValueError, match="block_size"):
        m.new_cache(1, 33)
    cache = m.new_cache(1, 32)
    with torch.no_grad():
        m(torch.zeros(1, 30, dtype=torch.long), cache=cache)
        m(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    small = m.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=small)
    with pytest.raises(ValueError, match="batch size"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=small)


def test_optimizer_groups():
    m = tiny_model()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters()}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()
    # wte/lm_head tied: listed once
    assert sum(p is m.lm_head.weight for p in decay["params"]) == 1


@pytest.mark.parametrize("T", [1, 7, SHORT_ATTENTION, SHORT_ATTENTION + 3])   # explicit ops, then SDPA's kernel
def test_causal_attention_is_sdpa(T):
    """causal_attention gives scaled_dot_product_attention(is_causal=True) and its gradients, in fp32
    to rounding and under bf16 autocast to bf16's precision, on either side of SHORT_ATTENTION."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, 3, T, 8, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(want, (q, k, v), dy)
    got = causal_attention(q, k, v)
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dy), grads):
        assert torch.allclose(a, b, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = causal_attention(*(t.bfloat16() for t in (q, k, v)))
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), want, atol=0.05)
