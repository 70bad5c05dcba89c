"""A small trainer for the learned parts of rewritten models (routers, head mixes, forecasters).

``train`` freezes everything that is not trainable, runs AdamW with warmup and a cosine or constant
schedule, restores ``requires_grad`` afterwards and can save the trained parameters to safetensors.
It works on any ``nn.Module``, ``torch.fx.GraphModule`` included.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condfx.model_io import model_device, model_logits

__all__ = ["Schedule", "TrainResult", "load_trained", "next_token_loss", "save_trained", "train"]

Batch = tuple[torch.Tensor, torch.Tensor]


class Schedule(str, Enum):
    """Learning-rate schedule after the linear warmup."""

    COSINE = "cosine"
    CONSTANT = "constant"


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` did.

    Attributes:
        losses: the loss of every step.
        steps: steps run.
        seconds: wall time.
        trainable_params: names of the parameters that were trained.
    """

    losses: list[float]
    steps: int
    seconds: float
    trainable_params: list[str]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T) at the same positions, -100 ignored.

    ``targets[:, t]`` is the token expected after ``input_ids[:, t]`` (targets are pre-shifted).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def _select(model: nn.Module, trainable) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        return names
    if callable(trainable):
        chosen = [n for n in names if trainable(n)]
        if not chosen:
            msg = "trainable callable selected no parameter of the model"
            raise ValueError(msg)
        return chosen
    if isinstance(trainable, str) or not isinstance(trainable, Sequence):
        msg = f"trainable must be None, a callable name -> bool or a list of regexes; got {trainable!r}"
        raise TypeError(msg)
    chosen: set[str] = set()
    for pattern in trainable:
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            msg = f"trainable pattern {pattern!r} matches no parameter; names look like {names[:3]}"
            raise ValueError(msg)
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _check_args(steps: int, lr: float, batch_size: int, warmup: int, schedule) -> Schedule:
    if not isinstance(steps, int) or steps <= 0:
        msg = f"steps must be a positive int; got {steps!r}"
        raise ValueError(msg)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        msg = f"lr must be a finite number > 0; got {lr!r}"
        raise ValueError(msg)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        msg = f"batch_size must be a positive int; got {batch_size!r}"
        raise ValueError(msg)
    if not 0 <= warmup < steps:
        msg = f"warmup must be in [0, steps); got {warmup} with steps={steps}"
        raise ValueError(msg)
    try:
        return Schedule(schedule)
    except ValueError:
        msg = f"schedule must be one of {{cosine, constant}}; got {schedule!r}"
        raise ValueError(msg) from None


def _lr_factor(step: int, steps: int, warmup: int, schedule: Schedule) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule is Schedule.CONSTANT:
        return 1.0
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine down to 10 % of lr


def _batches(data, steps: int, generator: torch.Generator, batch_size: int):
    if callable(data):
        for step in range(steps):
            yield data(step, generator)
        return
    if not isinstance(data, Iterable):
        msg = f"data must be a callable(step, generator) or an iterable of batches; got {type(data).__name__}"
        raise TypeError(msg)
    iterator = iter(data)
    for step in range(steps):
        try:
            yield next(iterator)
        except StopIteration:
            msg = f"data ran out after {step} batches; steps={steps} needs that many"
            raise ValueError(msg) from None


