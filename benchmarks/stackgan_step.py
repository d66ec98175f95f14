"""StackGAN training-step time and peak memory: gensuite's networks vs the authors' model.py.

A step is the original trainer's: one generator forward, a discriminator Adam step on the
matching-aware loss (real + (wrong + fake)/2; Stage II adds the unconditional terms as in its
compute_discriminator_loss), then a generator Adam step on the adversarial loss + 2.0 * KL, reusing
that forward. Birds settings; Stage I: batch 16, 64 px; Stage II: batch 4, 64 -> 256 px with the
frozen Stage-I generator run inside the step, as the original STAGE2_G does. Random images and
1024-d embeddings. Our rows freeze D during the generator step (the original also computes D's
weight gradients there, then discards them).

Each row runs in a fresh subprocess, so its peak memory is its own: max RSS growth over the
process's state after imports on CPU, torch.cuda.max_memory_allocated on GPU. With --original the
authors' networks run the same way (their miscc.config stubbed with the birds settings, CA_NET's
CUDA-only sampling monkeypatched to torch.randn_like) and every row gets its speed-up against them.
Never asserted by tests.

    python benchmarks/stackgan_step.py [--original StackGAN-Pytorch/code] [--steps 2] [--warmup 1]
                                       [--stages 1,2] [--cuda [--skip-cpu]]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_DIM, C_DIM, Z_DIM, GF_DIM, DF_DIM, RES_BLOCKS = 1024, 128, 100, 128, 64, 4
KL_WEIGHT, LR, BETAS = 2.0, 2e-4, (0.5, 0.999)
IMAGE_SIZE = {1: 64, 2: 256}

OURS_CPU = [  # (label, options): each a single change from the fp32 baseline, bar the paired row
    ("ours fp32", {}),
    ("ours bf16 autocast", {"bf16": True}),
    ("ours bf16 + paired D", {"bf16": True, "paired": True}),
    ("ours pixelshuffle fp32", {"upsample": "pixelshuffle"}),
    ("ours channels_last fp32", {"channels_last": True}),
]
OURS_CUDA = [
    ("ours fp32", {}),
    ("ours bf16 autocast", {"bf16": True}),
    ("ours bf16 + paired D", {"bf16": True, "paired": True}),
    ("ours bf16 + paired D + channels_last", {"bf16": True, "paired": True, "channels_last": True}),
    ("ours bf16 + paired D + compile", {"bf16": True, "paired": True, "compile": True}),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- ours

def ours_step(stage: int, batch: int, device, opts: dict):
    import torch
    import torch.nn.functional as F

    from gensuite.families.stackgan.networks import (Stage1Discriminator, Stage1Generator, Stage2Discriminator,
                                                     Stage2Generator)

    upsample = opts.get("upsample", "nearest_conv")
    if stage == 1:
        frozen = None
        G = Stage1Generator(Z_DIM, C_DIM, TEXT_DIM, GF_DIM, upsample=upsample)
        D = Stage1Discriminator(C_DIM, DF_DIM, IMAGE_SIZE[1])
    else:
        frozen = Stage1Generator(Z_DIM, C_DIM, TEXT_DIM, GF_DIM).requires_grad_(False).to(device)
        G = Stage2Generator(C_DIM, TEXT_DIM, GF_DIM, RES_BLOCKS, upsample=upsample)
        D = Stage2Discriminator(C_DIM, DF_DIM, IMAGE_SIZE[2])
    memory_format = torch.channels_last if opts.get("channels_last") else torch.contiguous_format
    G.to(device, memory_format=memory_format)
    D.to(device, memory_format=memory_format)
    if frozen is not None:
        frozen.to(memory_format=memory_format)
    opt_g = torch.optim.Adam(G.parameters(), LR, betas=BETAS)
    opt_d = torch.optim.Adam(D.parameters(), LR, betas=BETAS)
    size = IMAGE_SIZE[stage]
    real = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    embedding = torch.randn(batch, TEXT_DIM, device=device)
    noise = torch.empty(batch, Z_DIM, device=device)
    generate, features = G, D.features
    if opts.get("compile"):
        generate, features = torch.compile(G), torch.compile(D.features)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bool(opts.get("bf16")))
    paired, n = bool(opts.get("paired")), batch

    def bce(logits, target: float):
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

    def step() -> tuple[float, float]:
        noise.normal_()
        with autocast:
            if frozen is None:
                fake, mu, logvar = generate(noise, embedding)
            else:
                with torch.no_grad():
                    low = frozen(noise, embedding)[0].contiguous(memory_format=memory_format)
                fake, mu, logvar = generate(low, embedding)
            cond = mu.detach()
            if paired:  # one conv pass and one head pass; BatchNorm statistics per part as separate calls
                both = features(torch.cat([real, fake.detach()]), groups=2)
                real_f, fake_f = both[:n], both[n:]
                logits = D.cond_logits(torch.cat([real_f, real_f[:-1], fake_f]), torch.cat([cond, cond[1:], cond]),
                                       groups=(n, n - 1, n))
                real_l, wrong_l, fake_l = logits.split([n, n - 1, n])
                if stage == 2:
                    u_real, u_fake = D.uncond_logits(both).split([n, n])
            else:
                real_f, fake_f = features(real), features(fake.detach())
                real_l, wrong_l = D.cond_logits(real_f, cond), D.cond_logits(real_f[:-1], cond[1:])
                fake_l = D.cond_logits(fake_f, cond)
                if stage == 2:
                    u_real, u_fake = D.uncond_logits(real_f), D.uncond_logits(fake_f)
        if stage == 1:
            d_loss = bce(real_l, 1) + 0.5 * (bce(wrong_l, 0) + bce(fake_l, 0))
        else:
            d_loss = (bce(real_l, 1) + bce(u_real, 1)) / 2 + (bce(fake_l, 0) + bce(wrong_l, 0) + bce(u_fake, 0)) / 3
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        D.requires_grad_(False)
        with autocast:
            fake_f = features(fake)
            g_loss = bce(D.cond_logits(fake_f, cond), 1)
            if stage == 2:
                g_loss = g_loss + bce(D.uncond_logits(fake_f), 1)
        mu, logvar = mu.float(), logvar.float()
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        g_loss = g_loss + KL_WEIGHT * kl
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)
        return d_loss.item(), g_loss.item()

    return step


# ---------------------------------------------------------------- the authors' model.py

def load_original(code_dir: Path, device):
    """Their model.py with miscc.config stubbed (birds settings) and CA_NET sampling made device-agnostic."""
    import torch

    ns = types.SimpleNamespace
    cfg = ns(CUDA=device.type == "cuda", Z_DIM=Z_DIM, TEXT=ns(DIMENSION=TEXT_DIM),
             GAN=ns(CONDITION_DIM=C_DIM, GF_DIM=GF_DIM, DF_DIM=DF_DIM, R_NUM=RES_BLOCKS))
    miscc, config = types.ModuleType("miscc"), types.ModuleType("miscc.config")
    config.cfg, miscc.config = cfg, config
    sys.modules.update({"miscc": miscc, "miscc.config": config})
    spec = importlib.util.spec_from_file_location("stackgan_original_model", code_dir / "model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)

    def reparametrize(self, mu, logvar):  # theirs allocates torch.cuda.FloatTensor when cfg.CUDA
        std = logvar.mul(0.5).exp_()
        return torch.randn_like(std).mul(std).add_(mu)

    model.CA_NET.reparametrize = reparametrize
    return model


def original_step(stage: int, batch: int, device, code_dir: Path):
    import torch
    from torch import nn

    from gensuite.families.stackgan.networks import init_weights  # same draws as their weights_init

    model = load_original(code_dir, device)
    if stage == 1:
        G, D = model.STAGE1_G(), model.STAGE1_D()
    else:
        G, D = model.STAGE2_G(model.STAGE1_G()), model.STAGE2_D()
    init_weights(G)
    init_weights(D)
    G.to(device)
    D.to(device)
    opt_d = torch.optim.Adam(D.parameters(), LR, betas=BETAS)
    opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], LR, betas=BETAS)
    size = IMAGE_SIZE[stage]
    real = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    embedding = torch.randn(batch, TEXT_DIM, device=device)
    noise = torch.empty(batch, Z_DIM, device=device)
    ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
    criterion = nn.BCELoss()

    def step() -> tuple[float, float]:  # trainer.py's loop body with utils.py's losses, minus data_parallel
        noise.normal_(0, 1)
        _, fake, mu, logvar = G(embedding, noise)
        D.zero_grad()
        cond = mu.detach()
        real_f, fake_f = D(real), D(fake.detach())
        err_real = criterion(D.get_cond_logits(real_f, cond), ones)
        err_wrong = criterion(D.get_cond_logits(real_f[:batch - 1], cond[1:]), zeros[1:])
        err_fake = criterion(D.get_cond_logits(fake_f, cond), zeros)
        if D.get_uncond_logits is not None:
            u_real = criterion(D.get_uncond_logits(real_f), ones)
            u_fake = criterion(D.get_uncond_logits(fake_f), zeros)
            d_loss = (err_real + u_real) / 2 + (err_fake + err_wrong + u_fake) / 3
        else:
            d_loss = err_real + (err_fake + err_wrong) * 0.5
        d_loss.backward()
        opt_d.step()

        G.zero_grad()
        fake_f = D(fake)
        g_loss = criterion(D.get_cond_logits(fake_f, cond), ones)
        if D.get_uncond_logits is not None:
            g_loss = g_loss + criterion(D.get_uncond_logits(fake_f), ones)
        kl = torch.mean(mu.pow(2).add(logvar.exp()).mul(-1).add(1).add(logvar)).mul(-0.5)
        g_loss = g_loss + kl * KL_WEIGHT
        g_loss.backward()
        opt_g.step()
        return d_loss.item(), g_loss.item()

    return step


# ---------------------------------------------------------------- one row per process

def run_row(row: dict, steps: int, warmup: int) -> dict:
    import torch

    device = torch.device(row["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the original trainer
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_rss_mb()
    torch.manual_seed(0)
    if row["impl"] == "original":
        step = original_step(row["stage"], row["batch"], device, Path(row["original"]))
    else:
        step = ours_step(row["stage"], row["batch"], device, row["opts"])
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step()  # .item() on both losses synchronises
        times.append(time.perf_counter() - start)
    times = times[warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb() - baseline
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "peak_mb": peak,
            "threads": torch.get_num_threads()}


def in_subprocess(row: dict, args) -> dict:
    cmd = [sys.executable, __file__, "--_row", json.dumps(row), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    return json.loads(lines[-1][4:])


def plan(args) -> list[dict]:
    rows = []
    devices = ([] if args.skip_cpu else [("cpu", {1: args.batch1, 2: args.batch2}, OURS_CPU)])
    if args.cuda:
        devices.append(("cuda", {1: args.cuda_batch1, 2: args.cuda_batch2}, OURS_CUDA))
    for device, batches, ours in devices:
        for stage in args.stages:
            common = {"stage": stage, "device": device, "batch": batches[stage]}
            if args.original:
                rows.append({**common, "label": "original model.py fp32", "impl": "original",
                             "original": str(Path(args.original).resolve())})
            rows += [{**common, "label": label, "impl": "ours", "opts": opts} for label, opts in ours]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=None, help="StackGAN-Pytorch/code directory (holds model.py)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--stages", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--batch1", type=int, default=16)
    parser.add_argument("--batch2", type=int, default=4)
    parser.add_argument("--cuda", action="store_true", help="add GPU rows (bf16, compile) with larger batches")
    parser.add_argument("--cuda-batch1", type=int, default=64)
    parser.add_argument("--cuda-batch2", type=int, default=16)
    parser.add_argument("--skip-cpu", action="store_true", help="with --cuda: GPU rows only")
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._row:
        print("ROW " + json.dumps(run_row(json.loads(args._row), args.steps, args.warmup)), flush=True)
        return

    rows = plan(args)
    reference = {}
    header = f"{'stage':<6}{'row':<40}{'device':<8}{'batch':>6}{'ms/step':>10}{'min ms':>10}{'speed-up':>10}" \
             f"{'peak MB':>10}"
    print(f"StackGAN step (1 D + 1 G Adam step), median of {args.steps} after {args.warmup} warm-up, "
          "each row in a fresh process; peak MB: CPU max-RSS growth, GPU max allocated", flush=True)
    print(header + "\n" + "-" * len(header), flush=True)
    for row in rows:
        result = in_subprocess(row, args)
        key = (row["stage"], row["device"], row["batch"])
        stage = "I" if row["stage"] == 1 else "II"
        if "error" in result:
            print(f"{stage:<6}{row['label']:<40}{row['device']:<8}{row['batch']:>6}  failed: {result['error']}",
                  flush=True)
            continue
        if row["impl"] == "original":
            reference[key] = result["ms"]
        speedup = f"{reference[key] / result['ms']:.2f}x" if key in reference else "-"
        print(f"{stage:<6}{row['label']:<40}{row['device']:<8}{row['batch']:>6}{result['ms']:>10.0f}"
              f"{result['min_ms']:>10.0f}{speedup:>10}{result['peak_mb']:>10.0f}", flush=True)
    print(f"threads per process: {result.get('threads', '?')}")


if __name__ == "__main__":
    main()
