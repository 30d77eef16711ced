"""Best-checkpoint bookkeeping, early stopping and precision choice of the train stage."""

import os

import pytest
import torch

from tests.conftest import train_command, train_outputs

from fashioncap.train import BestTracker, make_optimizer, mixed_precision


def test_best_tracker_keeps_the_highest_cider_and_counts_stale_evaluations():
    t = BestTracker("val_cider_d", patience=2)
    assert t.update(100, {"val_cider_d": 1.0, "val_loss": 2.0})
    assert t.update(200, {"val_cider_d": 1.5, "val_loss": 1.9})
    assert not t.update(300, {"val_cider_d": 1.4, "val_loss": 1.8})
    assert not t.exhausted
    assert not t.update(400, {"val_cider_d": 1.5, "val_loss": 1.7})  # a tie is no improvement
    assert t.exhausted and (t.best, t.best_step) == (1.5, 200)
    assert [h["step"] for h in t.history] == [100, 200, 300, 400]


def test_best_tracker_minimises_loss():
    t = BestTracker("val_loss", patience=1)
    t.update(1, {"val_loss": 2.0})
    assert t.update(2, {"val_loss": 1.0}) and not t.update(3, {"val_loss": 1.1})
    assert t.best_step == 2 and t.exhausted


@pytest.mark.parametrize(("gpu", "capability", "cpu_bf16", "expected"), [
    (False, None, False, "no"), (False, None, True, "bf16"),  # a CPU: bf16 where its kernels have it natively
    (True, (7, 5), True, "fp16"), (True, (7, 0), False, "fp16"),  # T4, V100: fp16 with the gradient scaler
    (True, (8, 0), False, "bf16"), (True, (9, 0), False, "bf16"),  # A100, H100: a GPU decides, whatever the CPU has
])
def test_auto_precision_is_what_the_device_computes_natively(monkeypatch, gpu, capability, cpu_bf16, expected):
    from fashioncap import fingerprint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(fingerprint, "native_bf16", lambda: cpu_bf16)
    assert mixed_precision("auto") == expected
    assert mixed_precision("fp16") == "fp16" and mixed_precision("no") == "no"  # explicit values pass through


@pytest.mark.parametrize(("gpu", "asked", "deterministic"), [(False, False, True), (False, True, True),
                                                            (True, False, False), (True, True, True)])
def test_the_cpu_is_always_deterministic_and_a_gpu_as_numerics_says(monkeypatch, gpu, asked, deterministic):
    from fashioncap import fingerprint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    try:
        fingerprint.set_determinism(asked)
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.utils.deterministic.fill_uninitialized_memory is False  # no NaN fill of new tensors
        assert torch.backends.cudnn.benchmark is not deterministic
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark = before[2:]


def test_no_weight_decay_on_biases_and_norms(tiny_params):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = make_optimizer(model, tiny_params.train).param_groups
    assert decay["weight_decay"] == tiny_params.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3


