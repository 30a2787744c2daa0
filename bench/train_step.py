"""Training-step throughput and memory: our step (decoder, then the LM head at the target positions
only, sparse soft-NTP loss) against a reference-style step (full-sequence logits, dense one-hot +
dense q soft labels over the vocabulary, as the paper's code computes them), in one run: same model
(the `model` stage's, trained as `train.finetune` says: every weight, or a LoRA adapter), same real
batches of the train subset with their q from cf_dist.

    python bench/train_step.py                      # artifacts/ of this project (data, subset, model, trie, cf_dist)
    python bench/train_step.py --batch 8 --steps 10 --artifacts DIR
    python bench/train_step.py --packing            # supervised samples/s: packed rows vs one prompt per sample

Variants: ours with loss tca, ntp, and MSL + tca, as the train stage runs them on this device (on a
CPU a micro-batch is one unpadded sequence, `tca.llm.packing.unpad`); "ours padded" = ours on the
right-padded batch; "full head" = that with our sparse loss on full-sequence logits (isolates the
LM-head saving); the dense reference (padded, as the paper's code). Whole steps (forward + backward)
run interleaved, one of each variant per round, so load from other processes hits all of them alike;
rates count real (non-pad) tokens over the median step time, per wall-clock second and per CPU-second
of this process (on a shared, loaded machine the second is the steadier measure of the work). Peak
memory is measured afterwards in a child process (CPU: VmHWM reset through /proc/self/clear_refs, with
malloc returning every block >= 64 KiB to the OS, which would slow timed steps by faulting their pages
in; GPU: peak allocated): one step of each variant, and the loss path alone (from the decoder's hidden
states through the backward into them), also timed in CPU-seconds; the tca-over-ntp overhead is its
difference.
"""
from __future__ import annotations

from tca.openmp import configure_openmp

configure_openmp()  # before torch loads, as `tca` does

import argparse
import copy
import ctypes
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from pipeline.stages.train import load_batcher
from tca.llm.model import LoraSettings, head_logits, load_model, target_hidden, use_bf16
from tca.llm.losses import LossConfig, position_losses
from tca.llm.packing import pack_samples, select_rows
from tca.llm.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PATH_REPS = 5  # timed runs of each loss path


