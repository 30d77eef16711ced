"""Stage `train`: fine-tune BLIP with Accelerate, validate every N steps, keep the best checkpoint."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import faults
from .config import Params, TrainParams, load_params
from .data import CORRECTIONS_RECORD, TOKEN_LENGTHS, DataSourceError
from .metrics import caption_scores
from .fingerprint import mixed_precision
from .modeling import (IGNORE_INDEX, Collator, apply_memory_options, build_processor, caption_all, initial_model,
                       normalise_pixels, save_model)
from .runtime import FashioncapError, progress, run_stage, stage_args
from . import adapters, checkpoint, disk, fingerprint, lineage, origin, plots, replay, tracking

log = logging.getLogger(__name__)
ETA_STEPS = 3  # optimizer steps timed (after the first, which warms up) before the ETA is announced


class TrainSetupError(FashioncapError):
    """Training must not start as configured; the message says what to change."""


CPU_FRIENDLY_BYTES = 200 * 2**20  # an init model this small (the offline profile's: ~4 MB) trains on a CPU
# torch's CUDA build, as the README installs it on a GPU machine (requirements.lock holds the CPU build)
GPU_INSTALL = "pip install -r requirements-cuda.lock && pip install --no-deps -e ."
NVIDIA_DEVICE_FILES = "/dev/nvidia[0-9]*"  # one per GPU, made by NVIDIA's driver


def nvidia_device() -> str | None:
    """What shows that this machine has an NVIDIA GPU, whatever torch sees: its first device file, or
    nvidia-smi on PATH; None without either."""
    files = sorted(glob.glob(NVIDIA_DEVICE_FILES))
    return files[0] if files else shutil.which("nvidia-smi")


def check_device(params: Params, has_gpu: bool, init=None) -> None:
    """Refuses to fine-tune a pretrained checkpoint without a GPU unless train.allow_cpu says so: the
    default recipe needs days on a CPU. Training from scratch (the offline profile), or from a local or
    registry model as small as the offline profile's, is unaffected. Where the machine has an NVIDIA GPU that
    torch cannot use, the refusal says why: a CPU-only torch (and the install that fixes it), or a CUDA
    build that sees no device."""
    if has_gpu or params.model.from_scratch or params.train.allow_cpu:
        return
    if init is not None and Path(init.source).is_dir():
        weights = sum(f.stat().st_size for f in Path(init.source).glob("*.safetensors"))
        if 0 < weights <= CPU_FRIENDLY_BYTES:
            return
    cfg = params.train
    days = (f"fine-tuning '{params.model.init}' for {cfg.max_steps} steps of {cfg.batch_size} samples would take "
            "days on this CPU (about 6 s per sample for BLIP-base)")
    device = nvidia_device()
    if device is not None and torch.version.cuda is None:
        raise TrainSetupError(
            f"this machine has an NVIDIA GPU ({device}), but the installed torch {torch.__version__} is a "
            f"CPU-only build (requirements.lock's): {days}. Install torch's CUDA build from its lock, then run "
            f"again: {GPU_INSTALL}")
    if device is not None:
        raise TrainSetupError(
            f"this machine has an NVIDIA GPU ({device}) and torch {torch.__version__} is built for CUDA "
            f"{torch.version.cuda}, but torch sees no GPU: {days}. Check the driver (nvidia-smi) and "
            "CUDA_VISIBLE_DEVICES, then run again")
    raise TrainSetupError(
        f"no GPU found: {days}. "
        "Run the offline profile instead (dvc exp run -S profile=offline), run on a machine with a GPU, or go "
        "ahead anyway with -S train.allow_cpu=true: the stage then measures its first steps and prints the ETA")


def check_caption_lengths(params: Params, data_dir: Path) -> dict:
    """Refuses a model.max_caption_tokens below the 99th percentile of the prepared captions' lengths
    (the model would never learn to finish those captions); returns the length summary with the share
    of captions that will be cut."""
    path = data_dir / TOKEN_LENGTHS
    if not path.is_file():
        log.warning("no %s in %s: caption lengths unchecked (prepared by an older version)", TOKEN_LENGTHS, data_dir)
        return {}
    lengths = json.loads(path.read_text())
    limit = params.model.max_caption_tokens
    if limit < lengths["p99"]:
        raise TrainSetupError(
            f"model.max_caption_tokens ({limit}) is below the 99th percentile of the captions' lengths: p50 "
            f"{lengths['p50']}, p95 {lengths['p95']}, p99 {lengths['p99']}, max {lengths['max']} tokens of "
            f"'{lengths['tokenizer']}' (metrics/prepare.json). Set -S model.max_caption_tokens={lengths['p99']} "
            f"or more, and generate.max_new_tokens at least as high")
    cut = sum(n for length, n in lengths["counts"].items() if int(length) > limit)
    return {**{k: v for k, v in lengths.items() if k != "counts"}, "limit": limit,
            "truncated_fraction": cut / lengths["captions"]}


def eta_message(seconds_per_step: float, done: int, total: int, eval_every: int) -> str:
    """How long the remaining steps take at the measured pace (validation runs come on top)."""
    remaining = seconds_per_step * (total - done)
    return (f"{seconds_per_step:.2f} s per optimizer step: the remaining {total - done} steps take about "
            f"{_duration(remaining)} (plus validation every {eval_every} steps)")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    days, hours = divmod(hours, 24)
    return (f"{days} d {hours} h" if days else f"{hours} h {rest // 60} min" if hours else
            f"{rest // 60} min {rest % 60} s")


@dataclass
class Outputs:
    """Where the stage writes, as dvc.yaml names it."""

    model_dir: Path
    run_ref: Path
    metrics: Path
    train_log: Path
    val_log: Path
    checkpoint_dir: Path
    loss_curve: Path
    fingerprint: Path


@dataclass
class BestTracker:
    """Keeps the best validation value and counts evaluations without improvement."""

    metric: str
    patience: int
    best: float | None = None
    best_step: int = 0
    stale: int = 0
    history: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        """What a checkpoint needs to restore the tracker."""
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale, "history": self.history}

    def update(self, step: int, values: dict[str, float]) -> bool:
        """Records an evaluation; returns True when it is the best so far."""
        self.history.append({"step": step, **values})
        value = values[self.metric]
        better = self.best is None or (value < self.best if self.metric == "val_loss" else value > self.best)
        if better:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.stale >= self.patience


def make_optimizer(model, cfg: TrainParams):
    """AdamW with no weight decay on biases and norms; the fused kernel on GPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=torch.cuda.is_available())


