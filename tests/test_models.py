from copy import deepcopy

import pytest
import torch
from typer.testing import CliRunner

from treeopt.cli import app
from treeopt.core.errors import TreeoptError
from treeopt.decoding.models import chat_prompt, load_model, model_path, resolve_device, resolve_dtype


def test_load_local_directory(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16 and not lm.model.training
    ids = chat_prompt(lm.tokenizer, "w5 w6")
    assert ids[-1] == lm.tokenizer.convert_tokens_to_ids("w0")


@pytest.mark.parametrize("call, match", [
    (lambda: model_path("/no/such/dir"), "neither a local directory"),
    (lambda: resolve_dtype("float8"), "--dtype"),
    (lambda: resolve_device("tpu"), "--device"),
])
def test_bad_model_arguments(call, match):
    with pytest.raises(TreeoptError, match=match):
        call()


def test_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(TreeoptError, match="hub"):
        load_model("nobody/no-such-model", device="cpu")


def test_cli_info_on_local_model(tiny_model_dir):
    r = CliRunner().invoke(app, ["info", "--model", str(tiny_model_dir), "--heads", "random", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "llama" in r.output and "4 heads" in r.output and "torch" in r.output


def test_cli_error_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["info", "--model", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error:") and "config.json" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_bundled_model_generates(smollm2):
    ids = torch.tensor([chat_prompt(smollm2.tokenizer, "What is the capital of France?")])
    out = smollm2.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_auto_dtype_is_bfloat16_only_where_native(monkeypatch):
    import treeopt.decoding.models as models

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if models.native_bf16(cpu) else torch.float32)
    monkeypatch.setattr(models, "native_bf16", lambda device: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(models, "native_bf16", lambda device: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16


def test_decode_path_follows_the_cpu_flags(monkeypatch, tmp_path):
    import treeopt.decoding.decoder as decoder
    import treeopt.decoding.models as models

    cpu = torch.device("cpu")
    cases = {frozenset({"avx2", "fma", "amx_bf16"}): (torch.bfloat16, True, False),
             frozenset({"avx2", "fma"}): (torch.float32, False, torch.backends.mkl.is_available()),
             frozenset({"sse4_2"}): (torch.float32, False, False)}
    for flags, (dtype, compiled, packed_linears) in cases.items():
        monkeypatch.setattr(models, "cpu_flags", lambda f=flags: f)
        path = models.decode_path(cpu)
        assert (path.dtype, path.compiled, path.packed_linears) == (dtype, compiled, packed_linears)
        assert resolve_dtype("auto", cpu) == dtype
    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(decoder, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    avx2 = decoder.compile_cache_dir()
    monkeypatch.setattr(decoder, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512_bf16"}))
    assert decoder.compile_cache_dir() != avx2 and avx2.parent == tmp_path / "compiled"
    assert torch.__version__ in avx2.name


def test_packed_linear_is_the_same_product():
    from treeopt.decoding.models import PackedLinear, packed_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(3, 5, 16)  # [B, S, H]
    want = net(x)
    packed_linears(net)
    assert all(isinstance(m, PackedLinear) for m in net)
    torch.testing.assert_close(net(x), want)
    assert net(x[0, 0]).shape == (8,)
    net(x).sum().backward()  # a product autograd records: no packed copy, gradients reach the weights
    assert net[0].packed is None and net[0].weight.grad is not None


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24), (24,), (5, 24), (2, 3, 24)])
def test_packed_linear_products_equal_the_linear(onednn, shape, monkeypatch):
    """PackedLinear's product (oneDNN's over the weight prepacked at the first call, or (W @ x.T).T
    where torch has no oneDNN) equals F.linear at every row count and input rank, call after call."""
    from treeopt.decoding.models import PackedLinear

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    g = torch.Generator().manual_seed(0)
    W, b = (torch.nn.Parameter(torch.randn(*s, generator=g), requires_grad=False) for s in ((40, 24), (40,)))
    linear = PackedLinear(W, b)
    for x in (torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)):
        with torch.inference_mode():
            got = linear(x)
        assert got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, W, b), atol=1e-5, rtol=1e-5)
    assert (linear.packed is not None) == onednn
    with torch.no_grad():
        W.mul_(2)  # an in-place change: packed afresh
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, W, b), atol=1e-5, rtol=1e-5)
    copy = deepcopy(linear)  # a copy packs its own
    torch.testing.assert_close(copy(x), torch.nn.functional.linear(x, W, b), atol=1e-5, rtol=1e-5)
    want = torch.nn.functional.linear(x.double(), W.double(), b.double())
    torch.testing.assert_close(linear.to(torch.float64)(x.double()), want)  # moved: packed afresh


def test_cache_argument_follows_the_model_signature(tiny_llama, caplog):
    from treeopt.decoding.decoder import TreeDecoder
    from treeopt.decoding.models import cache_argument
    from treeopt.core.tree import Tree

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

        def get_decoder(self):
            return self

    assert cache_argument(Old()) == "past_key_values"
    with caplog.at_level("WARNING"):
        TreeDecoder(tiny_llama, None, Tree(()), stop_ids=()).generate([5, 6, 7], 3)
    assert "deprecated" not in caplog.text
