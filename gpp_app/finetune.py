"""Fine-tune an ONNX model on CIFAR-10 with its pruned weights frozen at zero (torch, optional).

The model is converted with onnx2torch, trained on the train split (SGD with momentum,
weight decay, random 4-pixel-padded crops and horizontal flips, a cosine or one-cycle
learning rate), and the trained values are written back into the ONNX model's own
initializers: the graph, the sparse-tile annotation and the metadata carry over. A
checkpoint is written after every epoch; ``resume`` continues from it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from gpp_app import data
from gpp_app.evaluate import check_fits, check_labels, check_scores, model_batches
from gpp_app.gradual import GradualPruner
from gpp_app.qat import CALIBRATION, VtaRounding
from gpp_app.torch_model import Trainable, import_training, to_trainable
from gpp_onnx.annotation import read_annotation, read_kept_tiles, validate_annotation, write_annotation
from gpp_onnx.errors import UserError
from gpp_onnx.files import atomic_path
from gpp_onnx.model_io import first_line, image_input, load_model, save_model
from gpp_onnx.normalization import normalization_for
from gpp_onnx.pruner import PruneOptions, prune
from gpp_onnx.weights import check_finite_weights

SCHEDULES = ("cosine", "onecycle")
MAX_GRAD_NORM = 10.0
QAT_LR_SCALE = 0.1  # the QAT epochs train with batch-norm folded: a tenth of the scheduled rate
StepCallback = Callable[[int, int, int, float, float], None]  # epoch, step, steps, loss, accuracy


@dataclass
class FinetuneOptions:
    """The fine-tuning recipe; the defaults of ``finetune``, ``sweep`` and the CLI."""

    epochs: int = 3
    lr: float = 0.05  # peak of the one-cycle schedule (with batch-norm restored; folded BN needs <= 0.01)
    batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    device: str | None = None  # cuda when available
    seed: int = 0
    resume: bool = False
    limit: int | None = None  # train on the first N images only
    restore_bn: bool = True  # train with a BatchNorm after each conv, folded back at the end
    teacher: str | None = None  # an ONNX model (the dense one) to distil from
    kd_temperature: float = 4.0  # softens both models' outputs in the distillation loss
    kd_weight: float = 0.7  # share of the distillation loss; 1 - kd_weight goes to the labels
    gradual: PruneOptions | None = None  # prune gradually to gradual.sparsity while training
    gradual_until: float = 0.6  # fraction of the steps over which the sparsity rises; masks fixed after
    qat_epochs: int = 0  # the last epochs train through VTA's int8 rounding (batch-norm folded first)

    def check(self) -> None:
        """Raise UserError for options that cannot work, before any training starts."""
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs} is below 1")
        if self.batch < 1:
            raise UserError(f"batch size {self.batch} is below 1; pass --batch 1 or more")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit} is below 1")
        if not 0 <= self.qat_epochs <= self.epochs:
            raise UserError(f"--qat-epochs {self.qat_epochs} must be between 0 and --epochs {self.epochs}")
        if self.gradual is not None:
            self.gradual.check()
        if not 0 < self.gradual_until <= 1:
            raise UserError(f"--gradual-until {self.gradual_until} is outside (0, 1]")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} is below 0")
        if not (0 < self.kd_temperature < math.inf) or not 0 <= self.kd_weight <= 1:
            raise UserError("--kd-temperature must be above 0 and --kd-weight in [0, 1]")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr {self.lr} must be above 0")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.device not in (None, "cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}; use cpu or cuda")


@functools.lru_cache(maxsize=2)
def split_in_memory(root: str, layout: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as uint8 ``[N, 3, 32, 32]`` and labels (decoded once per process)."""
    batches = list(data.iter_uint8(data.Dataset(layout, Path(root)), split, 1000, limit))
    if not batches:
        raise UserError(f"no {split} images in {root}; {data.LAYOUTS_HELP}")
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 32x32 crops of the 4-pixel zero-padded images, half of them flipped left-right."""
    count, _, height, width = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    windows = sliding_window_view(padded, (height, width), axis=(2, 3))  # [B, C, 9, 9, H, W]
    dy, dx = rng.integers(0, 9, count), rng.integers(0, 9, count)
    crops = windows[np.arange(count), :, dy, dx]
    flip = rng.random(count) < 0.5
    crops[flip] = crops[flip, :, :, ::-1]
    return crops


def _device(torch, requested: str | None) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _save_checkpoint(torch, path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def checkpoint_path(output: Path) -> Path:
    """Where the per-epoch checkpoint of a run writing ``output`` lives."""
    return output.with_name(output.name + ".ckpt")


@dataclass
class _Trainer:
    """The state of one fine-tuning run."""

    torch: object
    trainable: Trainable
    optimizer: object
    schedule: object
    images: np.ndarray
    labels: np.ndarray
    normalize: Callable
    options: FinetuneOptions
    device: str
    history: list

    teacher: object | None = None  # a torch module in eval mode
    pruner: GradualPruner | None = None
    rounding: Callable[[], None] | None = None  # attaches VTA rounding (for the QAT epochs)
    qat: VtaRounding | None = None
    fingerprint: str = ""  # sha256 of the model being trained: a checkpoint belongs to exactly one model

    def advance_schedule(self) -> None:
        """One scheduler step; in the QAT epochs the rate is scaled by ``QAT_LR_SCALE`` (batch-norm is
        folded there, which does not take the rates of BN training), undone before the next step."""
        if self.qat is not None and self.qat.wrapped:
            for group, lr in zip(self.optimizer.param_groups, self.schedule.get_last_lr()):
                group["lr"] = lr
        self.schedule.step()
        if self.qat is not None and self.qat.wrapped:
            for group in self.optimizer.param_groups:
                group["lr"] *= QAT_LR_SCALE

    def begin(self, epoch: int) -> None:
        """Switch to VTA rounding when ``epoch`` is the first QAT epoch (or later, on resume)."""
        if self.rounding is not None and epoch >= self.options.epochs - self.options.qat_epochs:
            self.rounding()
            self.rounding = None
            for param in self.params:  # momentum gathered in the units before batch-norm was folded
                self.optimizer.state.pop(param, None)
            if self.qat.wrapped:
                for group in self.optimizer.param_groups:
                    group["lr"] *= QAT_LR_SCALE

    @property
    def params(self) -> list:
        """What the optimizer updates."""
        return self.trainable.trainable_parameters()

    def loss(self, logits, x, y):
        """Cross-entropy with the labels, mixed with the distillation loss when there is a teacher."""
        torch, options = self.torch, self.options
        hard = torch.nn.functional.cross_entropy(logits, y)
        if self.teacher is None or options.kd_weight == 0:
            return hard
        with torch.no_grad():
            target = torch.nn.functional.softmax(self.teacher(x) / options.kd_temperature, dim=1)
        log_student = torch.nn.functional.log_softmax(logits / options.kd_temperature, dim=1)
        soft = torch.nn.functional.kl_div(log_student, target, reduction="batchmean") * options.kd_temperature**2
        return (1 - options.kd_weight) * hard + options.kd_weight * soft

    def epoch(self, epoch: int, on_step: StepCallback) -> None:
        torch, options, module = self.torch, self.options, self.trainable.module
        rng = np.random.default_rng([options.seed, epoch])
        order = rng.permutation(len(self.labels))
        steps = -(-len(order) // options.batch)
        module.train()
        seen = correct = 0
        loss_sum, began = 0.0, time.perf_counter()
        for step in range(steps):
            index = order[step * options.batch : (step + 1) * options.batch]
            x = self.normalize(torch.from_numpy(augment(self.images[index], rng)).to(self.device))
            y = torch.from_numpy(self.labels[index]).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = module(x)
            loss = self.loss(logits, x, y)
            loss.backward()
            if not torch.isfinite(loss):
                raise UserError(f"training diverged (loss {float(loss)}) in epoch {epoch + 1}; lower --lr")
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)  # guards folded-BN training
            self.optimizer.step()
            self.advance_schedule()
            self.trainable.apply_masks()
            if self.pruner is not None:
                self.pruner.after_step(epoch * steps + step + 1)
            seen += len(index)
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == y).sum())
            on_step(epoch, step, steps, loss_sum / seen, correct / seen)
        self.history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "seconds": time.perf_counter() - began,
            }
        )

    def state(self) -> dict:
        return {
            "epoch": len(self.history),
            "module": self.trainable.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "history": self.history,
            "options": asdict(self.options),
            "frozen": {name: mask.cpu() for name, mask in self.trainable.frozen.items()},
            "qat": self.qat is not None and bool(self.qat.wrapped),
            "model_sha256": self.fingerprint,
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of this model and these options (UserError otherwise)."""
        if state.get("model_sha256") != self.fingerprint:
            raise UserError("the checkpoint belongs to another model; rerun without --resume (it is replaced)")
        if {**state["options"], "resume": self.options.resume} != asdict(self.options):
            raise UserError("the checkpoint was written with other options; rerun without --resume")
        if state.get("qat"):  # written during the QAT epochs: the module has the rounded structure
            self.begin(self.options.epochs - self.options.qat_epochs)
        self.trainable.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.history[:] = state["history"]
        frozen = state.get("frozen", self.trainable.frozen)
        self.trainable.frozen = {name: mask.to(self.device) for name, mask in frozen.items()}