def make_scheduler(optimizer, cfg: TrainParams):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


@torch.no_grad()
def validate(model, processor, rows, collate, params: Params, accelerator) -> tuple[dict[str, float], list[str]]:
    """Validation loss and CIDEr-D (captions from the configured generation) on a bounded sample. Each
    process takes every n-th row; the results are gathered, so every process gets the same numbers."""
    from accelerate.utils import gather_object

    model.eval()
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    part = [rows[i] for i in mine]
    loss_sum, device = 0.0, next(model.parameters()).device
    # the unwrapped model has lost Accelerate's autocast: validation computes in the training's precision
    for start in range(0, len(part), params.train.batch_size):
        batch = collate(part[start : start + params.train.batch_size])
        with accelerator.autocast():
            out = model(**{k: v.to(device) for k, v in batch.items()})
        loss_sum += out.loss.item() * len(batch["labels"])
    captions = caption_all(model, processor, [r["image"] for r in part], params.generate, desc="validate",
                           quiet=not accelerator.is_local_main_process, precision=accelerator.mixed_precision)
    gathered = gather_object([(mine, captions, loss_sum)])
    ordered = [""] * len(rows)
    for indices, caps, _ in gathered:
        for i, caption in zip(indices, caps):
            ordered[i] = caption
    scores = caption_scores([[r["caption"]] for r in rows], ordered)
    model.train()
    values = {"val_loss": sum(loss for *_, loss in gathered) / len(rows), "val_cider_d": scores["cider_d"],
              "val_bleu_4": scores["bleu_4"]}
    return values, ordered


def save_best(model, processor, best_dir: Path, params: Params, base: dict | None = None) -> None:
    """Writes model + processor beside best_dir, then swaps it in, so a kill never leaves half a model. An
    adapted model saves its adapter alone, with the pinned record of its base (`base`)."""
    staging = checkpoint.staging_for(best_dir)
    save_model(model, processor, staging, params.generate)
    if adapters.is_adapted(model):
        adapters.save_base(staging, base)
    checkpoint.swap_in(staging, best_dir)


