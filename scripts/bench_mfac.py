"""Times MFAC steps against the memory bandwidth the window passes need, and against AdamW.

Dense gradients of a given size (the window passes alone):

    python scripts/bench_mfac.py --params 11171074 --num_grads 128 --grad_dtype bfloat16 [--fill 13] \
        [--authors_optim path/to/M-FAC]

prints the median step time, the bytes the two window passes must move (each pass reads the filled slots once),
the read bandwidth measured in the same run, the ratio of the floor those bytes set to the step, and AdamW's step
time on the same parameters. `--fill F` times the window's F-th step (a window of m slots 1/10 full: F = m / 10);
without it, every slot is visited (as by versions whose passes always visit all). `--authors_optim` times the
authors' step in the same process (on the CPU with two stand-ins for what their code only has on CUDA; see
`on_the_cpu`).

A real model on real batches (row-sparse word-embedding gradients, as in training):

    python scripts/bench_mfac.py --model_config ../shared/data/models/bert-mini-config \
        --train_file ../shared/data/glue/SST-2/train.tsv --num_grads 1024 --grad_dtype bfloat16

builds the model from its config (random weights), takes SST-2 batches of 32 (dynamic padding, at most 128
tokens) and prints the optimizer's state bytes, the peak RSS growth over the optimizer steps, the median
optimizer step and the median forward + backward + step, for MFAC and for AdamW.

The m × m algebra alone (a tiny model, so that the window passes are small next to it):

    python scripts/bench_mfac.py --params 2000 --algebra 256 512 1024 2048 4096 8192

prints, for each window size m, the median MFAC step (the window's factor updated in O(m²), the first step's
factorisation not timed) and the median of its m × m part alone, next to one float64 Cholesky of an m × m matrix
timed in the same run, their ratio, and how the step grows from one m to the next. On the CPU the factor is
updated by the C++ kernel; on a GPU it is made by Cholesky at every step (algebra.refactors_every_step).
`--panel_update` times the device-generic O(m²) panel update instead.

On a GPU, the comparison the README reports, in one run (the authors' optim.py from a folder you fetched; with
their hinv_cuda built in that folder, as their README says, and the folder on PYTHONPATH, their code uses its CUDA
kernels):

    PYTHONPATH=path/to/M-FAC python scripts/bench_mfac.py --model_config ../shared/data/models/bert-mini-config \
        --train_file ../shared/data/glue/SST-2/train.tsv --num_grads 1024 --steps 20 --compare_all \
        --authors_optim path/to/M-FAC

prints the optimizer step and the whole training step of AdamW (fused), our M-FAC dense bf16 and fp32, compressed
(density 0.01) and the authors' M-FAC, each whole step against AdamW's, and each window's bandwidth (two passes
per step) against a device-to-device copy measured in the same run. Then, from further steps under torch.profiler,
where each M-FAC step goes, by the ranges the optimizer marks: flattening the gradient, storing into the window
(finding the word embedding's rows included), the dots, the m × m algebra, the combine, the update, and the rest.

With `--ranks N` (and --model_config), N processes (gloo on CPU, NCCL on GPUs) share one window with
shard=True, each on the same batches (as DDP's averaged gradients are the same everywhere), and each prints its
state bytes, RSS growth and step times. On the CPU the cores are divided among the processes.
"""
import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mfac_optim import MFAC, algebra
try:
    from mfac_optim.config import GRAD_DTYPES
except ImportError:  # a version from before the settings' declaration: timed against this one (PYTHONPATH)
    from mfac_optim.hyperparameters import GRAD_DTYPES
try:
    from mfac_optim.phases import PHASE_PREFIX, PHASES, SUBPHASES
