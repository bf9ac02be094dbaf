"""token_logprobs (meml/logprob.py, meml/logprob_triton.py) against independent oracles.

The oracles: hand-worked numbers on a 3-word vocabulary, torch's cross_entropy and Categorical
entropy in float64, and the naive path (full logits, log_softmax, gather), whose gradients come
from autograd. The chunked and Triton paths are run with tiny chunk and tile sizes so that the
vocabulary is split into several blocks, the last one ragged.

The Triton kernels run on CUDA when a GPU is present; without one they run under
TRITON_INTERPRET=1 on CPU tensors. Triton reads that variable when it is imported, so rather
than setting it inside this process (where another module may already have imported triton,
and where it would leak into other tests) test_triton_path_under_interpreter re-runs this
file's Triton cases in a subprocess that has it from the start.
"""
import importlib
import subprocess
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import meml.logprob as logprob
from meml.logprob import token_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["chunked", "triton"] if DEVICE == "cuda" or INTERPRETED else ["chunked"]


@pytest.fixture(scope="module")
def triton_module():
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernel path is untested")
    return importlib.import_module("meml.logprob_triton")


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of 128 columns (so V = 300 splits 128 + 128 + 44) and 64-wide tiles."""
    monkeypatch.setattr(logprob, "CHUNK_ELEMENTS", 128)
    monkeypatch.setattr(logprob, "MIN_CHUNK_COLUMNS", 128)
    if "meml.logprob_triton" in sys.modules:
        monkeypatch.setattr(sys.modules["meml.logprob_triton"], "BLOCK_V", 64)


@pytest.fixture(params=IMPLS)
def impl(request, small_blocks):
    if request.param == "triton":
        module = request.getfixturevalue("triton_module")
        request.getfixturevalue("monkeypatch").setattr(module, "BLOCK_V", 64)
    return request.param


def make_problem(n=13, h=16, v=300, dtype=torch.float32, seed=0):
    """hidden [n, h], weight [v, h] (logits of a few units, like a trained LM head), targets [n]
    with two ignored rows and the last vocabulary id used."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.7).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[i for i in (2, 7) if i < n]] = -100
    if n > 4:
        targets[4] = v - 1
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def values_and_grads(hidden, weight, targets, temperature, impl, with_entropy):
    """logp, entropy (None unless with_entropy) and d/d(hidden, weight) of sum(a * logp)
    [+ sum(b * entropy)], with fixed random a, b (an advantage-weighted loss, so every row's
    gradient is scaled differently)."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = token_logprobs(hidden, weight, targets, temperature, return_entropy=with_entropy, impl=impl)
    logp, entropy = out if with_entropy else (out, None)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(len(targets), generator=gen).to(DEVICE)
    b = torch.randn(len(targets), generator=gen).to(DEVICE)
    loss = (a * logp).sum() + ((b * entropy).sum() if with_entropy else 0.0)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    return logp, entropy, grad_hidden, grad_weight


def test_hand_worked_three_word_vocabulary(impl):
    # hidden = [1], weight = [[0], [1], [2]]: logits z = (0, 1, 2), Z = 1 + e + e^2 = 11.107338.
    #   log p(2) = 2 - log Z = 2 - 2.407606 = -0.407606
    #   E_p[z] = (e + 2 e^2) / Z = 17.496394 / 11.107338 = 1.575210
    #   entropy = log Z - E_p[z] = 0.832396
    #   d log p(2) / d hidden = w_2 - E_p[w] = 2 - 1.575210 = 0.424790
    # With T = 2: z = (0, 0.5, 1), Z = 1 + 1.648721 + 2.718282 = 5.367003,
    #   log p(0) = -log Z = -1.680270.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [1.0], [2.0]])
    hidden, weight = hidden.to(DEVICE), weight.to(DEVICE)
    for name in ["naive", impl]:
        h = hidden.clone().requires_grad_()
        logp, entropy = token_logprobs(h, weight, torch.tensor([2], device=DEVICE),
                                       return_entropy=True, impl=name)
        logp.sum().backward()
        assert logp.item() == pytest.approx(-0.407606, abs=1e-6)
        assert entropy.item() == pytest.approx(0.832396, abs=1e-6)
        assert h.grad.item() == pytest.approx(0.424790, abs=1e-6)
        assert token_logprobs(hidden, weight, torch.tensor([0], device=DEVICE), 2.0, impl=name).item() == \
            pytest.approx(-1.680270, abs=1e-6)


def test_naive_matches_cross_entropy_and_categorical_entropy_in_float64():
    hidden, weight, targets = make_problem()
    logits = (hidden.double() @ weight.double().T) / 0.8
    expected_logp = -F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    expected_entropy = torch.distributions.Categorical(logits=logits).entropy()
    expected_entropy[targets == -100] = 0.0
    logp, entropy = token_logprobs(hidden, weight, targets, 0.8, return_entropy=True, impl="naive")
    torch.testing.assert_close(logp.double(), expected_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_fp32_values_and_gradients_match_naive(impl, temperature, with_entropy):
    problem = make_problem()
    expected = values_and_grads(*problem, temperature, "naive", with_entropy)
    got = values_and_grads(*problem, temperature, impl, with_entropy)
    for name, g, e in zip(["logp", "entropy", "grad hidden", "grad weight"], got, expected):
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n, v", [(1, 129), (5, 1), (17, 257)])
def test_ragged_sizes_match_naive(impl, n, v):
    hidden, weight, targets = make_problem(n=n, v=v, seed=n)
    targets = targets.clamp(max=v - 1)
    expected = values_and_grads(hidden, weight, targets, 1.0, "naive", True)
    got = values_and_grads(hidden, weight, targets, 1.0, impl, True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=IMPLS)
def impl_at_real_sizes(request):
    """As `impl`, but with the shipped block sizes (CHUNK_ELEMENTS, BLOCK_V), not small ones."""
    if request.param == "triton":
        request.getfixturevalue("triton_module")
    return request.param


@pytest.mark.parametrize("v", [151936, 151665], ids=["qwen-model-rows", "qwen-tokenizer-ids"])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_the_real_vocabulary_at_the_shipped_block_sizes_matches_naive(impl_at_real_sizes, n, v):
    """Qwen2.5's 151,936 embedding rows and its tokenizer's 151,665 ids (the vocabulary limit the
    trainer scores over), at the block sizes a GPU run uses: ragged last tiles and chunks that
    the V <= 300 cases above never reach. Row counts 1, 3 and 17: a single row, fewer rows than
    one tile's worth of programs, and a ragged number."""
    hidden, weight, targets = make_problem(n=n, h=8, v=v, seed=n)
    targets[-1] = v - 1  # the last id, in the ragged last tile
    expected = values_and_grads(hidden, weight, targets, 0.9, "naive", True)
    got = values_and_grads(hidden, weight, targets, 0.9, impl_at_real_sizes, True)
    # The gradient w.r.t. hidden sums 151k fp32 terms of either sign in another order (per block
    # here, in one GEMM there): 2.8e-5 apart measured; a tile or chunk lost moves it by ~1e-2.
    for name, g, e, atol in zip(["logp", "entropy", "grad hidden", "grad weight"], got, expected,
                                [2e-5, 2e-5, 1e-4, 2e-5]):
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bf16_matches_naive_and_float64(impl):
    """bf16 tolerance: every path rounds the same logits to bf16 (unit roundoff u = 2^-9), so
    a logit z moves by up to u |z|; log p then moves by up to 2 u max|z| and every p by the
    factor exp(2 u max|z|), and the bf16 rounding of d/dlogits adds u more. With max|z| ~ 10
    here that is ~4% of each gradient's scale; we allow 4 u max|z| (absolute for logp and
    entropy, relative to the largest entry for gradients) against float64, and half of that
    between implementations."""
    hidden, weight, targets = make_problem(dtype=torch.bfloat16)
    max_logit = (hidden.float() @ weight.float().T).abs().max().item()
    budget = 4 * 2.0 ** -9 * max_logit
    reference = values_and_grads(hidden.double(), weight.double(), targets, 0.7, "naive", True)
    naive = values_and_grads(hidden, weight, targets, 0.7, "naive", True)
    got = values_and_grads(hidden, weight, targets, 0.7, impl, True)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for i, (g, n, r) in enumerate(zip(got, naive, reference)):
        scale = 1.0 if i < 2 else r.abs().max().item()
        assert (g.double() - r).abs().max().item() <= budget * scale
        assert (g.double() - n.double()).abs().max().item() <= budget * scale / 2