def forever(loader, sampler: checkpoint.EpochSampler, epoch: int):
    """Cycles through the loader from `epoch` on; the sampler shuffles each epoch by (seed, epoch)."""
    while True:
        sampler.epoch = epoch
        yield from loader
        epoch += 1


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["step"])
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Job:
    """What training works with, built once: the Accelerate-wrapped model, optimiser and data."""

    params: Params
    accelerator: object
    model: object
    processor: object
    optimizer: object
    scheduler: object
    loader: object
    sampler: checkpoint.EpochSampler
    collate: Collator
    val_rows: list[dict]
    forward: object  # what computes the training loss: the model, or its torch.compile'd twin (same weights)
    batches_per_epoch: int
    parameters: int
    trainable: int
    micro_batch: int  # global: samples computed at once over all processes
    init: object  # origin.Init: what model.init was when training started


@dataclass
class RunState:
    """Where training stands: what a checkpoint saves and a resume restores, plus the MLflow run."""

    tracker: BestTracker
    fingerprint: str
    step: int = 0  # optimizer steps done
    consumed: int = 0  # batches drawn (one per optimizer step)
    train_log: list[dict] = field(default_factory=list)
    run: object = None


def train(params: Params, data_dir: Path, out: Outputs, init=None) -> dict:
    """Runs the whole fine-tuning and returns its summary; writes the best checkpoint and logs. `init`: the
    init stage's origin.Init of model.init (resolved here without one)."""
    init = init or origin.load(params.model.init)
    check_device(params, torch.cuda.is_available(), init)  # seconds after start, before anything heavy loads
    lengths = check_caption_lengths(params, data_dir)
    job = build(params, data_dir, init)
    preflight(job, out, lengths)
    state, rng = resume_or_start(job, data_dir, out, lengths)
    batches = batches_from(job, state.consumed)
    if rng is not None:
        checkpoint.set_rng_state(rng)  # last: nothing may draw from the RNGs after this
    stop_reason, pace = loop(job, state, batches, out)
    return finish(job, state, out, stop_reason, pace, lengths)