@pytest.mark.slow
def test_a_training_split_smaller_than_one_step_is_a_clear_error(tiny_raw, tiny_model, write_params, tmp_path):
    import subprocess

    _, data_dir = tiny_model
    raw = {**tiny_raw, "data": {**tiny_raw["data"], "source": "imagefolder", "path": str(tmp_path)},
           "train": {**tiny_raw["train"], "batch_size": 256, "micro_batch": 64}}
    proc = subprocess.run(train_command(tmp_path, write_params(raw), data_dir),
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "fewer than one optimizer step needs" in proc.stderr, proc.stderr[-2000:]


def test_memory_options_freeze_the_vision_encoder_and_checkpoint_activations(tiny_params):
    from fashioncap.modeling import Collator, apply_memory_options, build_processor, initial_model
    from fashioncap.synthetic import catalogue

    items = list(catalogue(0, 4, tiny_params.model.image_size))
    processor = build_processor(tiny_params.model, [p.caption for p in items])
    model = apply_memory_options(initial_model(tiny_params.model, processor, 0), True, True)
    assert model.is_activation_checkpointing
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    model.train()
    collate = Collator(processor, 16, model.config.text_config.bos_token_id)
    loss = model(**collate([{"image": p.image, "caption": p.caption} for p in items])).loss
    loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_decoder.parameters())
    opt = make_optimizer(model, tiny_params.train)  # only trainable parameters get optimizer state
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) < sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_default_profile_without_a_gpu_stops_in_seconds_naming_the_way_out(tmp_path, write_params):
    """The committed default params on a CPU-only machine: no download, no model load, a clear exit 2."""
    import subprocess
    import time

    from tests.conftest import default_params

    params = write_params(default_params())
    started = time.monotonic()
    proc = subprocess.run(train_command(tmp_path, params, tmp_path / "not-prepared"),
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "no GPU found" in proc.stderr and "profile=offline" in proc.stderr and "train.allow_cpu=true" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow.db").exists()


def test_cpu_guard_lets_scratch_models_and_explicit_overrides_through(tiny_params):
    from fashioncap.train import TrainSetupError, check_device

    check_device(tiny_params, has_gpu=False)  # offline profile: from scratch
    pretrained = tiny_params.model_copy(update={"model": tiny_params.model.model_copy(update={"init": "some/blip"})})
    with pytest.raises(TrainSetupError, match="allow_cpu"):
        check_device(pretrained, has_gpu=False)
    check_device(pretrained, has_gpu=True)
    allowed = pretrained.model_copy(update={"train": pretrained.train.model_copy(update={"allow_cpu": True})})
    check_device(allowed, has_gpu=False)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_a_cpu_only_torch_on_a_machine_with_an_nvidia_gpu_is_told_to_install_the_cuda_build(monkeypatch, tmp_path):
    """The default params on a machine whose NVIDIA driver made a device file, with this environment's real
    CPU-only torch: the refusal names the GPU and the install the README gives, not "no GPU found". Only the
    device check is mocked (device files under tmp_path, no nvidia-smi on PATH)."""
    from fashioncap import train
    from fashioncap.config import parse_params
    from tests.conftest import REPO, default_params

    params = parse_params(default_params())
    monkeypatch.setattr(train, "NVIDIA_DEVICE_FILES", str(tmp_path / "nvidia[0-9]*"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(train.TrainSetupError, match="^no GPU found") as none:
        train.check_device(params, torch.cuda.is_available())
    (tmp_path / "nvidia0").touch()
    with pytest.raises(train.TrainSetupError) as cpu_torch:
        train.check_device(params, torch.cuda.is_available())
    message = str(cpu_torch.value)
    assert "no GPU found" not in message and f"NVIDIA GPU ({tmp_path / 'nvidia0'})" in message
    assert f"torch {torch.__version__} is a CPU-only build" in message and message.endswith(train.GPU_INSTALL)
    assert train.GPU_INSTALL in (REPO / "README.md").read_text()  # the README's GPU install, word for word
    assert "allow_cpu" in str(none.value)


def test_a_cuda_torch_that_sees_no_gpu_on_a_machine_with_one_is_told_to_check_the_driver(monkeypatch, tmp_path):
    """torch's CUDA build (its version mocked, with the device check) that sees no device: the refusal says
    so and names what hides it, not the install."""
    from fashioncap import train
    from fashioncap.config import parse_params
    from tests.conftest import default_params

    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(train, "NVIDIA_DEVICE_FILES", str(tmp_path / "nvidia[0-9]*"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(train.TrainSetupError) as refused:
        train.check_device(parse_params(default_params()), has_gpu=False)
    message = str(refused.value)
    assert "is built for CUDA 12.8, but torch sees no GPU" in message and "CUDA_VISIBLE_DEVICES" in message
    assert train.GPU_INSTALL not in message and "no GPU found" not in message


def test_max_caption_tokens_below_the_99th_percentile_is_refused(tiny_params, tmp_path):
    import json

    from fashioncap.data import TOKEN_LENGTHS
    from fashioncap.train import TrainSetupError, check_caption_lengths

    counts = {"10": 90, "30": 9, "40": 1}  # p99 = 30
    (tmp_path / TOKEN_LENGTHS).write_text(json.dumps(
        {"p50": 10, "p95": 30, "p99": 30, "max": 40, "captions": 100, "tokenizer": "t", "counts": counts}))
    short = tiny_params.model_copy(update={"model": tiny_params.model.model_copy(update={"max_caption_tokens": 24})})
    with pytest.raises(TrainSetupError, match=r"model.max_caption_tokens \(24\) is below .*p99 30.*max_caption_tokens=30"):
        check_caption_lengths(short, tmp_path)
    enough = tiny_params.model_copy(update={"model": tiny_params.model.model_copy(update={"max_caption_tokens": 32})})
    assert check_caption_lengths(enough, tmp_path)["truncated_fraction"] == pytest.approx(0.01)


def test_eta_message_extrapolates_the_measured_pace():
    from fashioncap.train import eta_message

    assert "about 2 d 2 h" in eta_message(60.0, 10, 3010, 250)
    assert "about 1 min 40 s" in eta_message(1.0, 0, 100, 50)


class GradientRecorder:
    """An optimizer that keeps the gradients of its one step, by parameter name, and changes nothing."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def one_step(params, data_dir, micro):
    """The first batch and one train_step of it (no clipping): returns the step's loss, the batch, the
    gradients and the job."""
    from fashioncap import train

    cfg = params.train.model_copy(update={"micro_batch": micro, "clip_grad_norm": 1e9})
    job = train.build(params.model_copy(update={"train": cfg}), data_dir)
    job.optimizer = GradientRecorder(job.model)
    batch = next(train.batches_from(job, 0))
    loss = train.train_step(job, batch)
    return loss, batch, job.optimizer.grads, job


def test_a_step_is_the_same_function_of_the_data_however_the_batch_is_split(tiny_params, tiny_model):
    _, data_dir = tiny_model
    params = tiny_params.model_copy(update={
        "train": tiny_params.train.model_copy(update={"batch_size": 32, "mixed_precision": "no"}),  # fp32
        "model": tiny_params.model.model_copy(update={"label_smoothing": 0.1})})
    whole, batch, whole_grads, job = one_step(params, data_dir, 32)
    split, batch_again, split_grads, _ = one_step(params, data_dir, 8)  # 8 x 4 accumulation
    assert job.micro_batch == 32 and torch.equal(batch["input_ids"], batch_again["input_ids"])
    assert batch["attention_mask"].sum(1).max() > batch["attention_mask"].sum(1).min()  # uneven captions
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    assert split_grads.keys() == whole_grads.keys() and len(whole_grads) > 20
    for name in whole_grads:  # the same gradients to fp32 rounding
        torch.testing.assert_close(split_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)
    # the mean over the batch's caption tokens is BLIP's own loss of the whole batch
    with torch.no_grad():
        assert whole.item() == pytest.approx(job.model(**batch).loss.item(), rel=1e-5)


@pytest.mark.slow
def test_auto_micro_batch_fits_and_trains_exactly_as_the_same_number_set_by_hand(tiny_params, tiny_model, tmp_path,
                                                                               monkeypatch, caplog):
    import csv

    from fashioncap import train

    _, data_dir = tiny_model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    logs = {}
    for micro in ("auto", tiny_params.train.batch_size):
        cfg = tiny_params.train.model_copy(update={"micro_batch": micro, "max_steps": 4, "eval_every": 4,
                                                   "checkpoint_every": 4, "warmup_steps": 1, "log_every": 1})
        out = train_outputs(tmp_path / str(micro))
        with caplog.at_level("INFO", logger="fashioncap.train"):
            summary = train.train(tiny_params.model_copy(update={"train": cfg}), data_dir, out)
        assert summary["micro_batch"] == tiny_params.train.batch_size  # the tiny model fits whole
        logs[micro] = list(csv.DictReader(out.train_log.open()))
    assert "train.micro_batch auto: 8 per process" in caplog.text
    assert logs["auto"] == logs[tiny_params.train.batch_size]  # the probe drew nothing from training's RNGs


@pytest.mark.slow
def test_compiled_training_computes_the_same_loss_and_never_recompiles_after_warm_up(tiny_params, tiny_model,
                                                                                   monkeypatch):
    import functools

    from torch._dynamo.utils import counters

    from fashioncap import train

    # dynamo's graphs and guards are what recompiles; AOT autograd without Inductor's C++ code generation
    # traces the same forward and backward in seconds instead of a minute on 2 cores
    monkeypatch.setattr(train.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    _, data_dir = tiny_model
    fp32 = tiny_params.train.model_copy(update={"mixed_precision": "no", "batch_size": 2})  # batches of 2 vary more
    params = tiny_params.model_copy(update={  # captions of their own lengths, none cut
        "model": tiny_params.model.model_copy(update={"max_caption_tokens": 64}),
        "generate": tiny_params.generate.model_copy(update={"max_new_tokens": 64})})
    eager = train.build(params.model_copy(update={"train": fp32}), data_dir)
    job = train.build(params.model_copy(update={"train": fp32.model_copy(update={"compile": True})}), data_dir)
    batches = [next(train.batches_from(job, i)) for i in range(8)]
    lengths = {b["input_ids"].shape[1] for b in batches}
    assert len(lengths) >= 2 and all(n % 8 == 0 for n in lengths)  # captions vary; padding makes few shapes
    assert train.train_step(job, batches[0]).item() == pytest.approx(train.train_step(eager, batches[0]).item(),
                                                                     rel=1e-5)
    for batch in batches:  # warm-up: every padded length once
        train.train_step(job, batch)
    compiled = counters["stats"]["unique_graphs"]
    for batch in batches:
        train.train_step(job, batch)
    assert counters["stats"]["unique_graphs"] == compiled > 0