except ImportError:  # a version from before the store's parts were marked: timed against this one (PYTHONPATH)
    from mfac_optim.window import PHASE_PREFIX, PHASES
    SUBPHASES = {"store": ()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=11_171_074, help="parameter count d (default: bert-mini)")
    parser.add_argument("--num_grads", type=int, default=128, help="window size m")
    parser.add_argument("--grad_dtype", choices=sorted(GRAD_DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=7, help="timed steps (after warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model_config", type=Path, help="model folder (config + vocab): benchmark real batches")
    parser.add_argument("--train_file", type=Path, help="SST-2 train.tsv for --model_config")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=1, help="processes sharing a sharded window (with --model_config)")
    parser.add_argument("--density", type=float, nargs="+", default=[1.0],
                        help="MFAC density: < 1 is the compressed window; with --model_config, several are measured "
                             "in one run next to AdamW")
    parser.add_argument("--fill", type=int, default=0,
                        help="with --model_config: this many optimizer steps before the timed ones, on the real "
                             "gradients of the first FILL_BATCHES SST-2 batches in turn, so that the window is full of "
                             "real gradients (e.g. --fill 1024); without --model_config: the timed steps are the "
                             "window's FILL-th and later (the step counter is set: a dense pass's time does not "
                             "depend on what the slots hold), e.g. --fill 51 for a window of 512 a tenth full")
    parser.add_argument("--algebra", type=int, nargs="+", metavar="M",
                        help="time steps at these window sizes next to one float64 Cholesky of each size")
    parser.add_argument("--panel_update", action="store_true",
                        help="with --algebra: time the device-generic O(m²) panel update of the factor (not the C++ "
                             "update on the CPU, nor a Cholesky every step on a GPU)")
    parser.add_argument("--compare_all", action="store_true",
                        help="with --model_config: in one run, AdamW (fused on CUDA), M-FAC dense bf16 and fp32, "
                             "compressed (density 0.01, bf16) and, with --authors_optim, the authors' M-FAC, each "
                             "with its window bandwidth against a device-to-device copy")
    parser.add_argument("--authors_optim", type=Path,
                        help="with --compare_all, or one flat parameter (--params): a folder holding the authors' "
                             "optim.py (github.com/IST-DASLab/M-FAC; fetched by you, never part of this project)")
    parser.add_argument("--config_overrides", type=json.loads, default={},
                        help="JSON of config fields to change (e.g. bert-base shapes from bert-mini's folder)")
    args = parser.parse_args(argv)
    if (args.model_config is None) != (args.train_file is None):
        parser.error("--model_config and --train_file go together")
    if args.compare_all and args.model_config is None:
        parser.error("--compare_all needs --model_config and --train_file")
    if args.authors_optim and not (args.authors_optim / "optim.py").is_file():
        parser.error(f"--authors_optim: no optim.py in {args.authors_optim}")
    if args.authors_optim and args.model_config is not None and not args.compare_all:
        parser.error("--authors_optim: with --model_config, only with --compare_all")
    if args.ranks < 1 or (args.ranks > 1 and args.model_config is None):
        parser.error("--ranks: a positive number of processes, more than 1 only with --model_config")
    return args


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


def fastest_seconds(action, repeats: int, device: torch.device) -> float:
    """The shortest of `repeats` timed runs: the ceiling a shared host lets a run reach."""
    return min(median_seconds(action, 1, device) for _ in range(repeats))


def read_bandwidth(num_bytes: int, device: torch.device) -> float:
    """The best rate of two plain reductions (sum, max) over a buffer of `num_bytes`, over 7 runs each: a ceiling
    for streaming reads on this device (on a shared host the rate varies from run to run)."""
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    for reduction in (buffer.sum, buffer.max):
        reduction()
    return num_bytes / min(fastest_seconds(reduction, 7, device) for reduction in (buffer.sum, buffer.max))