def build(params: Params, data_dir: Path, init=None) -> Job:
    """Data, model, optimiser and scheduler, prepared by Accelerate; seeded so a re-run is bit-identical."""
    import datasets
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    cfg = params.train
    dataset = datasets.load_from_disk(str(data_dir))
    init = init or origin.load(params.model.init)
    processor = build_processor(params.model, dataset["train"]["caption"], init)
    model = apply_memory_options(initial_model(params.model, processor, params.seed, init), cfg.freeze_vision,
                                 cfg.gradient_checkpointing)
    if init.record["kind"] == "hub":  # the Hub commit it loaded: what a LoRA version's base reference pins
        commit = getattr(model.config, "_commit_hash", None) or origin.hub_commit(init.source)
        if commit:
            init = origin.Init({**init.record, "revision": commit}, init.source)
    if cfg.method == "lora":
        set_seed(params.seed)  # the adapters' random init (lora_A), the same in every run of these params
        model = adapters.add_lora(model, cfg.lora, cfg.freeze_vision)
    # split_batches: train.batch_size is the global batch, whatever the number of processes, so a recipe
    # means the same thing on one CPU and on eight GPUs. cpu=True lets `accelerate launch` run DDP over gloo
    # on a machine without a GPU.
    # the loop accumulates micro-batches itself (train_step), so that a step's loss is the mean over all its tokens
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one process tells the story
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not fingerprint.native_bf16():
        log.warning("train.mixed_precision bf16 on a CPU whose kernels in use lack native bf16: autocast emulates it, "
                    "which is slower than fp32 (train.mixed_precision auto picks fp32 here)")
    if cfg.batch_size % accelerator.num_processes:
        raise DataSourceError(f"train.batch_size ({cfg.batch_size}) must be a multiple of the number of processes "
                              f"({accelerator.num_processes}): it is the global batch, split across them")
    set_seed(params.seed)
    fingerprint.set_determinism(params.numerics.deterministic)  # the CPU always; a GPU as numerics says
    collate = Collator(processor, params.model.max_caption_tokens, model.config.text_config.bos_token_id)
    sampler = checkpoint.EpochSampler(len(dataset["train"]), params.seed)
    # the workers hand over uint8 pixels (a quarter of the bytes); train_step normalises them on the device
    loader = torch.utils.data.DataLoader(
        dataset["train"], batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        collate_fn=Collator(processor, params.model.max_caption_tokens, model.config.text_config.bos_token_id,
                            normalise=False),
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(params.seed))
    batches_per_epoch = len(dataset["train"]) // cfg.batch_size
    if batches_per_epoch < 1:
        raise DataSourceError(f"the training split holds {len(dataset['train'])} items, fewer than one optimizer "
                              f"step needs (train.batch_size {cfg.batch_size})")
    val_rows = list(dataset["validation"].select(range(min(cfg.eval_samples, len(dataset["validation"])))))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    # the scheduler stays unwrapped: it counts optimizer steps, whatever the number of processes
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    micro = micro_batch(cfg, model, params.model, accelerator)
    # compiled for training only: validation's generate() would meet a new shape at every decoding step
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    log.info("training %.2fM parameters on %s x %d (%s), %d train items, batch %d = micro-batch %d x %d accumulation",
             sum(p.numel() for p in model.parameters()) / 1e6, accelerator.device, accelerator.num_processes,
             accelerator.mixed_precision, len(dataset["train"]), cfg.batch_size, micro, cfg.batch_size // micro)
    return Job(params, accelerator, model, processor, optimizer, scheduler, loader, sampler, collate, val_rows,
               forward, batches_per_epoch, sum(p.numel() for p in model.parameters()),
               sum(p.numel() for p in model.parameters() if p.requires_grad), micro, init)


def preflight(job: Job, out: Outputs, lengths: dict) -> None:
    """Stops before the first step when the disk cannot hold the best model and the checkpoints."""
    cfg = job.params.train
    if job.accelerator.is_main_process:
        disk.require(out.checkpoint_dir.parent,
                     disk.training_bytes(job.parameters, job.trainable, cfg.checkpoint_every < cfg.max_steps,
                                         job.trainable if cfg.method == "lora" else None),
                     f"training {job.parameters / 1e6:.2f}M parameters (best model and full-state checkpoints)")
    if lengths:
        log.info("captions up to %d tokens (p99 %d, max %d): %.2f%% of them are cut", lengths["limit"],
                 lengths["p99"], lengths["max"], 100 * lengths["truncated_fraction"])


def resume_or_start(job: Job, data_dir: Path, out: Outputs, lengths: dict) -> tuple[RunState, dict | None]:
    """All of resuming in one place: the checkpoint of this very run (same params, data and process
    count) restores weights, optimiser, scheduler, position and bookkeeping into the same MLflow run;
    without one, a new run starts. Returns the state and this process's RNG state to restore last."""
    import mlflow

    params, accelerator = job.params, job.accelerator
    cfg = params.train
    # the init record too: model.init `@champion` is another run once the alias names another version
    fp = checkpoint.fingerprint({**params.model_dump(), "init_record": job.init.record},
                                lineage.dataset_digest(data_dir), accelerator.num_processes)
    state = RunState(BestTracker(cfg.metric, cfg.patience), fp)
    resumed = checkpoint.load(out.checkpoint_dir / "state", fp)
    checkpoint.recover(out.checkpoint_dir / "best")
    accelerator.wait_for_everyone()  # every process has read the checkpoint before one may discard it
    rng = None
    if resumed is None:
        if accelerator.is_main_process:
            checkpoint.discard(out.checkpoint_dir)  # another run's leftovers
    else:
        tensors, meta = resumed
        adapters.load_trainable_state(accelerator.unwrap_model(job.model), tensors["model"])
        job.optimizer.load_state_dict(tensors["optimizer"])
        job.scheduler.load_state_dict(tensors["scheduler"])
        state.step, state.consumed, state.train_log = meta["step"], meta["consumed"], meta["train_log"]
        state.tracker = BestTracker(cfg.metric, cfg.patience, **meta["tracker"])
        rng = tensors["rng"][accelerator.process_index]
        log.info("resuming from the checkpoint of step %d", state.step)
    if accelerator.is_main_process:
        machine = fingerprint.fingerprint(Path.cwd(), accelerator.mixed_precision)
        if resumed is not None:  # the same MLflow run goes on; it keeps the machine it started on
            state.run = tracking.resume_run(resumed[1]["run_id"], system_metrics=True)
            machine = tracking.check_machine(state.run.info.run_id, machine, "changed_on_resume", "resuming")
        else:
            state.run = tracking.start_run(params, {"device": accelerator.device.type,
                                                    "mixed_precision": accelerator.mixed_precision, **job.init.tags})
            tracking.log_fingerprint(machine)
            mlflow.set_tag("data.digest", tracking.log_dataset(data_dir, context="train"))
            if (data_dir / CORRECTIONS_RECORD).is_file():  # reviewers' corrections prepare used (feedback.py)
                used = json.loads((data_dir / CORRECTIONS_RECORD).read_text())
                mlflow.set_tags({f"corrections.{k}": v for k, v in used.items()})
            if replayed := replay.read_record(data_dir):  # the init's training items mixed in (prepare)
                mlflow.set_tags({"replay.items": replayed["items"], "replay.fraction": replayed["fraction"],
                                 "replay.source": f"{replayed['version']} ({replayed['digest']})"})
            if lengths:
                mlflow.log_metrics({"caption_tokens_p99": lengths["p99"],
                                    "caption_truncated_fraction": lengths["truncated_fraction"]})
        out.fingerprint.parent.mkdir(parents=True, exist_ok=True)
        out.fingerprint.write_text(json.dumps(machine, indent=2) + "\n")
        tracking.write_run_ref(out.run_ref, state.run.info.run_id, params.tracking.experiment)
        faults.point("train.started")
    return state, rng


def batches_from(job: Job, consumed: int):
    """The training batches from the position `consumed` micro-batches in, epoch after epoch."""
    epoch, offset = divmod(consumed, job.batches_per_epoch)
    job.sampler.start = offset * job.params.train.batch_size
    return forever(job.loader, job.sampler, epoch)


def loop(job: Job, state: RunState, batches, out: Outputs) -> tuple[str, "Pace"]:
    """The training loop, one optimizer step per turn; returns why it stopped and its timing."""
    cfg, accelerator, model = job.params.train, job.accelerator, job.model
    pace = Pace(state.step, job.params, job.accelerator, model)
    pending: list[tuple[int, torch.Tensor, float]] = []  # steps not logged yet: one device sync per log interval
    bar = progress(total=cfg.max_steps, initial=state.step, desc="train", unit="step",
                   quiet=not accelerator.is_local_main_process)
    stop_reason = f"reached train.max_steps ({cfg.max_steps})"
    model.train()
    while state.step < cfg.max_steps:
        batch = next(batches)
        state.consumed += 1
        pace.count(batch)
        loss = train_step(job, batch)
        state.step += 1
        bar.update()
        pace.stepped(state.step, state.run)
        pending.append((state.step, loss, job.scheduler.get_last_lr()[0]))  # the lr this step used
        job.scheduler.step()
        step = state.step
        if step % cfg.log_every == 0 or step == cfg.max_steps or step % cfg.checkpoint_every == 0:
            log_losses(job, state, pending, pace)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            evaluate_and_keep_best(job, state, out)
            if state.tracker.exhausted:
                stop_reason = f"early stopping: {cfg.metric} did not improve for {cfg.patience} evaluations"
                break
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save_checkpoint(job, state, out)
    bar.close()
    return stop_reason, pace


def token_loss_sum(model, batch: dict, label_smoothing: float) -> torch.Tensor:
    """A micro-batch's cross-entropy summed over its caption tokens: BLIP's own loss (labels shifted by one,
    pads ignored, its label smoothing), summed instead of averaged so that a step can divide by all its tokens."""
    logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                             reduction="sum")


