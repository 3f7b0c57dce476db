"""One ``Trainer`` subclass for every stage, importable and subclassable (sentence-transformers'
``SentenceTransformerTrainer`` is the model)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback

from ..compilation import CompilerUnavailableError, compiler_unavailable_reason
from .arguments import check_max_wall_seconds
from .lora_graph import training_compile_settings
from .losses import MNTPModel

logger = logging.getLogger(__name__)


class LLM2VecTrainer(Trainer):
    """``Trainer`` with a loss module and a batch sampler.

    - ``loss``: a module called as ``loss(model, inputs)`` (e.g. :class:`~llm2vec_fast.training.losses.InfoNCELoss`,
      :class:`~llm2vec_fast.training.losses.CachedInfoNCELoss`); without one, the model computes its own loss
      (:class:`~llm2vec_fast.training.losses.MNTPModel`).
    - ``batch_sampler``: makes the training batches (e.g.
      :class:`~llm2vec_fast.training.samplers.OneDatasetBatchSampler`); accelerate then deals them to the
      processes in turn.

    An :class:`~llm2vec_fast.training.losses.MNTPModel` is saved and resumed as its PEFT body's adapter.

    ``torch_compile`` (``TrainingArguments``' own, with ``torch_compile_backend`` / ``torch_compile_mode``): the
    Trainer has accelerate compile the model it trains (``torch.compile(model)``, shapes dynamic after the first
    recompile): for MNTP the :class:`~llm2vec_fast.training.losses.MNTPModel` with our loss op inside, for the
    contrastive stages the encoder, whose forward every chunk calls (GradCache's loop and hooks stay eager).
    Where the backend cannot generate code here (no C++ compiler on CPU, no Triton on CUDA) this raises
    :class:`~llm2vec_fast.compilation.CompilerUnavailableError` before anything is built; the first steps' times
    (compilation included) are logged. The training and evaluation steps run under
    :func:`~llm2vec_fast.training.lora_graph.training_compile_settings`: float attributes traced as constants
    and, with inductor on CPU, peft's LoRA linears fused into one op each."""

    def __init__(self, *args, loss: torch.nn.Module | None = None, batch_sampler=None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            check_torch_compile(training_args)
        super().__init__(*args, **kwargs)
        if self.args.torch_compile:
            self.add_callback(CompileTimeCallback())
        self.loss = loss
        self.batch_sampler = batch_sampler
        # The losses are per-batch means; without this the Trainer would count labelled tokens (and all-gather
        # the count under DDP) on every step for nothing.
        self.model_accepts_loss_kwargs = False

    def _compile_settings(self):
        return training_compile_settings() if self.args.torch_compile else contextlib.nullcontext()

    def training_step(self, *args, **kwargs):
        with self._compile_settings():  # around the backward too: GradCache's re-encoding calls the model there
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with self._compile_settings():
            return super().prediction_step(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs) if self.loss is None else {"loss": self.loss(model, inputs)}
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def get_train_dataloader(self):
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def _save(self, output_dir: str | None = None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, MNTPModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        if isinstance(unwrapped, MNTPModel):
            model = unwrapped.body
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)


PROGRESS_FILE = "training_progress.json"


class WallClockGuard(TrainerCallback):
    """Stops training cleanly after ``max_wall_seconds`` of the training loop (from ``on_train_begin``: model
    loading and data preparation are not counted): after the step that passes the limit, the Trainer leaves
    its loop as at ``max_steps`` and the stage saves its adapter as usual. ``stopped_at`` is the step it
    stopped after (None when the run finished its steps in time)."""

    def __init__(self, max_wall_seconds: float):
        check_max_wall_seconds(max_wall_seconds)
        if max_wall_seconds is None:
            raise ValueError("WallClockGuard needs max_wall_seconds; for no limit add no guard "
                             "(add_wall_clock_guard adds none for None)")
        self.max_wall_seconds = float(max_wall_seconds)
        self.started: float | None = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.stopped_at = time.monotonic(), None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and time.monotonic() - self.started >= self.max_wall_seconds:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            logger.warning("max_wall_seconds %g reached after step %d of %d: stopping here and saving",
                           self.max_wall_seconds, state.global_step, state.max_steps)
        return control


def add_wall_clock_guard(trainer: Trainer, max_wall_seconds: float | None) -> WallClockGuard | None:
    if max_wall_seconds is None:
        return None
    guard = WallClockGuard(max_wall_seconds)
    trainer.add_callback(guard)
    return guard


_COMPILE_CHECKED = "_llm2vec_fast_compile_checked"  # set on TrainingArguments once their backend was checked


def check_torch_compile(training_args) -> None:
    """Raise :class:`~llm2vec_fast.compilation.CompilerUnavailableError`, saying why and what to do, where
    ``torch_compile`` is set but its backend cannot generate code on the training device.

    Checked once per ``training_args`` (device and backend): the stages check before any data or model is
    loaded, and :class:`LLM2VecTrainer` (for callers that build it themselves) does not probe the compiler
    again for the same arguments."""
    if not training_args.torch_compile:
        return
    backend = training_args.torch_compile_backend or "inductor"
    key = (str(training_args.device), backend)
    if getattr(training_args, _COMPILE_CHECKED, None) == key:
        return
    reason = compiler_unavailable_reason(training_args.device, backend)
    if reason is not None:
        raise CompilerUnavailableError(
            f"torch_compile is set but torch.compile(backend={backend!r}) cannot work here: {reason}. Train without "
            "it (torch_compile false) or with torch_compile_backend aot_eager (no code generation)")
    object.__setattr__(training_args, _COMPILE_CHECKED, key)  # not a field: to_dict and saved settings skip it


class CompileTimeCallback(TrainerCallback):
    """Logs how long each of the first ``steps`` optimizer steps took and how many graphs torch.compile has
    compiled so far: the first step's time is mostly compilation (and a new batch shape recompiles once more,
    with dynamic shapes), so that it is shown, not hidden in the first logged loss."""

    def __init__(self, steps: int = 3):
        self.steps, self._start = steps, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step < self.steps:
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        self._start = None
        from torch._dynamo.utils import counters

        logger.info("torch_compile: step %d took %.1f s (%d graphs compiled so far%s)", state.global_step, seconds,
                    counters["stats"]["unique_graphs"],
                    ", compilation included" if state.global_step == 1 else "")


@dataclass
class TrainingRun:
    output_dir: str
    log_history: list[dict[str, Any]]
    trainer: LLM2VecTrainer


def run_training(trainer: LLM2VecTrainer, stage: str, arguments: Sequence[Any]) -> TrainingRun:
    """Train (resuming when ``resume_from_checkpoint`` is a checkpoint, or ``true`` for the latest in
    output_dir), save the adapter, the tokenizer, ``trainer_state.json``, ``<stage>_settings.json`` (every
    setting the run used, flat as the config takes them) and ``training_progress.json`` (steps done of
    planned, whether a :class:`WallClockGuard` stopped the run, the training loop's seconds)."""
    args = trainer.args
    resume = args.resume_from_checkpoint
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    seconds = time.monotonic() - started
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json, with the loss history
    if args.should_save:
        settings = {}
        for part in arguments:
            settings.update(part.to_dict() if hasattr(part, "to_dict") else dataclasses.asdict(part))
        Path(args.output_dir, f"{stage}_settings.json").write_text(json.dumps(settings, indent=2, default=str))
        guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, WallClockGuard)), None)
        progress = {"steps_done": trainer.state.global_step, "steps_planned": trainer.state.max_steps,
                    "stopped_by_wall_clock": guard is not None and guard.stopped_at is not None,
                    "max_wall_seconds": None if guard is None else guard.max_wall_seconds,
                    "train_seconds": round(seconds, 1)}
        Path(args.output_dir, PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
    logger.info("Saved the %s adapter and tokenizer to %s", stage, args.output_dir)
    return TrainingRun(output_dir=args.output_dir, log_history=list(trainer.state.log_history), trainer=trainer)
