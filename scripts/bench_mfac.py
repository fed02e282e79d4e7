"""Times one MFAC step against the memory bandwidth the window passes need, and against AdamW.

    python scripts/bench_mfac.py --params 11171074 --num_grads 128 --grad_dtype bfloat16

Prints the median step time, the bytes the two window passes must move (each pass reads the whole window once),
the read bandwidth measured in the same run, the ratio of achieved to measured bandwidth, and AdamW's step time
on the same parameters.
"""
import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mfac_optim import GRAD_DTYPES, MFAC  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=11_171_074, help="parameter count d (default: bert-mini)")
    parser.add_argument("--num_grads", type=int, default=128, help="window size m")
    parser.add_argument("--grad_dtype", choices=sorted(GRAD_DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=7, help="timed steps (after warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(action, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        action()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(num_bytes: int, device: torch.device) -> float:
    """Bytes per second of a sum over a buffer of `num_bytes`: the rate at which this device streams memory."""
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    buffer.sum()
    return num_bytes / median_seconds(buffer.sum, 5, device)


def time_optimizer(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, steps: int, warmup: int) -> float:
    generator = torch.Generator(device=param.device).manual_seed(0)
    gradients = itertools.cycle([torch.randn(param.shape, generator=generator, device=param.device) * 1e-3
                                 for _ in range(2)])

    def one_step():
        param.grad = next(gradients)
        optimizer.step()

    for _ in range(warmup):
        one_step()
    return median_seconds(one_step, steps, param.device)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(args.params, device=device) * 0.02)

    element_bytes = torch.tensor([], dtype=GRAD_DTYPES[args.grad_dtype]).element_size()
    window_bytes = args.num_grads * args.params * element_bytes
    pass_bytes = 2 * window_bytes
    bandwidth = read_bandwidth(min(window_bytes, 4 << 30), device)

    mfac = MFAC([param], lr=1e-9, num_grads=args.num_grads, damp=1e-6, grad_dtype=args.grad_dtype)
    mfac_seconds = time_optimizer(mfac, param, args.steps, warmup=2)
    del mfac
    adamw_seconds = time_optimizer(torch.optim.AdamW([param], lr=1e-9), param, args.steps, warmup=2)

    achieved = pass_bytes / mfac_seconds
    print(f"device                {device} ({torch.get_num_threads()} threads)" if device.type == "cpu"
          else f"device                {torch.cuda.get_device_name(device)}")
    print(f"params d              {args.params:,}")
    print(f"num_grads m           {args.num_grads}")
    print(f"grad_dtype            {args.grad_dtype}")
    print(f"window                {window_bytes / 2**30:.2f} GiB")
    print(f"MFAC step (median)    {mfac_seconds * 1e3:.1f} ms")
    print(f"window bytes / step   {pass_bytes / 1e9:.2f} GB (two passes)")
    print(f"achieved bandwidth    {achieved / 1e9:.1f} GB/s")
    print(f"measured read bw      {bandwidth / 1e9:.1f} GB/s")
    print(f"ratio                 {achieved / bandwidth:.2f}")
    print(f"AdamW step (median)   {adamw_seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