def train_step(job: Job, batch: dict) -> torch.Tensor:
    """One optimizer step on this process's share of a batch, computed micro-batch by micro-batch. The loss
    is the mean over every caption token of the whole batch (all processes), so 8 x 4 and 32 x 1 are the
    same function of the data; DDP synchronises the gradients on the last micro-batch only. Returns this
    process's part of the loss (their mean over processes is the step's loss), on the device: no sync."""
    accelerator, model, cfg = job.accelerator, job.model, job.params.train
    batch = {**batch, "pixel_values": normalise_pixels(batch["pixel_values"], job.processor.image_processor)}
    tokens = accelerator.reduce((batch["labels"][:, 1:] != IGNORE_INDEX).sum(), "sum")
    scale = accelerator.num_processes / tokens  # DDP averages gradients over processes: undo it
    size = job.micro_batch // accelerator.num_processes
    starts = range(0, len(batch["labels"]), size)
    total = torch.zeros((), device=accelerator.device)
    for i, start in enumerate(starts):
        part = {k: v[start : start + size] for k, v in batch.items()}
        with contextlib.nullcontext() if i == len(starts) - 1 else accelerator.no_sync(model):
            loss = token_loss_sum(job.forward, part, job.params.model.label_smoothing) * scale
            accelerator.backward(loss)
        total += loss.detach()
    accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    return total