def test_ignored_rows_give_zero_and_no_gradient(impl):
    hidden, weight, targets = make_problem()
    logp, entropy, grad_hidden, grad_weight = values_and_grads(hidden, weight, targets, 1.0, impl, True)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (grad_hidden[ignored] == 0).all()
    # The ignored rows' hidden states do not reach the weight's gradient either.
    hidden[ignored] = 100.0
    torch.testing.assert_close(values_and_grads(hidden, weight, targets, 1.0, impl, True)[3], grad_weight)


def test_tied_embedding_and_padded_vocabulary(impl):
    """One weight [V_padded, H] used as input embedding and (its first V rows) as LM head, as
    in a tied Qwen: the gradient adds both uses; padded rows get only the embedding's."""
    gen = torch.Generator().manual_seed(3)
    vocab, padded, width = 250, 260, 16
    shared = (torch.randn(padded, width, generator=gen) * 0.7).to(DEVICE)
    mix = torch.randn(width, width, generator=gen).to(DEVICE) / 4
    input_ids = torch.tensor([3, 255, 17, 249, 100, 0, 42], device=DEVICE)   # 255: a padded id
    targets = torch.tensor([17, 249, 100, -100, 0, 42, 5], device=DEVICE)

    def weight_grad(impl_name):
        weight = shared.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(input_ids, weight) @ mix)             # [7, H]
        logp = token_logprobs(hidden, weight[:vocab], targets, 0.9, impl=impl_name)
        (logp * torch.arange(1.0, 8.0, device=DEVICE)).sum().backward()
        return weight.grad

    expected = weight_grad("naive")
    torch.testing.assert_close(weight_grad(impl), expected, atol=1e-5, rtol=1e-5)
    assert expected[255].abs().sum() > 0                    # reached through the embedding only
    assert (expected[vocab:].abs().sum(1) > 0).tolist() == [i == 255 for i in range(vocab, padded)]


def test_auto_is_chunked_on_cpu():
    hidden, weight, targets = make_problem()
    if DEVICE == "cpu":
        assert torch.equal(token_logprobs(hidden, weight, targets),
                           token_logprobs(hidden, weight, targets, impl="chunked"))


def test_user_errors_name_the_problem():
    hidden, weight, targets = make_problem()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(hidden, weight, targets.clamp(min=0) + 300)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, weight, targets, 0.0)
    with pytest.raises(ValueError, match="impl must be"):
        token_logprobs(hidden, weight, targets, impl="fast")
    with pytest.raises(ValueError, match=r"targets \(12,\)"):
        token_logprobs(hidden, weight, targets[:12])
    assert not math.isnan(token_logprobs(hidden, weight, targets).sum().item())


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED, reason="the Triton cases run in this process")
def test_triton_path_under_interpreter():
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernel path is untested")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton and not under_interpreter"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