def time_optimizer(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, steps: int, warmup: int,
                   stored: int = 0) -> float:
    """The median step after `warmup` steps; with `stored`, each timed step of an MFAC window stores its
    `stored`-th gradient (the step counter is set back before each): the passes visit that many filled slots,
    whatever the slots hold."""
    generator = torch.Generator(device=param.device).manual_seed(0)
    gradients = itertools.cycle([torch.randn(param.shape, generator=generator, device=param.device) * 1e-3
                                 for _ in range(2)])

    def one_step():
        if stored and "step" in optimizer.state[param]:
            optimizer.state[param]["step"].fill_(stored - 1)
        param.grad = next(gradients)
        optimizer.step()

    for _ in range(warmup):
        one_step()
    return median_seconds(one_step, steps, param.device)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sst2_batches(model_config: Path, train_file: Path, batch_size: int, count: int, device: torch.device) -> list:
    """The first `count` batches of SST-2 sentences, tokenized with dynamic padding (as run_glue.py with
    --pad_to_max_length false)."""
    from transformers import AutoTokenizer

    from mfac_glue.data import read_glue_tsv

    columns = read_glue_tsv(str(train_file), "sst2")
    tokenizer = AutoTokenizer.from_pretrained(model_config)
    batches = []
    for start in range(0, batch_size * count, batch_size):
        batch = tokenizer(columns["sentence"][start:start + batch_size], padding=True, truncation=True,
                          max_length=128, return_tensors="pt")
        batch["labels"] = torch.tensor(columns["label"][start:start + batch_size])
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def time_training(model, optimizer, batches: list, device: torch.device) -> tuple[float, float]:
    """Median seconds of optimizer.step() and of a whole step (forward, backward, clipping, optimizer step)."""
    step_times, total_times = [], []
    for batch in batches:
        synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        synchronize(device)
        before_step = time.perf_counter()
        optimizer.step()
        synchronize(device)
        step_times.append(time.perf_counter() - before_step)
        total_times.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
    return statistics.median(step_times[1:]), statistics.median(total_times[1:])