def micro_batch(cfg: TrainParams, model, model_cfg, accelerator) -> int:
    """train.micro_batch, or under `auto` the largest divisor of the batch whose micro-batch fits the device:
    a probe of 1 and 2 samples at the longest caption (model.max_caption_tokens) measures the memory of one
    sample, and the micro-batch keeps within MEMORY_MARGIN of what the device has. Global (all processes)."""
    processes = accelerator.num_processes
    share = cfg.batch_size // processes
    if cfg.micro_batch != "auto":
        if cfg.micro_batch % processes:
            raise DataSourceError(f"train.micro_batch ({cfg.micro_batch}) must be a multiple of the number of "
                                  f"processes ({processes})")
        return cfg.micro_batch
    from accelerate.utils import gather_object

    per_sample, base, budget = probe_memory(model, model_cfg, accelerator)
    fits = [d for d in range(share, 0, -1) if share % d == 0 and base + d * per_sample <= budget]
    chosen = min(gather_object([fits[0] if fits else 1]))  # every process the same: they accumulate in step
    log.info("train.micro_batch auto: %d per process (%.2f GiB per sample at %d caption tokens, %.1f GiB for the "
             "model, %.1f GiB allowed on %s)", chosen, per_sample / 2**30, model_cfg.max_caption_tokens, base / 2**30,
             budget / 2**30, accelerator.device)
    return chosen * processes


MEMORY_MARGIN = 0.7  # of the device's free memory: allocator fragmentation, validation and checkpoints need room


