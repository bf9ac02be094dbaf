"""The CUDA paths, checked where a GPU is present (skipped elsewhere; `python -m bench.gpu_check`
runs them together with tests/test_logprob.py, whose Triton cases compile for real on CUDA).

Oracles: the same computation on the CPU (the sampler), the bf16 formula written out (the
log-prob path under autocast), and train.py's own checks (finite losses) for a whole run.
"""
import sys

import pytest
import torch

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from meml import synthetic_assets
    from meml.model import ModelConfig, Transformer
    folder = synthetic_assets.write_synthetic_assets(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.init_weights(std=0.2)
    model.save_pretrained(folder)
    return folder


def test_greedy_generation_on_cuda_equals_cpu(tiny):
    from meml.inference import complete, load
    questions = ["What is 3 + 4?", "Mia has 12 pens and gives away 5. How many now?", "7 * 6 = ?"]
    texts = {}
    for device in ("cpu", "cuda"):
        model, tok = load(tiny, device=device)
        texts[device] = complete(model, tok, questions, max_new_tokens=24).texts
    assert texts["cuda"] == texts["cpu"]


def test_log_probs_under_autocast_on_cuda_are_the_bf16_output_projection(tiny):
    """Mixed precision: the output projection in bf16 (as the sampler's), log-softmax in fp32; the
    Triton kernel is the path taken on CUDA."""
    from meml.inference import load
    from meml.policy import completion_logprobs, pack
    model, tok = load(tiny, device="cuda")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in ("1 + 2?", "10 - 3 = ?")]
    batch = pack(prompts, [tok.encode("3 #### 3"), tok.encode("7")], tok.pad_id, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = completion_logprobs(model, batch, vocab_limit=tok.vocab_size)
        hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)
    width = batch.completion_ids.shape[1]
    hidden = hidden[:, batch.prompt_width - 1:batch.prompt_width - 1 + width]
    logits = (hidden.bfloat16() @ model.output_weight[:tok.vocab_size].bfloat16().T).float()
    expected = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    mask = batch.completion_mask
    assert torch.allclose(got[mask], expected[mask], atol=2e-2)


def test_a_bf16_run_on_cuda_trains_both_stages(tmp_path):
    sys.path.insert(0, str(REPO_ROOT))
    import train
    args = ["--output", str(tmp_path), "--device", "cuda", "--dtype", "bfloat16", "--mef-steps", "3",
            "--riel-steps", "2", "--train-size", "16", "--eval-size", "4", "--pass-k", "0",
            "--max-new-tokens", "16", "--eval-max-new-tokens", "16", "--questions-per-step", "2",
            "--group-size", "4", "--buffer-k", "2", "--buffer-capacity", "2"]
    assert train.main(args) == 0