def _progress_bar(enabled: bool, steps: int):
    """Returns (advance(loss), close()) using rich when enabled and on a TTY, else no-ops."""
    if not (enabled and sys.stderr.isatty()):
        return (lambda loss: None), (lambda: None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    task = bar.add_task("train", total=steps, loss=float("nan"))
    bar.start()
    return (lambda loss: bar.update(task, advance=1, loss=loss)), bar.stop


def train(
    model: nn.Module,
    data: Callable[[int, torch.Generator], Batch] | Iterable[Batch],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    trainable: Callable[[str], bool] | Sequence[str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_loss: Callable[[nn.Module, Batch, torch.Tensor], torch.Tensor] | None = None,
    schedule: Schedule | str = "cosine",
    warmup: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 0,
    callback: Callable[[int, float, nn.Module], None] | None = None,
    save_to: str | Path | None = None,
) -> TrainResult:
    """Trains the selected parameters of ``model`` in place.

    Args:
        model: any module whose forward maps input_ids (B, T) to logits (B, T, V).
        data: ``callable(step, generator) -> (input_ids, targets)`` or an iterable of such pairs.
            ``batch_size`` is informative for callables that ignore it; it is validated only.
        steps: optimizer steps.
        lr: peak learning rate (AdamW).
        batch_size: batch size the data source is expected to produce (validated, > 0).
        trainable: None (all parameters), a callable ``name -> bool`` or a list of regexes
            searched in parameter names; each regex must match at least one parameter.
        loss_fn: ``loss_fn(logits, targets)``; default :func:`next_token_loss`.
        extra_loss: ``extra_loss(model, batch, logits)`` added to the loss (router penalties).
        schedule: "cosine" (to 10 % of lr) or "constant", after ``warmup`` linear warmup steps.
        warmup: warmup steps, ``0 <= warmup < steps``.
        weight_decay: AdamW weight decay.
        grad_clip: max global grad norm; None disables clipping.
        seed: seeds the torch generator handed to ``data``.
        progress: show a rich progress bar when stderr is a TTY.
        log_every: print the mean loss every this many steps (0: never).
        callback: ``callback(step, loss, model)`` after every step.
        save_to: write the trained parameters (only) to this safetensors file.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: on non-positive steps, lr or batch size, a bad warmup or schedule, a
            trainable pattern matching nothing, or a data iterable that runs out.
        TypeError: on a ``trainable`` or ``data`` of the wrong kind.
    """
    sched = _check_args(steps, lr, batch_size, warmup, schedule)
    names = _select(model, trainable)
    params = dict(model.named_parameters())
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    loss_fn = loss_fn or next_token_loss
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    was_training = model.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=weight_decay)
        _set_train(model, True)
        recipe = _Recipe(
            steps, lr, warmup, sched, loss_fn, extra_loss, grad_clip, progress, log_every, callback
        )
        losses = _loop(model, opt, _batches(data, steps, generator, batch_size), recipe, device)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
        _set_train(model, was_training)
    if save_to is not None:
        save_trained(model, names, save_to)
    return TrainResult(losses=losses[0], steps=steps, seconds=losses[1], trainable_params=names)


def _set_train(model: nn.Module, mode: bool) -> None:
    try:
        model.train(mode)
    except (NotImplementedError, RuntimeError):
        pass  # torch.export graph modules refuse train()/eval(); they keep their captured mode


@dataclass(frozen=True)
class _Recipe:
    """The per-step settings of one ``train`` call."""

    steps: int
    lr: float
    warmup: int
    schedule: Schedule
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    extra_loss: Callable[[nn.Module, Batch, torch.Tensor], torch.Tensor] | None
    grad_clip: float | None
    progress: bool
    log_every: int
    callback: Callable[[int, float, nn.Module], None] | None


def _loop(model, opt, batches, r: _Recipe, device) -> tuple[list[float], float]:
    advance, close = _progress_bar(r.progress, r.steps)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for step, batch in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = r.lr * _lr_factor(step, r.steps, r.warmup, r.schedule)
            input_ids, targets = (t.to(device) for t in batch)
            logits = model_logits(model, input_ids)
            loss = r.loss_fn(logits, targets)
            if r.extra_loss is not None:
                loss = loss + r.extra_loss(model, (input_ids, targets), logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], r.grad_clip
                )
            opt.step()
            losses.append(float(loss.detach()))
            advance(losses[-1])
            if r.log_every and (step + 1) % r.log_every == 0:
                print(f"step {step + 1}/{r.steps} loss {sum(losses[-r.log_every:]) / r.log_every:.4f}")
            if r.callback is not None:
                r.callback(step, losses[-1], model)
    finally:
        close()
    return losses, time.perf_counter() - start


TRAINED_FORMAT = "condfx-trained-2"
"""The ``format`` metadata of files written by ``save_trained`` (with the weights identity)."""


def save_trained(model: nn.Module, names: Sequence[str], path: str | Path) -> Path:
    """Writes the parameters ``names`` of ``model`` to safetensors, with what they were trained on.

    The metadata holds the tensor list and the identity of the weights that were *not* saved
    (``condfx.model_io.weights_identity``: their SHA256), which ``load_trained`` checks.

    Returns:
        The path written.
    """
    import json

    from safetensors.torch import save_file

    from condfx.model_io import weights_identity

    params = dict(model.named_parameters())
    names = sorted(names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": TRAINED_FORMAT, "tensors": json.dumps(names),
            "identity": json.dumps(weights_identity(model, exclude=names))}
    save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(path), metadata=meta)
    return path


def load_trained(model: nn.Module, path: str | Path) -> list[str]:
    """Loads parameters saved by ``train(save_to=...)`` into ``model`` in place.

    Args:
        model: the module the parameters were trained on (or one with the same other weights).
        path: the safetensors file.

    Returns:
        The names of the parameters loaded.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: one sentence naming the file: it is unreadable, partial or holds NaN/inf, names
            a parameter the model lacks, a shape differs, or the model's other weights are not
            the ones it was trained with (or it predates the weights hash: retrain).
    """
    from condfx.model_io import check_identity, read_state_file, weights_identity

    path = Path(path)
    if not path.is_file():
        msg = f"trained-parameter file {str(path)!r} does not exist"
        raise FileNotFoundError(msg)
    what = "trained-parameter file"
    state, meta = read_state_file(path, what)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        msg = f"{path.name} holds parameters the model lacks: {unknown[:5]}"
        raise ValueError(msg)
    for name, value in state.items():
        if params[name].shape != value.shape:
            msg = f"parameter {name!r} has shape {tuple(params[name].shape)} in the model but {tuple(value.shape)} in {path.name}"
            raise ValueError(msg)
    mine = weights_identity(model, exclude=set(state))
    check_identity(meta.get("identity"), mine, f"{what} {str(path)!r}", "retrain it")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return sorted(state)
