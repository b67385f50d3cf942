"""cpu_linear: the model's fp32 products in oneDNN where MKL is the slower library. Forced on here, so the
oneDNN path is checked on every CPU (oneDNN runs everywhere; only its speed differs)."""
import pytest
import torch
import torch.nn.functional as F

from imagegpt import cpu_linear
from model import GPT, GPTConfig

AMD_512 = {"vendor": "AuthenticAMD", "flags": ["avx2", "fma", "avx512f", "avx512bw"]}


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_fp32", lambda: True)


def test_which_cpus_prefer_onednn():
    assert cpu_linear.prefers_onednn(AMD_512, {})
    assert cpu_linear.prefers_onednn(AMD_512, {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"})
    assert not cpu_linear.prefers_onednn(AMD_512, {"ONEDNN_MAX_CPU_ISA": "AVX2"})         # capped: the same ISA
    assert not cpu_linear.prefers_onednn({"vendor": "AuthenticAMD", "flags": ["avx2", "fma"]}, {})   # AVX2 only
    assert not cpu_linear.prefers_onednn({"vendor": "GenuineIntel", "flags": AMD_512["flags"]}, {})  # MKL's AVX-512
    assert not cpu_linear.prefers_onednn({"vendor": None, "flags": []}, {})               # nothing known


def test_values_and_gradients_match_f_linear(onednn):
    g = torch.Generator().manual_seed(0)
    for bias in (True, False):
        x = torch.randn(3, 40, 96, generator=g, requires_grad=True)
        w = torch.randn(200, 96, generator=g, requires_grad=True)
        b = torch.randn(200, generator=g, requires_grad=True) if bias else None
        dy = torch.randn(3, 40, 200, generator=g)
        leaves = [t for t in (x, w, b) if t is not None]
        y = cpu_linear.linear(x, w, b)
        assert y.shape == (3, 40, 200) and type(y.grad_fn).__name__ == "ViewBackward0"   # it took oneDNN
        ours = torch.autograd.grad(y, leaves, dy)
        ref = F.linear(x, w, b)
        theirs = torch.autograd.grad(ref, leaves, dy)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-3)
        with torch.no_grad():
            torch.testing.assert_close(cpu_linear.linear(x, w, b), ref, rtol=1e-5, atol=1e-4)


def test_what_stays_with_torch(onednn):
    """Small products, bf16, autocast and a model that is off: F.linear's own result, bit for bit."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    small = torch.randn(4, 32, generator=g)                  # 4 x 32 x 64 multiply-adds: below the bar
    assert torch.equal(cpu_linear.linear(small, w), F.linear(small, w))
    big, wb = torch.randn(2048, 256, generator=g), torch.randn(512, 256, generator=g)
    assert torch.equal(cpu_linear.linear(big.bfloat16(), wb.bfloat16()), F.linear(big.bfloat16(), wb.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cpu_linear.linear(big, wb), F.linear(big, wb))
    assert torch.equal(cpu_linear.mm_t(small, w), small @ w.t())
    torch.testing.assert_close(cpu_linear.mm_t(big, wb), big @ wb.t(), rtol=1e-5, atol=1e-3)


def test_training_steps_agree_either_way(onednn, monkeypatch):
    """Three AdamW steps of a small GPT through oneDNN and through torch's own products: the same losses
    up to float rounding."""
    def losses():
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=128))
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        g = torch.Generator().manual_seed(2)
        out = []
        for _ in range(3):
            x, y = torch.randint(64, (8, 48), generator=g), torch.randint(64, (8, 48), generator=g)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    via_onednn = losses()
    monkeypatch.setattr(cpu_linear, "onednn_fp32", lambda: False)
    assert via_onednn == pytest.approx(losses(), rel=1e-5)


def test_an_export_traces_torch_linear(onednn):
    """torch.export (what torch.onnx.export(dynamo=True) runs) sees aten's linear, which every exporter
    knows, not oneDNN's op."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 512)

        def forward(self, x):
            return cpu_linear.linear(x, self.proj.weight, self.proj.bias)

    program = torch.export.export(Layer(), (torch.randn(64, 256),))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in ops and not any("mkldnn" in op for op in ops)