def model_and_batches(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The model (random weights, seed 0) and the benchmark's SST-2 batches, after one backward pass, so that
    activations and gradients are in the RSS baseline and not in the optimizer's share."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    batches = sst2_batches(args.model_config, args.train_file, args.batch_size, args.steps + 2, device)
    config = AutoConfig.from_pretrained(args.model_config, num_labels=2, **args.config_overrides)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).to(device)
    model(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    return model, batches


# Distinct real gradients the --fill steps take in turn: the window's slots then hold what training stores (for a
# compressed window, top-k positions spread as a real gradient's are), without a forward and backward per step.
FILL_BATCHES = 8


def real_gradients(model: torch.nn.Module, batches: list) -> list[list[torch.Tensor]]:
    """Each batch's gradients (forward, backward, clipping as in training), parameter by parameter."""
    gradients = []
    for batch in batches:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        gradients.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return gradients


def fill_window(model: torch.nn.Module, optimizer: torch.optim.Optimizer, gradients: list, steps: int) -> None:
    for step in range(steps):
        for p, grad in zip(model.parameters(), gradients[step % len(gradients)]):
            p.grad = grad
        optimizer.step()
    model.zero_grad(set_to_none=True)


def measure_mfac(model: torch.nn.Module, batches: list, args: argparse.Namespace, device: torch.device,
                 shard: bool, density: float = 1.0, profile: bool = False) -> dict:
    baseline = peak_rss_bytes()
    mfac = MFAC(model.parameters(), lr=1e-9, num_grads=args.num_grads, damp=1e-6, grad_dtype=args.grad_dtype,
                shard=shard, density=density)
    if args.fill:
        fill_window(model, mfac, real_gradients(model, batches[:FILL_BATCHES]), args.fill)
    step, total = time_training(model, mfac, batches, device)
    phases = None
    if profile:
        with ProfiledPhases(device) as profiled:  # further steps, apart from the timing above
            time_training(model, mfac, batches, device)
        phases = profiled.medians()
    embedding = model.get_input_embeddings().weight
    rows = mfac.state[embedding]["row_values"].shape[1] if "row_values" in mfac.state[embedding] else None
    return {"step": step, "total": total, "state": mfac.memory_bytes(), "rss_growth": peak_rss_bytes() - baseline,
            "rows": rows, "phases": phases, "floors": phases and phase_floors(mfac, model, device)}


def print_setting(args: argparse.Namespace, model: torch.nn.Module, batches: list, rows: int | None,
                  grad_dtype: str | None = None) -> None:
    print(f"model                 {args.model_config} ({sum(p.numel() for p in model.parameters()):,} params)")
    print(f"num_grads m           {args.num_grads}")
    print(f"grad_dtype            {grad_dtype or args.grad_dtype}")
    print(f"batches               {len(batches)} SST-2 batches of {args.batch_size} (window filled by {args.fill} "
          f"steps on {FILL_BATCHES} batches' gradients), "
          f"median length {statistics.median(b['input_ids'].shape[1] for b in batches)}")
    print(f"word-embedding rows   {rows} per slot (capacity after these batches)" if rows else
          "word-embedding rows   stored dense")


def benchmark_model(args: argparse.Namespace, device: torch.device) -> None:
    """Each density in turn (the window filled by the same real batches), then AdamW, in one process. Peak RSS
    growth is measured from the peak so far, so the first configuration's is the clean one: list the smallest first."""
    model, batches = model_and_batches(args, device)
    results = {density: measure_mfac(model, batches, args, device, shard=False, density=density, profile=True)
               for density in args.density}
    adamw_step, adamw_total = time_training(model, torch.optim.AdamW(model.parameters(), lr=1e-9), batches, device)
    print_setting(args, model, batches, next((mfac["rows"] for mfac in results.values() if mfac["rows"]), None))
    for density, mfac in results.items():
        print(f"MFAC density {density:<8g} state {mfac['state'] / 2**30:.2f} GiB; peak RSS growth "
              f"{mfac['rss_growth'] / 2**30:.2f} GiB; step (median) {mfac['step'] * 1e3:.0f} ms; whole training step "
              f"{mfac['total'] * 1e3:.0f} ms; throughput / AdamW {adamw_total / mfac['total']:.2f}")
    print(f"AdamW                 step (median) {adamw_step * 1e3:.0f} ms; whole training step {adamw_total * 1e3:.0f} ms")
    print_floors({f"MFAC density {density:g}": mfac for density, mfac in results.items()}, device)


def copy_bandwidth(num_bytes: int, device: torch.device) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of `num_bytes`, the best of 7."""
    source = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    return 2 * num_bytes / fastest_seconds(lambda: target.copy_(source), 7, device)


def authors_mfac(folder: Path, params: list, num_grads: int, device: torch.device):
    """The authors' M-FAC (their optim.py, imported from `folder`): fp32 window, m × m coefficients per step.
    Returns it, its window's bytes and whether it uses their CUDA kernels. On the CPU their code runs with two
    stand-ins (`on_the_cpu`)."""
    import importlib.util

    if device.type == "cpu":
        on_the_cpu()
    # Their hinv_cuda, built in `folder` (python setup_cuda.py build_ext --inplace), is found through PYTHONPATH.
    spec = importlib.util.spec_from_file_location("authors_mfac_optim", folder / "optim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = list(params)
    optimizer = module.MFAC(params, lr=1e-9, ngrads=num_grads, damp=1e-6, moddev=device, optdev=device,
                            gpus=[device])
    kernels = "hinv_cuda" if module.USE_CUDA else "no hinv_cuda"
    return optimizer, num_grads * sum(p.numel() for p in params) * 4, kernels


def on_the_cpu() -> None:
    """What the authors' optim.py calls that has no CPU version, for this process: torch.lu without pivoting
    (CUDA only), here from a Cholesky factor R of their symmetric positive definite matrix (U = diag(R) R, L = Uᵀ
    scaled to a unit diagonal: the same factors), and nn.parallel.parallel_apply, which needs an accelerator, here
    each function on its input in turn (they pass one per device, and here there is one device)."""
    def lu_without_pivoting(matrix: torch.Tensor, pivot: bool = False) -> tuple[torch.Tensor, None]:
        upper = torch.linalg.cholesky(matrix, upper=True)
        upper = upper.diagonal()[:, None] * upper
        return upper + (upper / upper.diagonal()[:, None]).T.tril(-1), None

    torch.lu = lu_without_pivoting
    torch.nn.parallel.parallel_apply = lambda functions, inputs: [f(x) for f, x in zip(functions, inputs)]


def benchmark_all(args: argparse.Namespace, device: torch.device) -> None:
    """One process, the same real batches: AdamW, our M-FAC in three forms, the authors' M-FAC if given."""
    model, batches = model_and_batches(args, device)
    settings = {f"MFAC dense bf16, m={args.num_grads}": dict(grad_dtype="bfloat16"),
                f"MFAC dense fp32, m={args.num_grads}": dict(grad_dtype="float32"),
                f"MFAC compressed 0.01 bf16, m={args.num_grads}": dict(grad_dtype="bfloat16", density=0.01)}
    rows, phase_rows, sparse_rows = [], [], None
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=device.type == "cuda")
    rows.append(("AdamW" + (" (fused)" if device.type == "cuda" else ""), *time_training(model, adamw, batches, device),
                 None))
    del adamw
    for name, options in settings.items():
        mfac = MFAC(model.parameters(), lr=1e-9, num_grads=args.num_grads, damp=1e-6, **options)
        step, total = time_training(model, mfac, batches, device)
        rows.append((name, step, total, mfac.window_bytes()))
        with ProfiledPhases(device) as phases:  # further steps, apart from the timing above
            time_training(model, mfac, batches, device)
        phase_rows.append((name, phases.medians()))
        embedding = mfac.state[model.get_input_embeddings().weight]
        if "row_values" in embedding:
            sparse_rows = embedding["row_values"].shape[1]
        del mfac
    if args.authors_optim:
        optimizer, window, kernels = authors_mfac(args.authors_optim, model.parameters(), args.num_grads, device)
        rows.append((f"authors' M-FAC ({kernels}, fp32), m={args.num_grads}",
                     *time_training(model, optimizer, batches, device), window))
        del optimizer
    largest = max(window for *_, window in rows if window)
    copy = copy_bandwidth(min(largest, 4 << 30), device)
    adamw_total = rows[0][2]
    print_setting(args, model, batches, sparse_rows, grad_dtype="per row below")
    print(f"device-to-device copy {copy / 1e9:.0f} GB/s (read + write)")
    print(f"{'optimizer':<40} {'step ms':>9} {'whole step ms':>14} {'vs AdamW':>9} {'window GiB':>11} "
          f"{'window GB/s':>12} {'vs copy':>8}")
    for name, step, total, window in rows:
        bandwidth = 2 * window / step if window else None  # two passes over the window per step
        print(f"{name:<40} {step * 1e3:>9.2f} {total * 1e3:>14.2f} {adamw_total / total:>9.2f} "
              + (f"{window / 2**30:>11.2f} {bandwidth / 1e9:>12.0f} {bandwidth / copy:>8.2f}" if window else ""))
    print_phases(phase_rows)