def _resume(trainer: _Trainer, torch, checkpoint: Path, device: str) -> None:
    """Restore the trainer from its checkpoint; an unreadable or foreign checkpoint is a UserError."""
    try:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if not isinstance(state, dict):
            raise ValueError(f"it holds a {type(state).__name__}")
        trainer.restore(state)
    except UserError:
        raise
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        raise UserError(
            f"checkpoint {checkpoint} cannot be resumed ({first_line(exc)}); rerun without --resume"
        ) from None


def _record_target(model: onnx.ModelProto, target: float) -> None:
    """Write the gradual schedule's target into the annotation (re-annotating recorded 0)."""
    annotation = read_annotation(model)
    annotation.target_sparsity = float(target)
    write_annotation(model, annotation)


def _schedule(torch, optimizer, options: FinetuneOptions, steps_per_epoch: int):
    total = steps_per_epoch * options.epochs
    if options.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=options.lr, total_steps=total)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def _teacher(torch, options: FinetuneOptions, probe, student_logits, device: str):
    """The teacher as a torch module in eval mode; its outputs must have the student's shape."""
    if options.teacher is None:
        return None
    teacher = to_trainable(load_model(options.teacher).model).module.to(device).eval()
    try:
        with torch.no_grad():
            shape = tuple(teacher(probe).shape)
    except Exception as exc:  # a teacher with other inputs fails inside its own graph
        raise UserError(f"--teacher {options.teacher} cannot take the student's input ({first_line(exc)})") from None
    if shape != tuple(student_logits.shape):
        raise UserError(
            f"--teacher {options.teacher} outputs {list(shape)}, the student {list(student_logits.shape)}; "
            "distil from the dense model this one was pruned from"
        )
    return teacher


