"""Peak memory and time of token_logprobs forward+backward: naive vs chunked, fp32 on CPU.

    python -m bench.bench_logprob                     # the issue's grid
    python -m bench.bench_logprob --n 2048 --h 896    # one setting

Each (impl, N, H) runs in a fresh subprocess so that peak RSS (VmHWM in /proc/self/status) is
that setting's own; time is wall-clock and process CPU time (all threads; steadier than wall
time on a loaded machine); "peak above inputs" is VmHWM after the backward minus VmHWM once hidden,
weight and targets exist. It includes the gradients of hidden and weight (V x H: 0.54 GB at
H = 896, 0.93 GB at H = 1536), which any implementation must return. A setting whose estimated
peak does not fit in MemAvailable is skipped, not run: this machine is shared.
"""
import argparse
import json
import os
import subprocess
import sys
import time

VOCAB = 151936


def proc_kib_field(path: str, key: str) -> int:
    """A "Key:   123 kB" line of a /proc file, in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in {path} (needs Linux)")


def vm_hwm_bytes():
    return proc_kib_field("/proc/self/status", "VmHWM")  # this process's peak resident memory


def mem_available_bytes():
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def estimated_peak_bytes(impl, n, h, vocab, chunk_elements):
    """Rough peak above inputs, from the sizes autograd / the chunk loop keep alive."""
    grads = 4 * (vocab * h + n * h)
    if impl == "naive":
        return grads + 4 * 4 * n * vocab    # logits, log_softmax, gather-grad, softmax-grad
    return grads + 3 * 4 * chunk_elements


def run_one(impl, n, h, vocab, temperature, chunk_elements):
    """Child process: build inputs, time one forward+backward, report peak RSS above inputs."""
    import torch
    import meml.logprob as logprob
    if chunk_elements:
        logprob.CHUNK_ELEMENTS = chunk_elements
    torch.manual_seed(0)
    # Warm the BLAS and the allocator on a toy problem first, outside the measurement.
    logprob.token_logprobs(torch.randn(8, h, requires_grad=True), torch.randn(64, h),
                           torch.zeros(8, dtype=torch.long), impl=impl).sum().backward()
    hidden = torch.randn(n, h).requires_grad_()                      # [N, H]
    weight = torch.randn(vocab, h).mul_(h ** -0.5).requires_grad_()  # [V, H], logits ~ N(0, 1)
    # (in place: a freed temporary would raise VmHWM's baseline and hide real peak)
    targets = torch.randint(0, vocab, (n,))                          # [N]
    grad_weights = torch.randn(n)                                    # advantage-like per-token weights
    baseline = vm_hwm_bytes()
    start, start_cpu = time.perf_counter(), time.process_time()
    logp = logprob.token_logprobs(hidden, weight, targets, temperature, impl=impl)
    (logp * grad_weights).sum().backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return {"peak_above_inputs": vm_hwm_bytes() - baseline, "seconds": seconds, "cpu_seconds": cpu_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--n", type=int, nargs="+", default=[512, 2048, 8192], help="token counts N")
    grid.add_argument("--h", type=int, nargs="+", default=[896, 1536], help="hidden sizes H")
    grid.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary size V")
    grid.add_argument("--impl", nargs="+", default=["naive", "chunked"], help="implementations")
    grid.add_argument("--temperature", type=float, default=1.0)
    grid.add_argument("--chunk-elements", type=int, default=0,
                      help="override meml.logprob.CHUNK_ELEMENTS (0: keep the default)")
    grid.add_argument("--child", help=argparse.SUPPRESS)   # internal: run one setting, print JSON
    args = parser.parse_args()

    if args.child:
        impl, n, h = args.child.split(",")
        print(json.dumps(run_one(impl, int(n), int(h), args.vocab, args.temperature, args.chunk_elements)))
        return

    import meml.logprob as logprob
    chunk_elements = args.chunk_elements or logprob.CHUNK_ELEMENTS
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    print(f"# V = {args.vocab}, fp32, CPU, T = {args.temperature}, chunk elements = {chunk_elements}")
    print(f"{'N':>6} {'H':>5} {'impl':>8} {'peak above inputs (GB)':>23} {'fwd+bwd wall (s)':>17} {'CPU (s)':>8}")
    for n in args.n:
        for h in args.h:
            for impl in args.impl:
                need = estimated_peak_bytes(impl, n, h, args.vocab, chunk_elements) + 4 * (n + args.vocab) * h
                if need > 0.8 * mem_available_bytes():
                    print(f"{n:>6} {h:>5} {impl:>8}   skipped: needs ~{need / 1e9:.1f} GB, "
                          f"{mem_available_bytes() / 1e9:.1f} GB available")
                    continue
                cmd = [sys.executable, "-m", "bench.bench_logprob", "--child", f"{impl},{n},{h}",
                       "--vocab", str(args.vocab), "--temperature", str(args.temperature),
                       "--chunk-elements", str(args.chunk_elements)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{n:>6} {h:>5} {impl:>8}   failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{n:>6} {h:>5} {impl:>8} {result['peak_above_inputs'] / 1e9:>23.2f} "
                      f"{result['seconds']:>17.1f} {result['cpu_seconds']:>8.1f}", flush=True)
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