def sharded_rank(rank: int, args: argparse.Namespace, folder: str) -> None:
    """One process of the --ranks benchmark: its measurements go to folder/rank<r>.json."""
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=args.ranks)
    try:
        model, batches = model_and_batches(args, device)
        result = measure_mfac(model, batches, args, device, shard=True, density=args.density[0])
        result["threads"] = torch.get_num_threads()
        if rank == 0:
            print_setting(args, model, batches, result["rows"])
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def benchmark_sharded(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(sharded_rank, args=(args, folder), nprocs=args.ranks, join=True)
        results = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(args.ranks)]
    print(f"processes             {args.ranks} sharing one window (shard=True), {results[0]['threads']} threads each")
    for rank, result in enumerate(results):
        print(f"rank {rank}: MFAC state {result['state'] / 2**30:.2f} GiB, peak RSS growth "
              f"{result['rss_growth'] / 2**30:.2f} GiB, MFAC step (median) {result['step'] * 1e3:.0f} ms, "
              f"whole training step {result['total'] * 1e3:.0f} ms")


def benchmark_window(args: argparse.Namespace, device: torch.device) -> None:
    """One flat parameter of --params coordinates with dense random gradients: our step (and the authors', with
    --authors_optim) against the bytes its window passes must move at the read bandwidth measured in the same run,
    and AdamW's step."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(args.params, device=device) * 0.02)
    density = args.density[0]
    mfac = MFAC([param], lr=1e-9, num_grads=args.num_grads, damp=1e-6, grad_dtype=args.grad_dtype,
                density=density)
    filled = min(args.fill, args.num_grads) if args.fill else None
    rows = [(f"MFAC {args.grad_dtype}", time_optimizer(mfac, param, args.steps, warmup=2, stored=args.fill),
             mfac.window_bytes() * (filled or args.num_grads) / args.num_grads)]
    del mfac
    if args.authors_optim:
        authors, window, kernels = authors_mfac(args.authors_optim, [param], args.num_grads, device)
        rows.append((f"authors' ({kernels}, float32)", time_optimizer(authors, param, args.steps, warmup=2), window))
        del authors
    bandwidth = read_bandwidth(int(min(max(window for *_, window in rows), 4 << 30)), device)
    adamw_seconds = time_optimizer(torch.optim.AdamW([param], lr=1e-9), param, args.steps, warmup=2)
    print(f"device                {device} ({torch.get_num_threads()} threads)" if device.type == "cpu"
          else f"device                {torch.cuda.get_device_name(device)}")
    print(f"params d              {args.params:,}")
    print(f"num_grads m           {args.num_grads}")
    print(f"density               {density}")
    print(f"filled slots          {filled if filled else 'all (the passes of an older version visit every slot)'}")
    print(f"measured read bw      {bandwidth / 1e9:.1f} GB/s")
    print(f"AdamW step (median)   {adamw_seconds * 1e3:.1f} ms")
    print(f"{'optimizer':<32} {'step ms':>9} {'window GiB':>11} {'GB / step':>10} {'GB/s':>7} {'floor ms':>9} "
          f"{'floor / step':>13}")
    for name, seconds, window in rows:
        moved = 2 * window  # two passes over the visited slots
        floor = moved / bandwidth
        print(f"{name:<32} {seconds * 1e3:>9.1f} {window / 2**30:>11.2f} {moved / 1e9:>10.2f} "
              f"{moved / seconds / 1e9:>7.1f} {floor * 1e3:>9.1f} {floor / seconds:>13.2f}")


def cholesky_seconds(size: int, device: torch.device) -> float:
    """One float64 Cholesky of a size × size positive definite matrix (median of 3)."""
    rows = torch.randn(size, size, dtype=torch.float64, device=device)
    matrix = rows @ rows.T + size * torch.eye(size, dtype=torch.float64, device=device)
    return median_seconds(lambda: torch.linalg.cholesky(matrix), 3, device)


# The whole step, as torch.optim marks it for the profiler.
STEP_RANGE = f"Optimizer.step#{MFAC.__name__}.step"


class ProfiledPhases:
    """While active, torch.profiler records the ranges the optimizer marks: each phase of a step (window.PHASES)
    and the whole step. On a GPU a phase's time is its span on the device (the profiler's annotation of the range
    there), on the CPU its wall time. "other" is the rest of the step: the finiteness check, the bookkeeping."""

    def __init__(self, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.device = device
        self.profiler = profile(activities=activities)

    def __enter__(self) -> "ProfiledPhases":
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.profiler.__exit__(*exc)

    def steps(self) -> list[dict[str, float]]:
        """Per optimizer step: seconds of each phase, "other" and the whole "step"."""
        from torch.autograd import DeviceType

        events = self.profiler.events()
        on_device = self.device.type == "cuda" and any(event.device_type == DeviceType.CUDA and
                                                        event.name.startswith(PHASE_PREFIX) for event in events)
        wanted = DeviceType.CUDA if on_device else DeviceType.CPU
        ranges = sorted(((event.time_range.start, event.time_range.end, event.name) for event in events
                         if event.name == STEP_RANGE and event.device_type == wanted
                         or event.name.startswith(PHASE_PREFIX) and event.device_type == wanted))
        steps = []
        for start, end, name in ranges:
            if name == STEP_RANGE:
                steps.append({**dict.fromkeys(PHASES + SUBPHASES["store"], 0.0), "step": (end - start) / 1e6,
                              "_end": end})
            elif steps and start < steps[-1]["_end"]:
                steps[-1][name.removeprefix(PHASE_PREFIX)] += (end - start) / 1e6
        for step in steps:
            del step["_end"]
            step["other"] = step["step"] - sum(step[phase] for phase in PHASES)
        return steps

    def medians(self, skip: int = 1) -> dict[str, float]:
        """Each phase's median seconds per step over the steps after the first `skip` (the first step allocates the
        window)."""
        steps = self.steps()[skip:]
        return {phase: statistics.median(step[phase] for step in steps)
                for phase in [*PHASES, *SUBPHASES["store"], "other", "step"]}


def fma_peak(device: torch.device) -> float:
    """fp32 multiply-adds per second at the FMA peak of this CPU's cores: 2 FMA units × 8 lanes (AVX2) per core
    per cycle, at the clock /proc/cpuinfo reports (None where it reports none, or off the CPU)."""
    if device.type != "cpu":
        return None
    try:
        with open("/proc/cpuinfo") as info:
            mhz = next(float(line.split(":")[1]) for line in info if line.startswith("cpu MHz"))
    except (OSError, StopIteration):
        return None
    return torch.get_num_threads() * 2 * 8 * mhz * 1e6


def phase_floors(mfac: MFAC, model: torch.nn.Module, device: torch.device) -> dict[str, tuple[float, float]]:
    """Per phase, (bytes it must move, fp32-equivalent multiply-adds it must do) at this window's fill: the floor a
    phase could reach is the larger of bytes / read bandwidth and work / FMA peak. Float64 multiply-adds count
    twice (4 lanes, not 8)."""
    d = sum(p.numel() for p in model.parameters())
    num_grads = mfac.param_groups[0]["num_grads"]
    filled = min(int(mfac.state[next(model.parameters())]["step"]), num_grads)
    visited = mfac.window_bytes() * filled / num_grads  # the filled slots' bytes: what each window pass reads
    compressed = mfac.param_groups[0]["density"] < 1
    floors = {
        "gradient": (8 * d, 0),  # read the gradients, write the flat gradient
        "error feedback": (12 * d, 0),  # read e and g, write e
        "top-k": (4 * d, 0),  # read a (the kept entries' writes are a hundredth of it)
        "dots": (visited, 0),
        "m×m": (2 * 8 * num_grads ** 2, 2 * 3 * num_grads ** 2),  # the factor read and written, its rotations
        "combine": (visited + 4 * d, 0),  # and the direction written
        "update": (12 * d, 0),  # read the direction, read and write the parameters
    }
    # A dense store reads the gradient and writes one slot of the window.
    floors["store"] = (floors["error feedback"][0] + floors["top-k"][0] if compressed else
                       4 * d + mfac.window_bytes() / num_grads, 0)
    return floors


def print_floors(results: dict[str, dict], device: torch.device) -> None:
    """Each phase's median time beside its floor at the read bandwidth measured now (and the FMA peak)."""
    largest = max(mfac["floors"]["dots"][0] for mfac in results.values())
    bandwidth, peak = read_bandwidth(int(min(max(largest, 1 << 28), 4 << 30)), device), fma_peak(device)
    print(f"where an M-FAC step goes, ms (median per step, from torch.profiler), beside each phase's floor: its bytes "
          f"at the read bandwidth measured now ({bandwidth / 1e9:.1f} GB/s)"
          + (f" or its work at the FMA peak ({peak / 1e9:.0f} G fp32 FMA/s)" if peak else ""))
    print(f"{'optimizer':<22} {'phase':<15} {'ms':>8} {'floor ms':>9} {'floor / ms':>11}")
    for name, mfac in results.items():
        for phase in [*PHASES, *SUBPHASES["store"], "other", "step"]:
            seconds = mfac["phases"][phase]
            if phase not in mfac["floors"]:
                print(f"{name:<22} {phase:<15} {seconds * 1e3:>8.2f}")
            elif seconds > 0:  # a dense window's store has no error feedback nor top-k
                moved, work = mfac["floors"][phase]
                floor = max(moved / bandwidth, work / peak if peak else 0)
                print(f"{name:<22} {phase:<15} {seconds * 1e3:>8.2f} {floor * 1e3:>9.2f} {floor / seconds:>11.2f}")