class PeakMemory:
    """Peak memory above the level at `start()`: CPU via the kernel's resident high-water mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda:  # every block >= 64 KiB is mmap-ed and unmapped on free, so RSS follows live tensors
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixing it also stops glibc from raising it)
            libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


def dense_reference_loss(logits: torch.Tensor, inputs, soft, alpha: float) -> torch.Tensor:
    """Summed -log <y~, P> with y~ a dense [B, T, V] tensor: one-hot + q at the target positions."""
    B, T, V = logits.shape
    real = soft.count > 0
    rows = inputs.target_pos
    labels = torch.zeros(B * T, V, device=logits.device)
    labels.index_put_((rows[:, None].expand(-1, soft.token.shape[2]), soft.token[real]), alpha * soft.prob[real], accumulate=True)
    labels.index_put_((rows, inputs.target), torch.full_like(rows, 1 - alpha, dtype=torch.float32), accumulate=True)
    labels = labels.view(B, T, V)
    mask = labels.sum(-1) > 0
    return -(labels * logits.float().softmax(-1)).sum(-1)[mask].log().sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--batch", type=int, default=4, help="samples per forward/backward (train.micro_batch)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="auto | bf16 | fp32, as train.precision")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--finetune", choices=["full", "lora"], help="what trains (default: train.finetune of stages.yaml)")
    ap.add_argument("--packing", action="store_true", help="only compare packed rows with per-sample prompts")
    ap.add_argument("--rows", type=int, default=2, help="--packing: packed rows per step (train.micro_batch of a packed run)")
    ap.add_argument("--targets", type=int, default=0, help="--packing: targets per packed row (0 = train.pack_targets)")
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)  # internal: the memory measurement's child process
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = yaml.safe_load((ROOT / "stages.yaml").read_text())["params"]
    base_cfg = TrainConfig.from_params(params["train"], args.alpha)
    batcher = load_batcher(args.artifacts, params, base_cfg, device=args.device)  # as the train stage builds it here
    msl_batcher = load_batcher(args.artifacts, params, replace(base_cfg, msl=True), device=args.device)
    padded = copy.copy(batcher)
    padded.unpadded = False
    samples = pl.read_parquet(args.artifacts / "subset" / "train.parquet", columns=["sample_id", "history", "item_id"])
    rng = np.random.default_rng(0)
    batches = [samples[rng.choice(samples.height, args.batch, replace=False)] for _ in range(args.steps + 1)]

    torch.manual_seed(0)
    bf16 = use_bf16(device, args.precision)
    full = (args.finetune or base_cfg.finetune) == "full"
    model = load_model(args.artifacts / "model", device=str(device), lora=None if full else LoraSettings(), bf16=bf16, full=full).train()
    title = f"SmolLM2 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params){' fully fine-tuned' if full else ' + LoRA'}"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if args.packing:
        return compare_packing(args, params, base_cfg, batcher, model, title, device, bf16, autocast)
    cfgs = {"tca": LossConfig("tca", args.alpha), "ntp": LossConfig("ntp", args.alpha), "msl+tca": LossConfig("tca", args.alpha, msl=True)}

    def ours(kind, batches=batcher):
        def step(rows):
            inputs, labels = (msl_batcher if cfgs[kind].msl else batches)(rows)
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast():
                loss = position_losses(head_logits(model, target_hidden(model, inputs), labels.columns), labels, cfgs[kind]).sum()
            loss.backward()
            return inputs.n_tokens
        return step

    def full_head(rows):
        inputs, labels = padded(rows)
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast():
            logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False).logits
            loss = position_losses(logits.flatten(0, 1)[inputs.target_pos], labels, cfgs["tca"]).sum()
        loss.backward()
        return inputs.n_tokens

    def reference(rows):
        inputs, _ = padded(rows)
        soft = batcher.dist.read(rows["sample_id"].to_numpy())
        inputs = inputs.to(device)
        soft = type(soft)(soft.token.to(device), soft.prob.to(device), soft.count.to(device))
        with autocast():
            logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False).logits
            loss = dense_reference_loss(logits, inputs, soft, args.alpha)
        loss.backward()
        return inputs.n_tokens

    variants = {"ours tca": ours("tca"), "ours ntp": ours("ntp"), "ours msl+tca": ours("msl+tca"),
                "ours padded": ours("tca", padded), "full head": full_head, "reference": reference}
    if args.memory:  # the child process (below): malloc tuned to measure, so not to time
        memory = PeakMemory(device)
        for name, step in variants.items():  # warm-up (lazy allocations), then one measured step each
            step(batches[0])
            model.zero_grad(set_to_none=True)
        step_peak = {}
        for name, step in variants.items():
            memory.start()
            step(batches[1])
            step_peak[name] = memory.peak()
            model.zero_grad(set_to_none=True)

        # the loss path alone: from the decoder's hidden states (a leaf here) through the backward into them
        rows = batches[0]
        inputs, labels = padded(rows)
        _, msl_labels = msl_batcher(rows)
        soft = batcher.dist.read(rows["sample_id"].to_numpy())
        inputs, labels, msl_labels = inputs.to(device), labels.to(device), msl_labels.to(device)
        soft = type(soft)(soft.token.to(device), soft.prob.to(device), soft.count.to(device))
        with torch.no_grad(), autocast():
            hidden = model.get_decoder()(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False).last_hidden_state
        hidden = hidden.detach().requires_grad_(True)
        at_targets = lambda: hidden.flatten(0, 1)[inputs.target_pos]
        paths = {
            "ours tca": lambda: position_losses(head_logits(model, at_targets()), labels, cfgs["tca"]).sum(),
            "ours ntp": lambda: position_losses(head_logits(model, at_targets()), labels, cfgs["ntp"]).sum(),
            "ours msl+tca": lambda: position_losses(head_logits(model, at_targets(), msl_labels.columns), msl_labels, cfgs["msl+tca"]).sum(),
            "ours padded": lambda: position_losses(head_logits(model, at_targets()), labels, cfgs["tca"]).sum(),  # ours tca's loss path
            "full head": lambda: position_losses(head_logits(model, hidden).flatten(0, 1)[inputs.target_pos], labels, cfgs["tca"]).sum(),
            "reference": lambda: dense_reference_loss(head_logits(model, hidden), inputs, soft, args.alpha),
        }
        path_peak, path_cpu, path_loss = {}, {}, {}
        clock = time.perf_counter if device.type == "cuda" else time.process_time  # GPU work is not CPU time
        for name, path in paths.items():
            times = []
            for rep in range(PATH_REPS + 1):  # the first run warms up
                hidden.grad = None
                memory.start()
                start = clock()
                with autocast():
                    loss = path()
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(clock() - start)
                path_peak[name] = memory.peak()
            path_cpu[name], path_loss[name] = statistics.median(times[1:]), loss.item()

        print(json.dumps({"step_peak": step_peak, "path_peak": path_peak, "path_cpu": path_cpu, "path_loss": path_loss}))
        return

    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    tokens = {name: [] for name in variants}
    for r, rows in enumerate(batches):
        for name, step in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            n = step(rows)
            if device.type == "cuda":
                torch.cuda.synchronize()
            took, took_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            model.zero_grad(set_to_none=True)
            if r:  # round 0 warms up
                wall[name].append(took)
                cpu[name].append(took_cpu)
                tokens[name].append(n)

    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory"], capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the memory measurement failed:\n{child.stderr[-3000:]}")
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    step_peak, path_peak, path_cpu, path_loss = (measured[k] for k in ("step_peak", "path_peak", "path_cpu", "path_loss"))
    inputs, _ = padded(batches[0])
    B, T = inputs.input_ids.shape
    print(f"{title} on {device} in {'bf16' if bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads; {args.steps} timed steps of {args.batch} samples, interleaved "
          f"(first batch: {B} x {T} ids, {len(inputs.target)} target tokens; vocabulary {model.config.vocab_size:,})")
    print(f"loss of the first batch (sum over its target tokens): ours tca {path_loss['ours tca']:.4f}, "
          f"full head {path_loss['full head']:.4f}, reference {path_loss['reference']:.4f}")
    print(f"{'':<14}{'tokens/s':>10}{'tokens/CPU-s':>14}{'step peak MB':>14}{'loss path: CPU ms':>19}{'peak MB':>9}")
    rate, cpu_rate = {}, {}
    for name in variants:
        rate[name] = statistics.mean(tokens[name]) / statistics.median(wall[name])  # per step: mean tokens / median time
        cpu_rate[name] = statistics.mean(tokens[name]) / statistics.median(cpu[name])
        print(f"{name:<14}{rate[name]:>10.1f}{cpu_rate[name]:>14.1f}{step_peak[name] / 1e6:>14.1f}"
              f"{1e3 * path_cpu[name]:>19.1f}{path_peak[name] / 1e6:>9.1f}")
    step_cpu_ntp = statistics.median(cpu["ours ntp"])
    print(f"ours tca vs reference: {rate['ours tca'] / rate['reference']:.2f}x tokens/s "
          f"({cpu_rate['ours tca'] / cpu_rate['reference']:.2f}x per CPU-s); loss path "
          f"{path_peak['reference'] / max(path_peak['ours tca'], 1):.1f}x less peak memory; whole step "
          f"{step_peak['reference'] / max(step_peak['ours tca'], 1):.2f}x less")
    print(f"LM head at target positions vs on every position (same sparse loss): "
          f"{rate['ours padded'] / rate['full head']:.2f}x tokens/s ({cpu_rate['ours padded'] / cpu_rate['full head']:.2f}x per CPU-s)")
    print(f"the micro-batch as the train stage runs it here{' (unpadded)' if batcher.unpadded else ''} vs right-padded: "
          f"{rate['ours tca'] / rate['ours padded']:.2f}x tokens/s ({cpu_rate['ours tca'] / cpu_rate['ours padded']:.2f}x per CPU-s)")
    print(f"overhead of tca over ntp: {1e3 * (path_cpu['ours tca'] - path_cpu['ours ntp']):.1f} CPU ms per step = "
          f"{100 * (path_cpu['ours tca'] - path_cpu['ours ntp']) / step_cpu_ntp:+.2f}% of an ntp step (whole steps, noisier: "
          f"{100 * (cpu_rate['ours ntp'] / cpu_rate['ours tca'] - 1):+.1f}%)")
    print(f"msl+tca vs tca: {cpu_rate['ours msl+tca'] / cpu_rate['ours tca']:.2f}x tokens per CPU-s")


def compare_packing(args, params, base_cfg, batcher, model, title, device, bf16, autocast) -> None:
    """Supervised samples per second: packed rows (train.packing=items) against the same samples as
    one prompt each (train.packing=none, micro-batches of --batch), same model, loss and precision;
    one packed step and its per-sample counterpart per round, interleaved."""
    cfg = replace(base_cfg, packing="items", pack_targets=args.targets or base_cfg.pack_targets)
    packed_batcher = load_batcher(args.artifacts, params, cfg)
    columns = ["sample_id", "user_id", "timestamp", "history", "item_id"]
    samples = pl.read_parquet(args.artifacts / "subset" / "train.parquet", columns=columns)
    windows = pack_samples(samples, cfg.pack_targets)
    loss = cfg.loss_config
    rng = np.random.default_rng(0)

    def run(inputs, labels) -> int:
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast():
            out = position_losses(head_logits(model, target_hidden(model, inputs), labels.columns), labels, loss).sum()
        out.backward()
        model.zero_grad(set_to_none=True)
        return inputs.n_tokens

    clock = {"packed": [], "per-sample": []}  # (CPU-s, wall s) per step
    counted = {"packed": [0, 0], "per-sample": [0, 0]}  # samples, tokens
    for r in range(args.steps + 1):
        chosen = select_rows(windows, rng.choice(len(windows.n_items), args.rows, replace=False))
        rows = chosen.sample[chosen.sample >= 0]
        for name in clock:
            start, start_wall = time.process_time(), time.perf_counter()
            if name == "packed":
                tokens = run(*packed_batcher.packed(samples, chosen))
            else:
                tokens = sum(run(*batcher(samples[rows[i : i + args.batch]])) for i in range(0, len(rows), args.batch))
            if r:  # round 0 warms up
                clock[name].append((time.process_time() - start, time.perf_counter() - start_wall))
                counted[name][0] += len(rows)
                counted[name][1] += tokens
    rate = {name: counted[name][0] / sum(cpu for cpu, _ in clock[name]) for name in clock}
    wall = {name: counted[name][0] / sum(took for _, took in clock[name]) for name in clock}
    print(f"{title} on {device} in {'bf16' if bf16 else 'fp32'}, {torch.get_num_threads()} threads; {args.steps} rounds of "
          f"{args.rows} packed rows (<= {cfg.pack_targets} targets each) vs the same samples in micro-batches of {args.batch}")
    for name in clock:
        print(f"{name:<11} {rate[name]:8.2f} supervised samples per CPU-s ({wall[name]:.2f} per wall s), "
              f"{counted[name][1] / counted[name][0]:6.1f} tokens read per sample")
    print(f"supervised samples/s packed vs per-sample: {rate['packed'] / rate['per-sample']:.2f}x per CPU-s "
          f"({wall['packed'] / wall['per-sample']:.2f}x per wall s)")


if __name__ == "__main__":
    main()