def probe_memory(model, model_cfg, accelerator) -> tuple[float, float, float]:
    """Bytes one sample's forward and backward hold, what is held without it, and the budget. Runs on random
    inputs with the RNG state forked, so training draws exactly what it would have drawn without the probe."""
    import psutil

    device, inner = accelerator.device, accelerator.unwrap_model(model)
    side, tokens = inner.config.vision_config.image_size, model_cfg.max_caption_tokens
    cuda = device.type == "cuda"

    def held(n: int) -> float:
        batch = {"pixel_values": torch.zeros(n, 3, side, side, device=device),
                 "input_ids": torch.ones(n, tokens, dtype=torch.long, device=device),
                 "attention_mask": torch.ones(n, tokens, dtype=torch.long, device=device)}
        batch["labels"] = batch["input_ids"]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
        loss = token_loss_sum(model, batch, 0.0)
        after = torch.cuda.max_memory_allocated() if cuda else psutil.Process().memory_info().rss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return after - before, before

    with torch.random.fork_rng(devices=[device] if cuda else []):
        one, base = held(1)
        two, _ = held(2)
    per_sample = max(two - one, one / 2, 1.0)
    free = (torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated()) if cuda else (
        psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    return per_sample, base, MEMORY_MARGIN * free


def log_losses(job: Job, state: RunState, pending: list, pace: "Pace") -> None:
    """The pending steps' losses (mean over processes: one collective), lr and throughput, to the log and MLflow."""
    import mlflow

    losses = job.accelerator.reduce(torch.stack([l.float() for _, l, _ in pending]), "mean").tolist()
    rows = [{"step": s, "loss": l, "lr": lr} for (s, _, lr), l in zip(pending, losses)]
    pending.clear()
    state.train_log.extend(rows)
    speed = pace.interval(state.step)
    if state.run is not None:
        for r in rows:
            mlflow.log_metrics({"train_loss": r["loss"], "lr": r["lr"]}, step=r["step"], synchronous=False)
        mlflow.log_metrics(speed, step=state.step, synchronous=False)
    log.info("step %d/%d loss %.4f lr %.2e | %s", state.step, job.params.train.max_steps, rows[-1]["loss"],
             rows[-1]["lr"], ", ".join(f"{k} {v:.3g}" for k, v in speed.items()))


def evaluate_and_keep_best(job: Job, state: RunState, out: Outputs) -> None:
    """Validation loss and CIDEr-D; an improvement becomes the best model (saved atomically)."""
    import mlflow

    accelerator, params = job.accelerator, job.params
    values, captions = validate(accelerator.unwrap_model(job.model), job.processor, job.val_rows, job.collate,
                                params, accelerator)
    improved = state.tracker.update(state.step, values)
    if state.run is not None:
        mlflow.log_metrics(values, step=state.step)
        log_samples(job.val_rows[: params.train.sample_images], captions, state.step)
    log.info("step %d validation %s%s", state.step, {k: round(v, 4) for k, v in values.items()},
             " (best so far)" if improved else "")
    accelerator.wait_for_everyone()
    if improved and accelerator.is_main_process:
        save_best(accelerator.unwrap_model(job.model), job.processor, out.checkpoint_dir / "best", params, job.init.record)


def save_checkpoint(job: Job, state: RunState, out: Outputs) -> None:
    """The full training state, every process's RNGs included, written atomically by the main process."""
    import mlflow
    from accelerate.utils import gather_object

    rngs = gather_object([checkpoint.rng_state()])  # every process's RNGs, in process order
    if job.accelerator.is_main_process:
        mlflow.flush_async_logging()  # what the checkpoint has done is in MLflow before it counts
        tensors = {"model": adapters.trainable_state(job.accelerator.unwrap_model(job.model)),
                   "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(), "rng": rngs}
        checkpoint.save(out.checkpoint_dir / "state", tensors, {
            "fingerprint": state.fingerprint, "step": state.step, "consumed": state.consumed,
            "train_log": state.train_log, "run_id": state.run.info.run_id, "tracker": state.tracker.state()})


def finish(job: Job, state: RunState, out: Outputs, stop_reason: str, pace: "Pace", lengths: dict) -> dict:
    """The summary; the best model moved into place, metrics and plots written, the checkpoint discarded."""
    cfg, accelerator, seconds = job.params.train, job.accelerator, pace.seconds()
    summary = {
        "steps": state.step, "best_step": state.tracker.best_step, "best_metric": cfg.metric,
        "best_value": state.tracker.best, "stop_reason": stop_reason, "train_seconds": round(seconds, 3),
        # the steps of this process only: after a resume, the earlier ones ran before it started
        "samples_per_second": round((state.step - pace.first_step) * cfg.batch_size / seconds, 2),
        "micro_batch": job.micro_batch,
        "parameters": job.parameters, "trainable_parameters": job.trainable, "method": job.params.train.method,
        "processes": accelerator.num_processes,
        **({"caption_truncated_fraction": round(lengths["truncated_fraction"], 5)} if lengths else {}),
        **({"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
           if torch.cuda.is_available() else {}),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # a copy swapped in (the output appears whole or not at all), the checkpoint's best left whole until the
        # checkpoint is discarded: a kill in between re-runs from the checkpoint and publishes again
        checkpoint.publish(out.checkpoint_dir / "best", out.model_dir)
        faults.point("train.published")
        _finish(summary, state.train_log, state.tracker.history, out, job.params.model.label_smoothing)
        checkpoint.discard(out.checkpoint_dir)  # finished: the next run starts afresh
    accelerator.end_training()
    return summary


class Pace:
    """Times the run: the ETA once the first steps are done, and over each log interval the samples/s,
    text tokens/s and, on a GPU whose peak is known, the model FLOPs utilisation (nanoGPT's estimate:
    6 FLOPs per parameter per token trained, 2 through a frozen vision encoder, attention left out)."""

    def __init__(self, first_step: int, params: Params, accelerator, model):
        from .runtime import gpu_peak_tflops

        self.first_step, self.params, self.processes = first_step, params, accelerator.num_processes
        self.started = self.warm = self.mark = time.perf_counter()
        self.mark_step, self.tokens = first_step, None
        inner = accelerator.unwrap_model(model)
        vision = inner.config.vision_config
        self.vision_flops = ((2 if params.train.freeze_vision else 6) * sum(p.numel() for p in inner.vision_model.parameters())
                             * ((vision.image_size // vision.patch_size) ** 2 + 1))
        self.text_flops = 6 * sum(p.numel() for p in inner.text_decoder.parameters())
        self.peak = gpu_peak_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None

    def count(self, batch: dict) -> None:
        """Adds a micro-batch's text tokens, on the device: read once per log interval, no sync per step."""
        tokens = batch["attention_mask"].sum()
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def stepped(self, step: int, run) -> None:
        """After an optimizer step: announces the ETA once, timed after the first (warm-up) step."""
        cfg = self.params.train
        if step == self.first_step + 1:
            self.warm = time.perf_counter()
        if step != min(self.first_step + 1 + ETA_STEPS, cfg.max_steps) or run is None:
            return
        import mlflow

        now = time.perf_counter()
        pace = (now - self.warm) / (step - self.first_step - 1) if step > self.first_step + 1 else now - self.started
        message = eta_message(pace, step, cfg.max_steps, cfg.eval_every)
        log.info("ETA: %s", message)
        mlflow.log_metric("seconds_per_step", pace, step=step)
        mlflow.set_tag("eta", message)

    def interval(self, step: int) -> dict[str, float]:
        """Throughput since the last call (validation and checkpoints included: it is wall time)."""
        cfg = self.params.train
        now = time.perf_counter()
        seconds, steps = max(now - self.mark, 1e-9), step - self.mark_step
        tokens = int(self.tokens.item()) * self.processes if self.tokens is not None else 0
        samples = steps * cfg.batch_size
        speed = {"samples_per_second": samples / seconds, "tokens_per_second": tokens / seconds}
        if self.peak:
            flops = self.vision_flops * samples + self.text_flops * tokens
            speed["mfu"] = flops / seconds / (self.peak * 1e12)
        self.mark, self.mark_step, self.tokens = now, step, None
        return speed

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def log_samples(rows: list[dict], captions: list[str], step: int) -> None:
    """A few validation images with the captions of this step, so the UI shows captions improve."""
    import mlflow

    if rows:
        panel = plots.caption_panel([r["image"] for r in rows], captions[: len(rows)], [r["caption"] for r in rows])
        mlflow.log_image(panel, key="val_captions", step=step, synchronous=False)


def _finish(summary: dict, train_log: list[dict], val_log: list[dict], out: Outputs, label_smoothing: float) -> None:
    """Writes metrics and plots and closes the MLflow run's training part."""
    import mlflow

    out.metrics.parent.mkdir(parents=True, exist_ok=True)
    out.metrics.write_text(json.dumps(summary, indent=2) + "\n")
    write_csv(out.train_log, train_log)
    write_csv(out.val_log, val_log)
    curve = out.loss_curve
    curve.parent.mkdir(parents=True, exist_ok=True)
    plots.loss_curve(train_log, val_log, curve, label_smoothing)
    mlflow.log_metrics({"best_step": summary["best_step"], "train_samples_per_second": summary["samples_per_second"],
                        "train_seconds": summary["train_seconds"]})
    mlflow.set_tag("stop_reason", summary["stop_reason"])
    mlflow.log_artifact(str(curve))
    mlflow.log_artifact(str(out.metrics))
    mlflow.flush_async_logging()
    mlflow.end_run()
    log.info("best %s %.4f at step %d; %s", summary["best_metric"], summary["best_value"], summary["best_step"],
             summary["stop_reason"])


def main(argv: list[str] | None = None) -> None:
    args = stage_args(__doc__, argv, "data", "model_dir", "run_ref", "checkpoint_dir", "metrics", "train_log",
                      "val_log", "loss_curve", "fingerprint")
    params = load_params(args.params)
    fingerprint.pin(params.numerics.cpu_kernels, params.numerics.threads)  # before torch computes anything
    out = Outputs(args.model_dir, args.run_ref, args.metrics, args.train_log, args.val_log, args.checkpoint_dir,
                  args.loss_curve, args.fingerprint)
    try:
        train(params, args.data, out, origin.load(params.model.init, args.init))
    except BaseException as error:
        import mlflow

        if mlflow.active_run() is not None:  # the run shows as failed, not as running forever
            mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        lost = lost_peer(error)
        if lost:
            raise FashioncapError(lost) from error
        raise


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
             "NCCL communicator was aborted", "ProcessGroupGloo", "DistBackendError")


def lost_peer(error: BaseException) -> str | None:
    """The message for a process of a distributed training that lost another one (a killed process, a lost
    machine): the collectives of the survivors fail as soon as the peer's connections close."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = f"{type(error).__name__}: {error}"
    if not isinstance(error, RuntimeError) or not any(mark in text for mark in PEER_GONE):
        return None
    return (f"process {dist.get_rank()} of {dist.get_world_size()} lost another process of the training "
            f"({text.splitlines()[0][:200]}): a process or machine stopped. The last checkpoint is kept; start the "
            "stage again on every machine to resume from it.")


if __name__ == "__main__":
    run_stage(main)