def print_phases(rows: list[tuple[str, dict[str, float]]]) -> None:
    print("where an M-FAC step goes, ms (median per step, from torch.profiler)")
    print(f"{'optimizer':<40} " + " ".join(f"{phase:>14}" for phase in [*PHASES, *SUBPHASES["store"], "other", "step"]))
    for name, phases in rows:
        print(f"{name:<40} " + " ".join(f"{seconds * 1e3:>14.2f}" for seconds in phases.values()))


def factor_policy(panel_update: bool, device: torch.device) -> str:
    if panel_update:
        return "updated by panels (device-generic)"
    return "made by Cholesky every step" if algebra.refactors_every_step(device) else "updated by the compiled kernel"


def benchmark_algebra(args: argparse.Namespace, device: torch.device) -> None:
    if args.panel_update:  # the O(m²) update without the compiled kernel (a CPU without a compiler), on any device
        algebra.cpu_passes = lambda: None
        algebra.refactors_every_step = lambda device: False
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(args.params, device=device) * 0.02)
    print(f"device {device} ({torch.get_num_threads()} threads), d = {args.params:,} parameters, "
          f"{args.grad_dtype} window, λ = 1e-6, median of {args.steps} steps, "
          f"factor: {factor_policy(args.panel_update, device)}")
    print(f"{'m':>6} {'step ms':>9} {'m×m ms':>8} {'Cholesky ms':>12} {'step/Cholesky':>14} {'step growth':>12} "
          f"{'factorisations':>15}")
    steps = {}
    for size in args.algebra:
        mfac = MFAC([param], lr=1e-9, num_grads=size, damp=1e-6, grad_dtype=args.grad_dtype)
        with ProfiledPhases(device) as phases:
            steps[size] = time_optimizer(mfac, param, args.steps, warmup=2)
        made = int(mfac.state[param]["refactorizations"])  # 1: only the first step's
        del mfac
        cholesky = cholesky_seconds(size, device)
        previous = [m for m in steps if m < size]
        growth = f"{steps[size] / steps[previous[-1]]:.1f}x" if previous else ""
        print(f"{size:>6} {steps[size] * 1e3:>9.2f} {phases.medians(skip=2)['m×m'] * 1e3:>8.2f} "
              f"{cholesky * 1e3:>12.1f} {steps[size] / cholesky:>14.3f} {growth:>12} {made:>15}", flush=True)
    if 1024 in steps and 4096 in steps:
        print(f"step growth from m = 1024 to 4096: {steps[4096] / steps[1024]:.1f}x (O(m^2): 16x, O(m^3): 64x)")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.ranks > 1:
        benchmark_sharded(args)
        return
    if args.compare_all:
        benchmark_all(args, device)
        return
    if args.model_config is not None:
        benchmark_model(args, device)
        return
    if args.algebra:
        benchmark_algebra(args, device)
        return
    benchmark_window(args, device)


if __name__ == "__main__":
    main()