def _prepare(
    trainable: Trainable, torch, images: np.ndarray, labels: np.ndarray, normalize: Callable, options, device: str
):
    """Restore batch-norm (from the first train images) and load the teacher; returns the teacher.
    The model must give class scores for every label (UserError otherwise)."""
    sample = [
        normalize(torch.from_numpy(images[i : i + 256]).to(device)) for i in range(0, min(len(images), 2048), 256)
    ]
    with torch.no_grad():
        student_logits = trainable.module.eval()(sample[0][:2])
    check_scores(student_logits.cpu().numpy(), labels[:2])
    check_labels(labels, student_logits.shape[1])
    teacher = _teacher(torch, options, sample[0][:2], student_logits, device)
    if options.restore_bn:
        trainable.restore_batchnorm(sample)
    return teacher


def train(
    model: onnx.ModelProto,
    dataset: data.Dataset,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    options: FinetuneOptions,
    checkpoint: Path | None = None,
    on_step: StepCallback = lambda *args: None,
) -> tuple[Trainable, list[dict]]:
    """Train ``model``'s weights (frozen zeros stay zero); returns the module and per-epoch stats."""
    torch, _ = import_training()
    options.check()
    device = _device(torch, options.device)
    torch.manual_seed(options.seed)
    images, labels = split_in_memory(str(dataset.root), dataset.layout, "train", options.limit)
    trainable = to_trainable(model)
    trainable.module.to(device)
    trainable.frozen = {name: mask.to(device) for name, mask in trainable.frozen.items()}
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    model_input = data.model_input(model)
    last = data.channels_last(model_input[1], images.shape[1:])  # a TensorFlow export takes [N, H, W, C]

    def normalize(x):
        x = x.float().div_(255).sub_(mean_t).div_(std_t)
        return x.permute(0, 2, 3, 1).contiguous() if last else x

    teacher = _prepare(trainable, torch, images, labels, normalize, options, device)
    optimizer = torch.optim.SGD(
        trainable.trainable_parameters(), lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )
    steps = -(-len(labels) // options.batch)
    schedule = _schedule(torch, optimizer, options, steps)
    pruner = None
    if options.gradual is not None:
        pruner = GradualPruner(model, trainable, options.gradual, steps * options.epochs, options.gradual_until)
    trainer = _Trainer(
        torch, trainable, optimizer, schedule, images, labels, normalize, options, device, [], teacher, pruner
    )
    if options.qat_epochs:
        trainer.qat = VtaRounding(trainable)
        batch, count = model_batches(model_input[1], CALIBRATION.batch, CALIBRATION.images)
        feeds = list(data.feeds(dataset, model_input, mean, std, "train", batch, count))
        trainer.rounding = lambda: trainer.qat.attach(model, feeds, data.describe_feeds(dataset, "train", mean, std))
    trainer.fingerprint = hashlib.sha256(model.SerializeToString()).hexdigest()
    if options.resume and checkpoint is not None and checkpoint.exists():
        _resume(trainer, torch, checkpoint, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notes on onnx2torch's indexing, every step
        for epoch in range(len(trainer.history), options.epochs):
            trainer.begin(epoch)
            trainer.epoch(epoch, on_step)
            if checkpoint is not None:
                _save_checkpoint(torch, checkpoint, trainer.state())
    if trainer.qat is not None:
        trainer.qat.detach()
    trainable.module.cpu()
    return trainable, trainer.history


@dataclass
class FinetuneResult:
    """What a fine-tuning run did; ``test_accuracy`` is filled in by whoever evaluates the output."""

    model: str
    output: str
    data: str
    epochs: int
    frozen_weights: int  # weights held at exactly zero (the pruned tiles)
    history: list[dict]  # per epoch: epoch, loss, train_accuracy, seconds
    options: FinetuneOptions
    test_accuracy: float | None = None
    test_images: int | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON form (the ``finetune --json`` document)."""
        doc = {k: getattr(self, k) for k in ("model", "output", "data", "epochs", "frozen_weights", "history")}
        doc["options"] = asdict(self.options)
        doc.update(test_accuracy=self.test_accuracy, test_images=self.test_images)
        return doc


def check_trainable(model: onnx.ModelProto, dataset: data.Dataset, options: FinetuneOptions) -> None:
    """Everything that would stop fine-tuning, checked before any training or file: finite weights, a
    valid annotation, a conv, one image input that fits the train images, class scores, the teacher."""
    check_finite_weights(model)
    read_kept_tiles(model)
    if not any(node.op_type == "Conv" for node in model.graph.node):
        raise UserError("the model has no Conv layer to fine-tune; gpp-onnx finetune trains CNNs")
    check_fits(model, dataset, ("train",))
    if options.teacher is not None:
        teacher = load_model(options.teacher).model
        check_finite_weights(teacher)
        theirs = image_input(teacher, "--teacher must take one image input [N, C, H, W] or [N, H, W, C]")[1]
        ours = image_input(model)[1]
        if theirs[1:] != ours[1:]:  # the batch axis may be named differently
            raise UserError(
                f"--teacher {options.teacher} takes {theirs} inputs, the model {ours}; "
                "distil from the dense model this one was pruned from"
            )


def finetune(
    model_path: Path,
    data_path: Path,
    output: Path,
    options: FinetuneOptions,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    on_step: StepCallback = lambda *args: None,
) -> FinetuneResult:
    """Fine-tune the model at ``model_path`` and write the result to ``output`` (atomically)."""
    options.check()
    import_training()
    loaded = load_model(model_path)
    dataset = data.locate(data_path)
    check_trainable(loaded.model, dataset, options)
    mean, std = normalization_for(loaded.model, mean, std)
    tuned = onnx.ModelProto()
    tuned.CopyFrom(loaded.model)
    trainable, history = train(tuned, dataset, mean, std, options, checkpoint_path(output), on_step)
    trainable.write_back(tuned)
    if options.gradual is not None:  # annotate exactly the frozen masks (all-zero units are marked for free)
        tuned, _ = prune(tuned, **{**options.gradual.arguments(), "sparsity": 0.0})
        _record_target(tuned, options.gradual.sparsity)
    annotation = read_annotation(tuned)
    if annotation is not None:
        validate_annotation(tuned, annotation)  # the pruned tiles are still exactly zero
    save_model(tuned, output, external_data=loaded.had_external_data)
    frozen = int(sum(int(m.sum()) for m in trainable.frozen.values()))
    return FinetuneResult(str(model_path), str(output), dataset.describe(), options.epochs, frozen, history, options)
