"""Every CUDA check and GPU figure of meml in one command, in under 10 minutes on one GPU.

    python -m bench.gpu_check              # on a machine with a CUDA device
    python -m bench.gpu_check --skip-tests # the figures only
    python -m bench.gpu_check --smoke      # tiny sizes on the CPU: checks this script runs

1. The CUDA-only tests: tests/test_logprob.py (its Triton cases compile for real on CUDA: values
   and gradients against the naive path in fp32 and bf16, ragged sizes, ignored rows) and
   tests/test_cuda.py (greedy generation on CUDA equals CPU, log-probs under autocast, a bf16
   train.py run on CUDA).
2. token_logprobs naive / chunked / Triton at N = 8192 tokens, V = 151,936, H = 896 and 1536:
   forward + backward time and peak memory (torch.cuda.max_memory_allocated above the inputs).
3. Generation at the Qwen2.5-0.5B shape, batch 24, 64-token prompts, 128 new tokens, bf16
   weights: tokens/s, and the fraction of the GPU's memory bandwidth a decode step uses
   (weights + the KV cache read once per step, over the step's time).
4. One mixed-precision (bf16 autocast, fp32 masters) RIEL step at the 0.5B shape: 8 questions x
   3 experts x G = 8 rollouts of 128 tokens, E3 + E5 + E6 active, AdamW; time split into
   generation and update, peak memory.
5. Checks of what the CPU tests can only approximate (issue 20): every collective meml uses in a
   one-process NCCL group on RIEL's shapes (contiguity); two bf16 updates in one step (the
   second sees the first's weights); a save and a resume of train.py on CUDA; which SDPA
   kernels meml's attention runs; host syncs over a decode step (set_sync_debug_mode); the
   memory plan against torch.cuda.max_memory_allocated.

Random weights throughout (the shapes decide the time). The figures go to reference_runs/LOG.md
by hand, with the machine they ran on.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-0.5B's shape (its config.json), so this script needs nothing from ../shared.
QWEN_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=True, torch_dtype="bfloat16")
TINY = dict(QWEN_05B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
PEAK_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "A10": 0.6}  # HBM/GDDR, TB/s
DEVICE = "cuda"
SIZES = dict(tokens=8192, vocab=151936, hiddens=(896, 1536), model=QWEN_05B, batch=24, prompt=64, new=128,
             questions=8)
SMOKE = dict(tokens=64, vocab=1000, hiddens=(32,), model=TINY, batch=4, prompt=8, new=6, questions=2)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gb(base: int = 0) -> float:
    return (torch.cuda.max_memory_allocated() - base) / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak() -> int:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up, synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_tests() -> bool:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_logprob.py", "tests/test_cuda.py"]
    print("$", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode == 0


def logprob_table() -> None:
    from meml.logprob import token_logprobs
    n, v = SIZES["tokens"], SIZES["vocab"]
    print(f"\ntoken_logprobs, N = {n}, V = {v}, fp32 and bf16, forward + backward")
    print(f"{'H':>6}{'dtype':>10}{'impl':>9}{'ms':>9}{'peak GB':>9}")
    for h in SIZES["hiddens"]:
        for dtype in (torch.float32, torch.bfloat16):
            for impl in ("naive", "chunked") + (("triton",) if DEVICE == "cuda" else ()):
                hidden = torch.randn(n, h, device=DEVICE, dtype=dtype, requires_grad=True)
                weight = (torch.randn(v, h, device=DEVICE, dtype=dtype) * 0.02).requires_grad_()
                targets = torch.randint(0, v, (n,), device=DEVICE)

                def step(hidden=hidden, weight=weight, targets=targets, impl=impl):
                    token_logprobs(hidden, weight, targets, impl=impl).sum().backward()
                    hidden.grad = weight.grad = None
                try:
                    base = reset_peak()
                    ms = timed(step) * 1e3
                    print(f"{h:>6}{str(dtype)[6:]:>10}{impl:>9}{ms:>9.2f}{peak_gb(base):>9.2f}", flush=True)
                except torch.OutOfMemoryError:
                    print(f"{h:>6}{str(dtype)[6:]:>10}{impl:>9}{'OOM':>9}")
                del hidden, weight, step
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()


def qwen_05b(dtype):
    from meml.model import ModelConfig, Transformer
    with torch.device(DEVICE):
        model = Transformer(ModelConfig.from_hf_dict(SIZES["model"], source="Qwen2.5-0.5B shape"))
    model.init_weights()
    return model.to(dtype)


def generation_table() -> None:
    from meml.sampler import generate
    batch, prompt, new = SIZES["batch"], SIZES["prompt"], SIZES["new"]
    model = qwen_05b(torch.bfloat16).eval()
    prompts = torch.randint(2, SIZES["vocab"] - 1, (batch, prompt)).tolist()

    def run():
        generate(model, prompts, max_new_tokens=new, stop_ids=[], pad_id=0, temperature=1.0,
                 generator=torch.Generator(device=DEVICE).manual_seed(0))
    seconds = timed(run)
    c = model.config
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    mean_len = prompt + new / 2
    kv_bytes = batch * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * mean_len * 2
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    peak = next((tbs for key, tbs in PEAK_TBS.items() if key in name), None)
    per_step = seconds / new
    used = (weight_bytes + kv_bytes) / per_step / 1e12
    share = f"{used / peak:.0%} of {peak} TB/s" if peak else "peak bandwidth of this GPU unknown"
    print(f"\ngeneration, {'smoke' if args_smoke else 'Qwen2.5-0.5B shape'}, bf16, batch {batch}, {prompt} + {new} tokens, T = 1 ({name})")
    print(f"  {batch * new / seconds:,.0f} tokens/s; {per_step * 1e3:.2f} ms per decode step; "
          f"{used:.2f} TB/s read (weights + KV cache), {share}")


def riel_step_figure() -> None:
    from meml import synthetic, synthetic_assets
    from meml.advantage import group_advantages
    from meml.buffer import HardExampleBuffer
    from meml.config import RielConfig
    from meml.e7 import Experts, Grid, Rollouts, backward_e7, e7_batch, micro_batches
    from meml.riel import buffer_targets, fill_buffer
    from meml.sampler import generate
    from meml.tokenizer import Tokenizer
    from meml.trainer import mixed_precision
    questions, n_experts, g, new = SIZES["questions"], 3, 8, SIZES["new"]
    model = qwen_05b(torch.float32)  # fp32 masters; bf16 compute under autocast
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as meml.trainer makes it
    # The synthetic world's tokenizer writes the buffer's SFT prompts and targets (ids < 512);
    # rollouts are random ids sampled over the model's whole vocabulary, as with a real tokenizer.
    tok = Tokenizer.from_pretrained(synthetic_assets.write_synthetic_assets(Path("/tmp/gpu_check_assets")))
    tok.vocab_size = model.config.vocab_size
    examples = synthetic.load_synthetic(n_train=questions, n_eval=1)[0]
    prompt_of = {(q, i): torch.randint(2, SIZES["vocab"] - 1, (40 + 10 * i,),
                                       generator=torch.Generator().manual_seed(q * 7 + i)).tolist()
                 for q in range(questions) for i in range(n_experts)}
    prompts = [prompt_of[q, i] for q in range(questions) for i in range(n_experts) for _ in range(g)]
    rows = torch.arange(len(prompts)).view(questions, n_experts, g)
    cfg = RielConfig(group_size=g, max_new_tokens=new, micro_batch_size=48, buffer_capacity=4, buffer_k=2)
    buffer = HardExampleBuffer(cfg.buffer_capacity, cfg.buffer_k, g, seed=0)
    base = reset_peak()
    sync()
    start = time.perf_counter()
    with mixed_precision(DEVICE, torch.bfloat16):
        gen = generate(model, prompts, max_new_tokens=new, stop_ids=[tok.eot_id], pad_id=tok.pad_id,
                       temperature=1.0, generator=torch.Generator(device=DEVICE).manual_seed(0))
        sync()
        generated = time.perf_counter()
        completions = [ids[m].tolist() for ids, m in zip(gen.completion_ids, gen.completion_mask)]
        rewards = torch.tensor([float(sum(c) % 3 == 0) for c in completions]).view(questions, n_experts, g)
        ro = Rollouts(rows, prompts, completions, [lp[m].cpu() for lp, m in zip(gen.logprobs, gen.completion_mask)],
                      gen.finished.tolist(), [""] * len(prompts), [torch.zeros(len(c)) for c in completions])
        items, _ = fill_buffer(buffer, examples, rewards)
        experts = Experts(tok, list(synthetic.EXPERT_PROMPTS), "synthetic")
        sft = buffer_targets(experts, items, {ex.id: ex for ex in examples}, cfg)[:2]
        b = e7_batch(ro, Grid.of(ro, rewards, cfg), group_advantages(rewards), slice(None), sft, cfg)
        backward_e7(model, experts, b, micro_batches(b, cfg), cfg)
        optimizer.step()
    sync()
    done = time.perf_counter()
    print(f"\nRIEL step, {'Qwen2.5-0.5B shape' if not args_smoke else 'smoke'}, bf16 autocast + fp32 masters, "
          f"{questions} questions x {n_experts} experts x G = {g}, {new} new tokens")
    print(f"  generation {generated - start:.2f} s, update {done - generated:.2f} s "
          f"(E5 on {b.d.inter_expert} questions, {len(items)} buffer items); "
          f"peak {peak_gb(base):.1f} GB")


def collectives_check() -> None:
    """Every collective meml uses, in a one-process NCCL group (gloo in --smoke), on the shapes
    RIEL produces with 2 questions per rank: NCCL refuses non-contiguous tensors where gloo does
    not (the riel_metrics gather of a strided [Q, N, G] view did, issue 20)."""
    import tempfile

    import torch.distributed as dist

    from meml import distributed
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            per_row = torch.arange(3 * 48, dtype=torch.float32, device=DEVICE).view(3, 48)
            rows = torch.arange(48).view(2, 3, 8)  # Q = 2 questions x N = 3 experts x G = 8
            gathered = distributed.all_gather_tensor(per_row[:, rows].movedim(0, 1))
            assert torch.equal(gathered.movedim(1, 0), per_row[:, rows]), "all_gather_tensor"
            assert distributed.all_reduce_sum([1.0, 2.0]).tolist() == [1.0, 2.0], "all_reduce_sum"
            assert distributed.all_reduce_max([3, 1]) == [3, 1], "all_reduce_max"
            assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}], "all_gather_objects"
            model = torch.nn.Linear(4, 3).to(DEVICE)
            model(torch.ones(2, 4, device=DEVICE)).sum().backward()
            distributed.sum_gradients(model)
            distributed.barrier()
            print(f"\ncollectives ({backend}, one process, RIEL's shapes with Q = 2 per rank): all passed")
        finally:
            dist.destroy_process_group()


def second_update_check() -> None:
    """bf16 autocast, two updates in one step: the second forward must be the updated weights'
    (autocast once cached the pre-update bf16 weights across optimizer.step())."""
    import copy
    import tempfile

    from meml.trainer import Stage, make_optimizer, run_stage
    model = qwen_05b(torch.float32)
    ids = torch.randint(2, 1000, (1, 16), device=DEVICE)
    seen = {}

    def step_fn(step):
        for update in range(2):
            if update == 1:
                seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            logits = model(ids)
            seen[update] = logits.detach().float()
            logits.float().logsumexp(-1).mean().backward()
            yield {"loss/total": 0.0}
    stage = Stage("riel", total_steps=1, lr=1e-4, save_every=100, compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        run_stage(stage, model, make_optimizer(model, stage), step_fn, run_dir=Path(tmp), tokenizer_dir=Path(tmp),
                  print_fn=lambda *_: None)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(seen["weights"])
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = fresh(ids).float()
    moved, same = not torch.equal(seen[1], seen[0]), torch.equal(seen[1], expected)
    print(f"\nbf16, two updates per step: second forward {'sees' if same else 'DOES NOT see'} the updated weights"
          f" (moved: {moved})")
    assert moved and same


def save_and_resume_check() -> None:
    """train.py on this device: a run, then the same run stopped after its first RIEL checkpoint
    and resumed: the same final weights (bit for bit on one device)."""
    import shutil
    import tempfile

    from safetensors.torch import load_file
    args = ["--device", DEVICE, "--mef-steps", "2", "--riel-steps", "2", "--save-every", "1", "--train-size", "16",
            "--eval-size", "2", "--pass-k", "0", "--max-new-tokens", "8", "--eval-max-new-tokens", "8",
            "--questions-per-step", "2", "--group-size", "4", "--buffer-k", "2", "--mef-batch-size", "8"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("whole", "resumed"):
            done = subprocess.run([sys.executable, "train.py", "--output", f"{tmp}/{name}"] + args, cwd=REPO_ROOT,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        shutil.rmtree(f"{tmp}/resumed/checkpoint-000004")
        Path(f"{tmp}/resumed/results.json").unlink()
        done = subprocess.run([sys.executable, "train.py", "--resume", f"{tmp}/resumed"], cwd=REPO_ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        a = load_file(f"{tmp}/whole/checkpoint-000004/model.safetensors")
        b = load_file(f"{tmp}/resumed/checkpoint-000004/model.safetensors")
        same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"\nsave and resume on {DEVICE}: final weights {'identical' if same else 'DIFFER'}")
    assert same


def sdpa_and_sync_report() -> None:
    """Which SDPA kernels meml's attention runs (a training forward with its additive mask, and a
    decode step), and the host syncs torch reports over one decode step."""
    import warnings

    from meml.sampler import generate
    if DEVICE != "cuda":
        print("\nSDPA kernels and sync debug: CUDA only")
        return
    model = qwen_05b(torch.bfloat16).eval()
    prompts = torch.randint(2, 1000, (4, 32)).tolist()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(model, prompts, max_new_tokens=4, stop_ids=[], pad_id=0, temperature=1.0,
                 generator=torch.Generator(device=DEVICE).manual_seed(0))
        torch.cuda.synchronize()
    names = {e.name for e in prof.key_averages()}
    kernels = sorted(n for n in names if any(k in n.lower() for k in ("flash", "efficient", "fmha", "attention", "softmax")))
    print("\nSDPA kernels in prefill + decode: " + (", ".join(k[:60] for k in kernels[:6]) or "none found"))
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, prompts, max_new_tokens=2, stop_ids=[], pad_id=0, temperature=1.0,
                 generator=torch.Generator(device=DEVICE).manual_seed(0))
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).split("\n")[0][:100] for w in caught]
    print(f"host syncs over a 2-token generation: {len(syncs)}" + ("".join(f"\n  {s}" for s in syncs[:8])))


def memory_plan_check() -> None:
    """The memory plan (train.py --plan) against torch.cuda.max_memory_allocated for one
    micro-batch's forward and backward plus an AdamW step at the 0.5B shape, bf16 autocast."""
    from meml import memory
    from meml.policy import completion_logprobs, pack
    if DEVICE != "cuda":
        print("\nmemory plan vs measured peak: CUDA only")
        return
    torch.cuda.empty_cache()
    base = reset_peak()
    model = qwen_05b(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    rows, prompt, new = 8, 64, 256
    batch = pack([[3 + r] * prompt for r in range(rows)], [[5 + r] * new for r in range(rows)], 0, DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        completion_logprobs(model, batch).sum().backward()
    optimizer.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    s = memory.Settings(compute=torch.bfloat16, micro_batch_size=rows, prompt_tokens=prompt, completion_tokens=new)
    terms = memory.plan(model.config, s)
    planned = sum(terms[k] for k in ("weights", "gradients", "AdamW states", "update: saved activations",
                                     "update: autocast weight casts", "update: LM-head logit chunk"))
    print(f"\nmemory plan vs measured (0.5B shape, {rows} x {prompt}+{new} tokens, bf16 autocast, AdamW step): "
          f"planned {planned / 2**30:.2f} GiB, measured peak {measured / 2**30:.2f} GiB ({planned / measured:.2f}x)")


args_smoke = False


def main():
    global DEVICE, SIZES, args_smoke
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, tests skipped")
    args = parser.parse_args()
    if args.smoke:
        DEVICE, SIZES, args_smoke = "cpu", SMOKE, True
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device here; run it on a machine with a GPU (or --smoke)")
    ok = True if args.skip_tests or args.smoke else run_tests()
    for check in (collectives_check, second_update_check, save_and_resume_check, sdpa_and_sync_report,
                  memory_plan_check):
        try:
            check()
        except Exception as err:  # noqa: BLE001 -- report every check, then fail at the end
            print(f"\n{check.__name__} FAILED: {type(err).__name__}: {str(err)[:300]}")
            ok = False
    logprob_table()
    generation_table()
    riel_step_figure()
    print("\nCUDA tests " + ("not run" if args.skip_tests or args.smoke else "passed" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
