"""Stage `train`: fine-tune BLIP with Accelerate, validate every N steps, keep the best checkpoint."""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Params, TrainParams, load_params
from .data import TOKEN_LENGTHS, DataSourceError
from .metrics import caption_scores
from .modeling import Collator, apply_memory_options, build_processor, caption_all, initial_model, save_model
from .runtime import FashioncapError, progress, run_stage, stage_args
from . import checkpoint, disk, lineage, plots, tracking

log = logging.getLogger(__name__)
ETA_STEPS = 3  # optimizer steps timed (after the first, which warms up) before the ETA is announced


class TrainSetupError(FashioncapError):
    """Training must not start as configured; the message says what to change."""


def check_device(params: Params, has_gpu: bool) -> None:
    """Refuses to fine-tune a pretrained checkpoint without a GPU unless train.allow_cpu says so: the
    default recipe needs days on a CPU. Training from scratch (the offline profile) is unaffected."""
    if has_gpu or params.model.from_scratch or params.train.allow_cpu:
        return
    cfg = params.train
    raise TrainSetupError(
        f"no GPU found: fine-tuning '{params.model.init}' for {cfg.max_steps} steps of {cfg.batch_size} x "
        f"{cfg.grad_accum_steps} samples would take days on this CPU (about 6 s per sample for BLIP-base). "
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


def mixed_precision(requested: str) -> str:
    """'auto' means bf16 where a GPU supports it, else full precision."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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
    for start in range(0, len(part), params.train.batch_size):
        batch = collate(part[start : start + params.train.batch_size])
        out = model(**{k: v.to(device) for k, v in batch.items()})
        loss_sum += out.loss.item() * len(batch["labels"])
    captions = caption_all(model, processor, [r["image"] for r in part], params.generate, desc="validate",
                           quiet=not accelerator.is_local_main_process)
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


def save_best(model, processor, best_dir: Path, params: Params) -> None:
    """Writes model + processor beside best_dir, then swaps it in, so a kill never leaves half a model."""
    staging = checkpoint.staging_for(best_dir)
    save_model(model, processor, staging, params.generate)
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


def train(params: Params, data_dir: Path, out: Outputs) -> dict:
    """Runs the whole fine-tuning and returns its summary; writes the best checkpoint and logs."""
    import datasets
    import mlflow
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed

    cfg = params.train
    check_device(params, torch.cuda.is_available())  # seconds after start, before anything heavy loads
    lengths = check_caption_lengths(params, data_dir)
    dataset = datasets.load_from_disk(str(data_dir))
    processor = build_processor(params.model, dataset["train"]["caption"])
    model = apply_memory_options(initial_model(params.model, processor, params.seed), cfg.freeze_vision,
                                 cfg.gradient_checkpointing)
    # split_batches: train.batch_size is the global batch, whatever the number of processes, so a recipe
    # means the same thing on one CPU and on eight GPUs. cpu=True lets `accelerate launch` run DDP over gloo
    # on a machine without a GPU.
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.grad_accum_steps,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one process tells the story
    if cfg.batch_size % accelerator.num_processes:
        raise DataSourceError(f"train.batch_size ({cfg.batch_size}) must be a multiple of the number of processes "
                              f"({accelerator.num_processes}): it is the global batch, split across them")
    set_seed(params.seed)
    # bit-identical re-runs on the CPU; on a GPU, ops without a deterministic kernel only warn
    torch.use_deterministic_algorithms(True, warn_only=True)
    collate = Collator(processor, params.model.max_caption_tokens, model.config.text_config.bos_token_id)
    sampler = checkpoint.EpochSampler(len(dataset["train"]), params.seed)
    loader = torch.utils.data.DataLoader(
        dataset["train"], batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(params.seed))
    batches_per_epoch = len(dataset["train"]) // cfg.batch_size
    if batches_per_epoch < cfg.grad_accum_steps:
        raise DataSourceError(f"the training split holds {len(dataset['train'])} items, fewer than one optimizer "
                              f"step needs (train.batch_size {cfg.batch_size} x train.grad_accum_steps "
                              f"{cfg.grad_accum_steps})")
    val_rows = list(dataset["validation"].select(range(min(cfg.eval_samples, len(dataset["validation"])))))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    # the scheduler stays unwrapped: it counts optimizer steps, whatever the number of processes
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    n_params = sum(p.numel() for p in model.parameters())
    if accelerator.is_main_process:
        disk.require(out.checkpoint_dir.parent, disk.training_bytes(
            n_params, sum(p.numel() for p in model.parameters() if p.requires_grad), cfg.checkpoint_every < cfg.max_steps),
            f"training {n_params / 1e6:.2f}M parameters (best model and full-state checkpoints)")
    if lengths:
        log.info("captions up to %d tokens (p99 %d, max %d): %.2f%% of them are cut", lengths["limit"],
                 lengths["p99"], lengths["max"], 100 * lengths["truncated_fraction"])
    log.info("training %.2fM parameters on %s x %d (%s), %d train items, batch %d x %d accumulation",
             n_params / 1e6, accelerator.device, accelerator.num_processes, accelerator.mixed_precision,
             len(dataset["train"]), cfg.batch_size, cfg.grad_accum_steps)

    tracker = BestTracker(cfg.metric, cfg.patience)
    train_log: list[dict] = []
    pending: list[tuple[int, torch.Tensor, float]] = []
    window: list[torch.Tensor] = []  # the micro-batch losses of the optimizer step under way
    step = consumed = 0  # optimizer steps done, micro-batches drawn
    fp = checkpoint.fingerprint(params.model_dump(), lineage.dataset_digest(data_dir), accelerator.num_processes)
    # the run's state and its best model so far live under checkpoint_dir until training ends
    state_dir, best_dir = out.checkpoint_dir / "state", out.checkpoint_dir / "best"
    resumed = checkpoint.load(state_dir, fp)
    checkpoint.recover(best_dir)
    accelerator.wait_for_everyone()  # every process has read the checkpoint before one may discard it
    if resumed is None:
        if accelerator.is_main_process:
            checkpoint.discard(out.checkpoint_dir)  # another run's leftovers
    else:
        tensors, meta = resumed
        accelerator.unwrap_model(model).load_state_dict(tensors["model"])
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        step, consumed, train_log = meta["step"], meta["consumed"], meta["train_log"]
        tracker = BestTracker(cfg.metric, cfg.patience, **meta["tracker"])
        log.info("resuming from the checkpoint of step %d", step)
    run = None
    if accelerator.is_main_process:
        if resumed is not None:  # the same MLflow run goes on
            run = tracking.resume_run(resumed[1]["run_id"], system_metrics=True)
        else:
            run = tracking.start_run(params, {"device": accelerator.device.type,
                                              "mixed_precision": accelerator.mixed_precision})
            mlflow.set_tag("data.digest", tracking.log_dataset(data_dir, context="train"))
            if lengths:
                mlflow.log_metrics({"caption_tokens_p99": lengths["p99"],
                                    "caption_truncated_fraction": lengths["truncated_fraction"]})
        tracking.write_run_ref(out.run_ref, run.info.run_id, params.tracking.experiment)
    stop_reason, started, first_step = f"reached train.max_steps ({cfg.max_steps})", time.perf_counter(), step
    warm = started  # when the first step of this process ended
    epoch, offset = divmod(consumed, batches_per_epoch)
    sampler.start = offset * cfg.batch_size
    batches = forever(loader, sampler, epoch)
    if resumed is not None:  # last: nothing may draw from the RNGs after this
        checkpoint.set_rng_state(resumed[0]["rng"][accelerator.process_index])
    bar = progress(total=cfg.max_steps, initial=step, desc="train", unit="step",
                   quiet=not accelerator.is_local_main_process)
    model.train()
    while step < cfg.max_steps:
        with accelerator.accumulate(model):
            loss = model(**next(batches)).loss
            consumed += 1
            window.append(loss.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()  # a no-op on accumulation steps
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update()
        if step == first_step + 1:
            warm = time.perf_counter()
        if step == min(first_step + 1 + ETA_STEPS, cfg.max_steps) and accelerator.is_main_process:
            # the first step warms up (allocations, kernel selection): the pace is timed after it if it can be
            now = time.perf_counter()
            pace = (now - warm) / (step - first_step - 1) if step > first_step + 1 else now - started
            message = eta_message(pace, step, cfg.max_steps, cfg.eval_every)
            log.info("ETA: %s", message)
            if run is not None:
                mlflow.log_metric("seconds_per_step", pace, step=step)
                mlflow.set_tag("eta", message)
        # the step's loss is the mean over its accumulation window; the lr is the one this step used
        pending.append((step, torch.stack(window).float().mean(), scheduler.get_last_lr()[0]))
        window.clear()
        scheduler.step()
        if step % cfg.log_every == 0 or step == cfg.max_steps or step % cfg.checkpoint_every == 0:
            # one collective and one device sync for several steps: the mean loss over all processes
            losses = accelerator.reduce(torch.stack([l.float() for _, l, _ in pending]), "mean").tolist()
            rows = [{"step": s, "loss": l, "lr": lr} for (s, _, lr), l in zip(pending, losses)]
            pending.clear()
            train_log.extend(rows)
            if run is not None:
                for r in rows:
                    mlflow.log_metrics({"train_loss": r["loss"], "lr": r["lr"]}, step=r["step"], synchronous=False)
            log.info("step %d/%d loss %.4f lr %.2e", step, cfg.max_steps, rows[-1]["loss"], rows[-1]["lr"])
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            values, captions = validate(accelerator.unwrap_model(model), processor, val_rows, collate, params,
                                        accelerator)
            improved = tracker.update(step, values)
            if run is not None:
                mlflow.log_metrics(values, step=step)
                log_samples(val_rows[: cfg.sample_images], captions, step)
            log.info("step %d validation %s%s", step, {k: round(v, 4) for k, v in values.items()},
                     " (best so far)" if improved else "")
            accelerator.wait_for_everyone()
            if improved and accelerator.is_main_process:
                save_best(accelerator.unwrap_model(model), processor, best_dir, params)
            if tracker.exhausted:
                stop_reason = f"early stopping: {cfg.metric} did not improve for {cfg.patience} evaluations"
                break
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            rngs = gather_object([checkpoint.rng_state()])  # every process's RNGs, in process order
            if accelerator.is_main_process:
                mlflow.flush_async_logging()  # what the checkpoint has done is in MLflow before it counts
                state = {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rngs}
                checkpoint.save(state_dir, state, {
                    "fingerprint": fp, "step": step, "consumed": consumed, "train_log": train_log,
                    "run_id": run.info.run_id, "tracker": tracker.state()})
    bar.close()
    seconds = time.perf_counter() - started
    summary = {
        "steps": step, "best_step": tracker.best_step, "best_metric": cfg.metric, "best_value": tracker.best,
        "stop_reason": stop_reason, "train_seconds": round(seconds, 1),
        # the steps of this process only: after a resume, the earlier ones ran before `started`
        "samples_per_second": round((step - first_step) * cfg.batch_size * cfg.grad_accum_steps / seconds, 2),
        "parameters": n_params, "processes": accelerator.num_processes,
        **({"caption_truncated_fraction": round(lengths["truncated_fraction"], 5)} if lengths else {}),
        **({"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
           if torch.cuda.is_available() else {}),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.swap_in(best_dir, out.model_dir)  # a rename: the output appears whole or not at all
        _finish(summary, train_log, tracker.history, out, params.model.label_smoothing)
        checkpoint.discard(out.checkpoint_dir)  # finished: the next run starts afresh
    accelerator.end_training()
    return summary


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
                      "val_log", "loss_curve")
    params = load_params(args.params)
    out = Outputs(args.model_dir, args.run_ref, args.metrics, args.train_log, args.val_log, args.checkpoint_dir,
                  args.loss_curve)
    try:
        train(params, args.data, out)
    except BaseException as error:
        import mlflow

        if mlflow.active_run() is not None:  # the run shows as failed, not as running forever
            mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise


if __name__ == "__main__":
    run_stage(main)
