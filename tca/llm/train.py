"""LoRA fine-tuning of the LLM recommender with the losses of `tca.llm.losses` (TallRec, MSL, +TCA, ablations).

One optimizer step = `grad_accum` micro-batches of `micro_batch` samples; each micro-batch's summed
position losses are divided by the target tokens of the whole step before backward, so the
gradient is the token-weighted mean over the step whatever the split. The learning rate warms up
linearly and decays linearly to 0 over all optimizer steps of all epochs. Validation (HR@k / NDCG@k
by trie-constrained beam search on the valid samples) runs every `eval_every` epochs and after the
last; the best adapter is kept and training stops after `patience` validations without improvement.

Everything lives in a work dir: `state.pt` (the last checkpoint: LoRA weights, optimizer, schedule,
RNG, validation history), `adapter/` (the best adapter so far, peft `save_pretrained`) and
`log.jsonl`. Calling `train` again on the same work dir resumes from the last checkpoint and
continues exactly as the uninterrupted run would have (same data order, same dropout draws).

The loop never waits on the accelerator between log lines: a background thread (`tca.llm.prefetch`)
builds the next micro-batches (pinned, copied without blocking, on CUDA) while the current one runs,
and the loss stays on the device until it is logged. With `bucketing`, each micro-batch takes
samples of similar length (less padding); the order is still a function of (seed, epoch).

Packed training (`packing: items`, `tca.llm.packing`): the units of the epoch's order, of a micro-batch
and of a step are packed rows of a user's consecutive samples instead of samples; everything else
(loss normalization by target tokens, schedule, validation, resume, DDP) is the same.

Data parallel (`world`, see `tca.llm.ddp`): an optimizer step takes `micro_batch x grad_accum x world.size`
samples of the epoch's order; its k-th micro-batch of `micro_batch x world.size` samples is cut into
one contiguous piece per rank, and the summed gradients are all-reduced before the step, so N ranks
train exactly as one process with N times the micro-batch (same schedule, same loss normalization).
Validation splits the valid samples across ranks and scores the gathered lists. Only rank 0 writes
the work dir; every rank keeps its own RNG state in the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from tca.llm import ddp
from tca.collab.store import DistReader
from tca.errors import TcaError
from tca.llm.evaluate import EvalConfig, recommend, score_lists
from tca.llm.hybrid_prompt import PROJECTOR, SLOTS, HybridPrompt
from tca.llm.model import PRECISIONS, Inputs, ItemTargets, encode, head_logits, save_model, target_hidden, use_bf16
from tca.llm.losses import Labels, LossConfig, make_labels, position_losses
from tca.llm.packing import PACKINGS, Windows, as_inputs, concatenate, encode_windows, pack_samples, select_rows, slot_histories, unpad
from tca.llm.prefetch import Prefetch
from tca.llm.prompt import PromptBuilder
from tca.ragged import ragged_index
from tca.sid import SID_BACKBONES
from tca.collab.trie import Trie

FINETUNES = ("lora", "full")
BACKBONES = ("tallrec", "msl", *SLOTS, *SID_BACKBONES)  # llara, collm: CF embeddings in the prompt (tca.llm.hybrid_prompt); tiger, letter: tca.sid


@dataclass(frozen=True)
class TrainConfig:
    """The `train:` param section, plus `tca.alpha`."""

    backbone: str = "tallrec"  # tallrec | msl (msl = tallrec + MSL's masked softmax) | llara | collm | tiger | letter (T5 over SIDs)
    loss: str = "tca"  # tca (soft NTP) | kl (w/o SA) | ntp (TallRec's plain NTP)
    alpha: float = 0.1  # tca.alpha
    msl: bool = False  # masked softmax over the trie children (on whenever backbone is msl)
    msl_tau: float = 1.0
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (the schedule spans them); 0 = every step of every epoch
    micro_batch: int = 4
    grad_accum: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # share of all optimizer steps spent warming up
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_len: int = 512  # prompt + target tokens; longer prompts drop their oldest history items
    eval_every: int = 1  # epochs between validations (the last epoch is always validated); 0 = never
    valid_metric: str = "ndcg@10"  # the validation metric that picks the best adapter
    valid_beams: int = 10
    patience: int = 2  # validations without improvement before stopping
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at every epoch end)
    log_every: int = 10  # optimizer steps per log.jsonl line
    precision: str = "auto"  # auto (bf16 on a GPU or a CPU with native bf16, else fp32) | bf16 | fp32
    seed: int = 42
    curriculum_start: float = 0.0  # llara: share of the steps after which hybrid prompts start replacing text-only ones
    curriculum_end: float = 1.0  # llara: share of the steps from which every prompt is hybrid
    packing: str = "none"  # none: one prompt per sample (the paper's format) | items: a user's items packed in rows (tca.llm.packing)
    pack_targets: int = 60  # items: targets per packed row (a row is then ~data.history_len + pack_targets items)
    bucketing: bool = True  # packing none: micro-batches of similar-length prompts (less padding); packed rows keep their order
    grad_checkpointing: bool = False  # recompute each decoder layer in the backward (non-reentrant): memory for 8B models / long rows
    finetune: str = "lora"  # lora (the lora section's adapter) | full (every weight of the LLM; for small models)
    reference_quirks: bool = False  # the authors' code as it runs: last title token and EOS unsupervised, projector frozen, schedule 16x longer

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise TcaError(f"train.backbone: {self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if not 0 <= self.curriculum_start <= self.curriculum_end <= 1:
            raise TcaError(f"train.curriculum_start ({self.curriculum_start}) and train.curriculum_end "
                           f"({self.curriculum_end}) must satisfy 0 <= start <= end <= 1")
        for key in ("epochs", "micro_batch", "grad_accum", "max_len", "valid_beams", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise TcaError(f"train.{key}: {getattr(self, key)} must be >= 1")
        if self.max_steps < 0:
            raise TcaError(f"train.max_steps: {self.max_steps} must be >= 0 (0 = no limit)")
        if self.eval_every < 0 or self.patience < 1:
            raise TcaError("train.eval_every must be >= 0 (0 = never) and train.patience >= 1")
        if not self.lr > 0 or not 0 <= self.warmup_ratio < 1:
            raise TcaError(f"train.lr ({self.lr}) must be > 0 and train.warmup_ratio ({self.warmup_ratio}) in [0, 1)")
        name, _, k = self.valid_metric.partition("@")
        if name not in ("hr", "ndcg") or not k.isdigit() or not 1 <= int(k) <= self.valid_beams:
            raise TcaError(f"train.valid_metric: {self.valid_metric!r} must be hr@k or ndcg@k with k <= train.valid_beams")
        if self.packing not in PACKINGS:
            raise TcaError(f"train.packing: {self.packing!r} is not one of {', '.join(PACKINGS)}")
        if self.pack_targets < 1:
            raise TcaError(f"train.pack_targets: {self.pack_targets} must be >= 1")
        if self.finetune not in FINETUNES:
            raise TcaError(f"train.finetune: {self.finetune!r} is not one of {', '.join(FINETUNES)}")
        if self.precision not in PRECISIONS:
            raise TcaError(f"train.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        self.loss_config  # validates loss, alpha, msl_tau

    @classmethod
    def from_params(cls, section: dict, alpha: float) -> "TrainConfig":
        known = {f.name for f in fields(cls)} - {"alpha"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise TcaError(f"train.{unknown[0]}: unknown param; the train section accepts {sorted(known)}")
        return cls(**section, alpha=alpha)

    @property
    def loss_config(self) -> LossConfig:
        return LossConfig(self.loss, self.alpha, self.msl or self.backbone == "msl", self.msl_tau)


class Batcher:
    """Sample rows (`sample_id`, `history`, `item_id`) -> model inputs and loss labels."""

    def __init__(self, builder: PromptBuilder, targets: ItemTargets, trie: Trie, dist: DistReader | None,
                 cfg: LossConfig, max_len: int, pad_id: int, hybrid: HybridPrompt | None = None, unpadded: bool = False):
        """`hybrid`: the CF slots of LLaRA / CoLLM prompts (`builder` then has those slots). `unpadded`: a
        micro-batch of per-sample prompts is one sequence without padding (`tca.llm.packing.unpad`; prompts
        with CF slots stay padded), for a model whose attention reads its chunked mask (sdpa)."""
        if cfg.uses_q and dist is None:
            raise TcaError(f"train.loss={cfg.loss} needs q from the cf_dist stage")
        self.builder, self.targets, self.trie, self.dist = builder, targets, trie, dist
        self.cfg, self.max_len, self.pad_id, self.hybrid = cfg, max_len, pad_id, hybrid
        self.unpadded = unpadded and hybrid is None

    def __call__(self, rows: pl.DataFrame, progress: float = 1.0) -> tuple[Inputs, Labels]:
        """`progress`: the share of training done (LLaRA's curriculum mixes text-only prompts in before its end)."""
        inputs, labels = self.prepare(rows)
        return self.fill(inputs, rows["history"], progress), labels

    def prepare(self, rows: pl.DataFrame) -> tuple[Inputs, Labels]:
        """Everything but the CF slots' vectors (`fill`); draws no random numbers, so it may run in another thread."""
        inputs = encode(self.builder, self.targets, rows["history"], rows["item_id"].to_numpy(), self.max_len, self.pad_id)
        if self.unpadded:
            inputs = unpad(inputs)
        soft = self.dist.read(rows["sample_id"].to_numpy()) if self.cfg.uses_q else None
        return inputs, make_labels(inputs.target.numpy(), inputs.target_len, soft, self.trie, self.cfg)

    def fill(self, inputs: Inputs, histories: pl.Series, progress: float = 1.0) -> Inputs:
        """The CF slots of hybrid prompts (`histories`: what each user slot shows, `HybridPrompt.vectors`);
        the curriculum draws from torch's RNG, so call it where the model runs."""
        return inputs if self.hybrid is None else self.hybrid.fill(inputs, histories, progress)

    def lengths(self, rows: pl.DataFrame) -> np.ndarray:
        """Tokens of each sample's sequence (fitted prompt + target) as `prepare` builds it, without building it."""
        target_len = self.targets.get(rows["item_id"].to_numpy())[1]
        hist = rows["history"].explode().drop_nulls().to_numpy().astype(np.int64)
        hist, hist_len = self.builder.fit(hist, rows["history"].list.len().to_numpy().astype(np.int64), self.max_len - target_len)
        return self.builder.lengths(hist, hist_len) + target_len

    def packed(self, samples: pl.DataFrame, windows: Windows) -> tuple[Inputs, Labels]:
        """Packed rows (`tca.llm.packing`) of these windows over `samples`; q of each target from its sample's rows."""
        rows = concatenate(encode_windows(self.builder, windows, self.pad_id))
        inputs = as_inputs(rows)
        soft = self.dist.read(samples["sample_id"].to_numpy()[rows.sample]) if self.cfg.uses_q else None
        return inputs, make_labels(rows.target.numpy(), rows.target_len, soft, self.trie, self.cfg)


def batch_loss(model, inputs: Inputs, labels: Labels, cfg: LossConfig, skip_last: int = 0) -> torch.Tensor:
    """Summed loss over the batch's target positions (the LM head sees only those); `skip_last`: the
    last positions of each target carry no loss (the authors' code leaves its last title token and EOS
    unsupervised: `train.reference_quirks`)."""
    hidden = target_hidden(model, inputs)
    losses = position_losses(head_logits(model, hidden, labels.columns), labels, cfg)
    if skip_last:
        row, col = ragged_index(np.asarray(inputs.target_len))
        losses = losses * torch.from_numpy(col < inputs.target_len[row] - skip_last).to(losses.device)
    return losses.sum()


def on_tensors(batch, fn):
    """A copy of the dataclass `batch` (`Inputs`, `Labels`) with `fn` applied to each of its tensors,
    those of dataclass fields (`Inputs.key_blocks`) included."""
    def apply(v):
        return fn(v) if isinstance(v, torch.Tensor) else on_tensors(v, fn) if is_dataclass(v) else v

    return replace(batch, **{f.name: apply(getattr(batch, f.name)) for f in fields(batch)})


QUIRK_UNSUPERVISED = 2  # reference_quirks: the last title token and EOS
QUIRK_SCHEDULE = 16  # reference_quirks: their schedule is computed over 16x the optimizer steps
BUCKET_GROUPS = 64  # bucketing: micro-batch groups whose samples are sorted by length together


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: 0 -> 1 over `warmup` steps, then 1 -> 0 at `total`."""
    return lambda step: step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken
    best_metric: float | None  # the best validation value (None without validation)
    best_epoch: int | None
    stopped_early: bool
    valid: list[dict]  # every validation's metrics, with its epoch


class Trainer:
    """Trains `model` (a peft model: only LoRA weights trainable) on `samples`; `run()` resumes from `work_dir`."""

    def __init__(self, model, batcher: Batcher, samples: pl.DataFrame, valid: pl.DataFrame | None, cfg: TrainConfig,
                 work_dir: Path, device: str = "cpu", log: Callable[[str], None] = print, progress=None,
                 world: ddp.World = ddp.World(), valid_batch_size: int | str = EvalConfig.batch_size, exclude_history: bool = False):
        """`world`: this process's rank among data-parallel processes (all must pass the same other arguments).
        `valid_batch_size`: samples per beam search in validation (the stage passes eval.batch_size);
        `exclude_history`: validation decodes as the eval stage does with `eval.exclude_history`."""
        self.exclude_history = exclude_history
        self.model, self.batcher, self.samples, self.valid, self.cfg = model, batcher, samples, valid, cfg
        self.valid_batch_size = valid_batch_size
        self.work_dir, self.device, self.world = Path(work_dir), torch.device(device), world
        self.log = log if world.main else (lambda msg: None)
        self.progress = progress if world.main else None
        self.loss_cfg = cfg.loss_config
        self.bf16 = use_bf16(device, cfg.precision)
        if cfg.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.reference_quirks:  # the authors' projector is never in their optimizer
            for name, param in model.named_parameters():
                if f".{PROJECTOR}." in f".{name}":
                    param.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TcaError("the model has no trainable parameters; load it with a LoRA config")
        target_len = batcher.targets.get(samples["item_id"].to_numpy())[1]
        if cfg.reference_quirks:  # the tokens that carry a loss
            target_len = np.maximum(target_len - QUIRK_UNSUPERVISED, 0)
        self.windows = pack_samples(samples, cfg.pack_targets) if cfg.packing == "items" else None
        if self.windows is None:  # a unit of the epoch's order is a sample, or (packed) a row of samples
            self.target_len = target_len
        else:
            row, _ = ragged_index(self.windows.n_items)
            supervised = self.windows.sample >= 0
            self.target_len = np.bincount(row[supervised], weights=target_len[self.windows.sample[supervised]],
                                          minlength=len(self.windows.n_items)).astype(np.int64)
        self.n_units = len(self.target_len)
        self.unit_len = batcher.lengths(samples) if cfg.bucketing and self.windows is None else None
        self._order = (-1, None)
        self.step_size = cfg.micro_batch * cfg.grad_accum * world.size  # units per optimizer step, all ranks
        self.steps_per_epoch = math.ceil(self.n_units / self.step_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        span = self.total_steps * (QUIRK_SCHEDULE if cfg.reference_quirks else 1)  # the steps the schedule decays over
        warmup = math.ceil(cfg.warmup_ratio * span)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, span))
        self.state = {"step": 0, "valid": [], "best": None, "best_epoch": None, "bad": 0, "stopped": False, "log_bytes": 0}
        ddp.sync_parameters(self.params, world)  # the same starting weights everywhere

    # ----- checkpoints -----

    @property
    def state_path(self) -> Path:
        return self.work_dir / "state.pt"

    def save_checkpoint(self) -> None:
        """Every rank calls it (the RNG states are gathered); rank 0 writes."""
        rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})
        rng = ddp.gather(rng, self.world)
        if not self.world.main:
            return
        self.state["log_bytes"] = (self.work_dir / "log.jsonl").stat().st_size if (self.work_dir / "log.jsonl").exists() else 0
        checkpoint = {"config": asdict(self.cfg), "n_samples": self.samples.height, "data": self.data_digest, "world_size": self.world.size,
                      "state": self.state, "rng": rng,
                      "weights": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict()}
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, self.state_path)  # a kill mid-save leaves the previous checkpoint

    @property
    def data_digest(self) -> str:
        """What the samples are, not only how many: a checkpoint of other samples of the same count must not resume."""
        import hashlib

        digest = hashlib.sha256()
        for column in ("sample_id", "item_id"):
            digest.update(np.ascontiguousarray(self.samples[column].to_numpy().astype(np.int64)).tobytes())
        digest.update(np.ascontiguousarray(self.samples["history"].explode().fill_null(0).to_numpy().astype(np.int64)).tobytes())
        return digest.hexdigest()[:16]

    def trainable_state(self) -> dict:
        """What training changes: the LoRA weights (and projector) of a peft model, or every weight (full fine-tuning)."""
        from peft import PeftModel, get_peft_model_state_dict

        return get_peft_model_state_dict(self.model) if isinstance(self.model, PeftModel) else self.model.state_dict()

    def load_trainable_state(self, state: dict) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        if isinstance(self.model, PeftModel):
            set_peft_model_state_dict(self.model, state)
        else:
            self.model.load_state_dict(state)

    def save_adapter(self) -> None:
        """`adapter/` <- the current LoRA weights, replaced whole (never half-written); rank 0 only."""
        if not self.world.main:
            return
        tmp, final = self.work_dir / "adapter.tmp", self.work_dir / "adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(self.model, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def resume(self) -> None:
        """Continue from `state.pt` if the work dir has one (same config, data and world size, or an error).
        Rank 0 reads it and hands it to the other ranks (their disks need not hold it)."""
        ckpt = None
        if self.world.main and self.state_path.exists():
            ckpt = torch.load(self.state_path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
            if ((ckpt["config"], ckpt["n_samples"], ckpt.get("data"), ckpt.get("world_size"))
                    != (asdict(self.cfg), self.samples.height, self.data_digest, self.world.size)):
                ckpt = (f"{self.state_path} is a checkpoint of another configuration, data or number of processes; "
                        f"delete {self.work_dir} to start over")
        ckpt = ddp.broadcast(ckpt, self.world)
        if isinstance(ckpt, str):
            raise TcaError(ckpt)
        if ckpt is None:
            return
        self.load_trainable_state(ckpt["weights"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        rng = ckpt["rng"][self.world.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.state = ckpt["state"]
        if self.world.main and (self.work_dir / "log.jsonl").exists():
            os.truncate(self.work_dir / "log.jsonl", self.state["log_bytes"])  # drop lines logged after the checkpoint
        self.log(f"resumed from {self.state_path} at step {self.state['step']}/{self.total_steps}")

    def write_log(self, record: dict) -> None:
        if not self.world.main:
            return
        with open(self.work_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----- training -----

    def order(self, epoch: int) -> np.ndarray:
        """The unit order of an epoch: a function of (seed, epoch) only, so a resumed run sees the same.
        Bucketing sorts each window of `BUCKET_GROUPS` groups (a micro-batch on every rank) of the
        shuffled units by length, then shuffles the groups: every unit once, similar lengths together."""
        cached = self._order  # (epoch, order): every step asks; one read, as the prefetch thread asks too
        if cached[0] != epoch:
            cached = self._order = (epoch, self._shuffle(epoch))
        return cached[1]

    def _shuffle(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(self.n_units)
        if self.unit_len is None:
            return order
        group = self.cfg.micro_batch * self.world.size
        order = order[np.lexsort((self.unit_len[order], np.arange(self.n_units) // (group * BUCKET_GROUPS)))]
        full = self.n_units // group * group  # a last, partial group stays last
        return np.concatenate([order[:full].reshape(-1, group)[rng.permutation(full // group)].ravel(), order[full:]])

    def step_rows(self, step: int) -> np.ndarray:
        """The units of an optimizer step, all ranks."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[i * self.step_size : (i + 1) * self.step_size]

    def micro_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        """This rank's micro-batches of a step's units: its piece of `micro_batch` units of every group of `micro_batch x world.size`."""
        piece = np.arange(len(rows)) // self.cfg.micro_batch % self.world.size
        mine = rows[piece == self.world.rank]
        return [mine[start : start + self.cfg.micro_batch] for start in range(0, len(mine), self.cfg.micro_batch)]

    def prepare(self, units: np.ndarray) -> tuple[Inputs, Labels]:
        """A micro-batch's tensors on the host, pinned for a non-blocking copy on CUDA (no random draws: `run` calls it in a thread)."""
        if self.windows is None:
            batch = self.batcher.prepare(self.samples[units])
        else:
            batch = self.batcher.packed(self.samples, select_rows(self.windows, units))
        return tuple(on_tensors(b, torch.Tensor.pin_memory) for b in batch) if self.device.type == "cuda" else batch

    def micro_step(self, inputs: Inputs, labels: Labels, n_target: int) -> torch.Tensor:
        """Forward and backward of a prepared micro-batch; its summed loss, left on the device (reading it would wait for the device)."""
        to_device = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = batch_loss(self.model, on_tensors(inputs, to_device), on_tensors(labels, to_device), self.loss_cfg,
                              QUIRK_UNSUPERVISED if self.cfg.reference_quirks else 0)
        (loss / n_target).backward()
        return loss.detach()

    def train_step(self, rows: np.ndarray, batches=None) -> tuple[torch.Tensor, int, int | torch.Tensor]:
        """One optimizer step on these units (of all ranks): (summed loss, on the device; target tokens; tokens read).
        `batches`: an iterator of prepared micro-batches that starts with this step's (`run` prefetches them); default: prepared here."""
        n_target = int(self.target_len[rows].sum())
        units = self.micro_batches(rows)
        batches = map(self.prepare, units) if batches is None else batches
        loss_sum, n_tokens = torch.zeros((), device=self.device), 0
        for piece, (inputs, labels) in zip(units, batches):  # zip takes no more batches than this step has
            if self.batcher.hybrid is not None:
                if self.windows is None:
                    histories = self.samples[piece]["history"]
                else:  # packed: `piece` holds rows; only user slots (CoLLM) read what they show
                    histories = slot_histories(select_rows(self.windows, piece)) if "user" in self.batcher.hybrid.slots else None
                inputs = self.batcher.fill(inputs, histories, self.state["step"] / self.total_steps)
            n_tokens += inputs.n_tokens  # host tensors
            loss_sum += self.micro_step(inputs, labels, n_target)
        loss_sum, n_tokens = ddp.sum_gradients(self.params, [loss_sum, n_tokens], self.world)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, n_target, n_tokens

    def validate(self, epoch: int) -> None:
        """Beam-search the valid samples; keep the adapter if it is the best so far, count patience if not."""
        cfg = EvalConfig(num_beams=self.cfg.valid_beams, renormalize=self.loss_cfg.msl, batch_size=self.valid_batch_size,
                         exclude_history=self.exclude_history, tau=self.loss_cfg.decode_tau)
        part = self.valid[ddp.split(self.valid.height, self.world)]
        items, scores = np.zeros((0, cfg.num_beams), np.int64), np.zeros((0, cfg.num_beams), np.float32)
        if part.height:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                items, scores = recommend(self.model, self.batcher.builder, self.batcher.trie, part["history"], cfg, hybrid=self.batcher.hybrid)
        lists = ddp.gather((items, scores), self.world)
        items, scores = (np.concatenate(parts) for parts in zip(*lists))
        metrics = score_lists(items, scores, self.valid).metrics["llm"]
        value = metrics[self.cfg.valid_metric]
        best = self.state["best"] is None or value > self.state["best"]
        if best:
            self.state.update(best=value, best_epoch=epoch, bad=0)
            self.save_adapter()
        else:
            self.state["bad"] += 1
            self.state["stopped"] = self.state["bad"] >= self.cfg.patience
        self.state["valid"].append({"epoch": epoch, **metrics})
        self.write_log({"step": self.state["step"], "epoch": epoch, "valid": metrics, "best": best})
        self.log(f"epoch {epoch}: valid {self.cfg.valid_metric} {value:.4f}" + (" (best)" if best else f" (best {self.state['best']:.4f} at epoch {self.state['best_epoch']})"))

    def run(self) -> TrainResult:
        if self.world.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        self.model.train()
        start = self.state["step"]
        window = {"loss": 0.0, "target": 0, "tokens": 0, "time": time.perf_counter()}
        packed = "" if self.windows is None else f" packed in {self.n_units:,} rows of <= {self.cfg.pack_targets} targets"
        self.log(f"{self.samples.height:,} samples{packed}, {self.cfg.epochs} epoch(s) of {self.steps_per_epoch} steps of "
                 f"{self.cfg.micro_batch} x {self.cfg.grad_accum}{f' x {self.world.size} ranks' if self.world.size > 1 else ''} {'rows' if packed else 'samples'}; "
                 f"loss {self.loss_cfg}")
        bar = self.progress(total=self.total_steps - start, unit="step",
                            desc="train" + (f" (resumed at step {start})" if start else "")) if self.progress else None
        with Prefetch(self.prepare, (units for step in range(start, self.total_steps) for units in self.micro_batches(self.step_rows(step)))) as batches:
            for step in range(start, self.total_steps):
                if self.state["stopped"]:
                    break
                epoch, i = divmod(step, self.steps_per_epoch)
                loss_sum, n_target, n_tokens = self.train_step(self.step_rows(step), batches)
                self.state["step"] = step + 1
                window["loss"] += loss_sum
                window["target"] += n_target
                window["tokens"] += n_tokens
                if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.total_steps:
                    now, loss = time.perf_counter(), float(window["loss"]) / window["target"]  # the loop's one wait on the device
                    self.write_log({"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4),
                                    "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                    "tokens_per_s": round(float(window["tokens"]) / (now - window["time"]), 1)})
                    window = {"loss": 0.0, "target": 0, "tokens": 0, "time": now}
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1, refresh=False)
                if bar is not None:
                    bar.update()
                epoch_end, last = i + 1 == self.steps_per_epoch, step + 1 == self.total_steps
                if self.valid is not None and self.cfg.eval_every and (last or epoch_end and (epoch + 1) % self.cfg.eval_every == 0):
                    self.validate(epoch + 1)
                    window["time"] = time.perf_counter()  # tokens/s counts training only
                if epoch_end or last or (step + 1) % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.state["best"] is None:  # never validated: the last weights are the result
            self.save_adapter()
        return TrainResult(steps=self.state["step"], best_metric=self.state["best"], best_epoch=self.state["best_epoch"],
                           stopped_early=self.state["stopped"], valid=self.state["valid"])
