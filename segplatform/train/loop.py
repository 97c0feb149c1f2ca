"""The Ray Train worker loop: plain PyTorch, with every Ray touch point marked ``# [ray]``.

``train_loop_per_worker(config_dict)`` runs in each of the ``num_workers`` processes that
``segplatform.train.run`` starts. ``config_dict`` holds ``"config"`` (``TrainConfig.to_dict()``,
credentials redacted) and ``"plan"`` (``segplatform.train.plan.Plan``: the schedule, the splits'
indexes (``segplatform.data.shards``: where each row lives, no rows), the storage credentials as
an object reference, tracking).

Per iteration (one optimizer step): the worker's ``grad_accum`` micro-batches of the epoch's
global order (``segplatform.train.batches``: decoded and augmented by Ray tasks), forward under
``torch.autocast`` (bf16, or fp16 with a ``GradScaler`` on CUDA), ``total_loss`` over the model's
outputs, backward (gradients all-reduced by DDP on the last micro-batch only), the gradient norm
(clipped with ``grad_clip``), optimizer step, poly learning-rate step.

Failures that are not faults end the run at once and are not retried: a micro-batch that cannot
be decoded (``DatasetError``), a non-finite gradient norm (a NaN or infinite loss on any rank
reaches every rank through DDP's all-reduce; fp16's ``GradScaler`` skips such steps itself), or a
checkpoint written under another model or schedule. Every rank sees the same condition (a
one-number all-reduce per step for the data, the all-reduced gradients for the loss), so they
stop together: rank 0 writes ``failure.json`` into the run directory, and every worker returns
normally, so Ray Train spends no ``max_failures`` retry on them (``run`` raises
``TrainingFailure`` with the message). Only infrastructure failures (a lost worker or node) are
retried from the latest checkpoint.

Every ``eval_every`` iterations and at the end: evaluation (``segplatform.train.evaluation``:
every validation row once, one all-reduced confusion matrix) and a checkpoint scored by its
``val_miou``; every ``checkpoint_every`` iterations in between, a resume-only checkpoint (scored
below any evaluation, so never "best"). A checkpoint (``segplatform.train.state``) holds the model
package, the optimizer, scheduler, scaler and RNG states and the resume fingerprint; rank 0
writes it and reports it with ``ray.train.report``. Training metrics (every ``log_every``
iterations) go to MLflow each time, and to Ray Train at most every ``REPORT_INTERVAL_S``: its
controller collects one report per worker every 2 s, and a report sent sooner waits for that,
stalling training.

Resume: ``ray.train.get_checkpoint()`` (a restarted worker group or a resubmitted run with the
same name) restores the weights (strictly) and the train state; the step counter, learning-rate
schedule, RNG states and data order continue exactly: the step alone says which batch comes next.
A new run with ``init_checkpoint`` (a sweep's PBT clone) starts from that checkpoint's weights
(strictly), with a fresh optimizer, schedule and step counter.

Placement: every worker records its rank, local rank, node id, node IP and pid; rank 0 logs them at
the start of every attempt (MLflow tag ``placement``, one line such as ``2 workers on 2 nodes:
rank 0 -> 3f2a9c01d4e5/0, ...``, tag ``placement_strategy``, and the table artifact
``placement/attempt<N>.json``), and every report carries ``worker_node_ids``, ``worker_ranks``,
``worker_local_ranks`` and ``num_nodes``. At the last step every rank's parameter checksum is
gathered: ``param_checksums`` in the final metrics, ``param_checksum_rank<r>`` in MLflow.

Progress: rank 0 prints one line per metrics report (``progress_line``: step, epoch, loss, lr,
images/s, and validation mIoU where it evaluated), which reaches the driver and ``ray job logs``;
Ray Train's own INFO log of every report is raised to WARNING (``quiet_ray_report_log``).

Fault injection (tests only): ``fail_at_step`` makes rank ``fail_rank`` call ``os._exit(1)`` when
it reaches that iteration, once per run: a marker file in the run's storage directory says that
the fault already happened.

Holding a run (tests only): with ``pause_at_step``, rank 0 finishes that step (its evaluation and
checkpoint included, committed), writes ``.paused-at-step<N>`` into the run's storage directory
(JSON: step, attempt, and every worker's node id and pid) and waits until ``.release-step<N>``
appears there; the other ranks wait for it in the next step's first collective. A test that
interrupts a run (kills its driver, a worker, a node, the storage server) waits for that marker,
an event the run signals, instead of guessing from time or progress, and knows that the run is
past that step and not yet beyond it. Once per run: a resumed run that finds the marker does not
hold again. ``pause_marker`` reads the marker and ``release_pause`` writes the release file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from segplatform.metrics import one_class_everywhere
from segplatform.train.batches import BatchSpec, TrainBatches
from segplatform.train.config import TrainConfig
from segplatform.train.distributed import (
    StopRun,
    all_gather_object,
    mean_over_workers,
    parameter_checksum,
    stop_if_any,
    unwrap,
)
from segplatform.train.evaluation import Evaluator, finite, log_evaluation
from segplatform.train.losses import SegmentationLoss, total_loss
from segplatform.train.optim import PolyLR, build_optimizer
from segplatform.train.plan import Plan, compare_fingerprints
from segplatform.train.state import (
    MODEL_DIR,
    TrainState,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    write_train_state,
)

logger = logging.getLogger(__name__)

FAULT_MARKER = ".fault-injected-rank{rank}"
PAUSE_MARKER = ".paused-at-step{step}"
RELEASE_MARKER = ".release-step{step}"
PAUSE_POLL_S = 0.2  # how often a held run looks for its release file
FAILURE_FILE = "failure.json"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMMIT_TIMEOUT_S = 120.0  # how long rank 0 waits for Ray Train to commit a checkpoint
RESUME_ONLY_SCORE = -1.0  # checkpoint_score of a checkpoint without evaluation
# Ray Train's controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and a
# worker's next report waits for the previous one: training-metric reports closer together than
# that would stall training, so they go to Ray at most this often (MLflow still gets every one).
REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) * 1.25


# ---- helpers --------------------------------------------------------------------------------


def tracking_buffer_root(run_name: str, root: str | None = None) -> Path:
    """Where this node keeps MLflow records of run ``run_name`` until they are delivered.

    ``root``, else ``SEGPLATFORM_TRACKING_BUFFER``, else ``~/.cache/segplatform/tracking``.
    """
    root = root or os.environ.get("SEGPLATFORM_TRACKING_BUFFER")
    base = Path(root) if root else Path.home() / ".cache" / "segplatform" / "tracking"
    return base / run_name


def run_file(plan: Plan, name: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(pyarrow filesystem, path)`` of a file in the run's storage directory."""
    from segplatform.data import io as dio

    fs, root = dio.resolve(plan.run_storage_uri, storage_options)
    return fs, dio.join(root, name)


def write_run_file(
    plan: Plan, name: str, text: str, storage_options: dict[str, Any] | None
) -> None:
    """Write a file into the run's storage directory, whole or not at all for a reader (an S3
    PUT is; a local file is written aside and renamed)."""
    import pyarrow.fs as pafs

    fs, path = run_file(plan, name, storage_options)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path}.{uuid.uuid4().hex[:8]}.tmp" if local else path
    with fs.open_output_stream(target) as stream:
        stream.write(text.encode())
    if local:
        fs.move(target, path)


def maybe_inject_fault(
    cfg: TrainConfig, plan: Plan, rank: int, step: int, storage: dict[str, Any] | None
) -> None:
    """TEST KNOB: exit this worker process at ``cfg.fail_at_step`` the first time only."""
    if cfg.fail_at_step is None or step != cfg.fail_at_step or rank != cfg.fail_rank:
        return
    import pyarrow.fs as pafs

    marker = FAULT_MARKER.format(rank=rank)
    fs, path = run_file(plan, marker, storage)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return
    write_run_file(plan, marker, f"fault injected at step {step}\n", storage)
    logger.warning("fault injection: rank %d exits at step %d", rank, step)
    os._exit(1)


def maybe_pause(
    cfg: TrainConfig,
    plan: Plan,
    rank: int,
    step: int,
    storage: dict[str, Any] | None,
    workers: list[dict[str, Any]],
    attempt: int,
) -> None:
    """TEST KNOB: rank 0 holds the run after ``cfg.pause_at_step`` until released, once per run
    (module docstring)."""
    if cfg.pause_at_step is None or step != cfg.pause_at_step or rank != 0:
        return
    import pyarrow.fs as pafs

    fs, marker = run_file(plan, PAUSE_MARKER.format(step=step), storage)
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return  # held once already (this is a resumed run)
    record = {"step": step, "attempt": attempt, "workers": workers}
    write_run_file(plan, PAUSE_MARKER.format(step=step), json.dumps(record), storage)
    say(f"{cfg.name} held after step {step} (pause_at_step) until released")
    _, release = run_file(plan, RELEASE_MARKER.format(step=step), storage)
    while True:
        try:
            if fs.get_file_info(release).type != pafs.FileType.NotFound:
                break
        except OSError:  # the storage is away (a test may be restarting it): look again
            pass
        time.sleep(PAUSE_POLL_S)
    say(f"{cfg.name} released at step {step}")


def pause_marker(
    run_uri: str, step: int, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The marker a run held by ``pause_at_step`` wrote at ``step`` (``maybe_pause``), or None
    while there is none. ``run_uri``: the run's directory (``<storage_path>/<name>``)."""
    import pyarrow.fs as pafs

    from segplatform.data import io as dio

    fs, root = dio.resolve(run_uri, storage_options)
    path = dio.join(root, PAUSE_MARKER.format(step=step))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def release_pause(run_uri: str, step: int, storage_options: dict[str, Any] | None = None) -> None:
    """Let a run held at ``step`` by ``pause_at_step`` go on."""
    from segplatform.data import io as dio

    fs, root = dio.resolve(run_uri, storage_options)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(dio.join(root, RELEASE_MARKER.format(step=step))) as stream:
        stream.write(b"released\n")


def _persist(directory: Path, plan: Plan, dir_name: str, storage: dict[str, Any] | None) -> Any:
    """Copy a checkpoint directory to ``<run storage>/<dir_name>`` (Ray Train local mode)."""
    import pyarrow.fs as pafs
    import ray.train

    fs, target = run_file(plan, dir_name, storage)
    fs.create_dir(target, recursive=True)
    pafs.copy_files(str(directory), target, destination_filesystem=fs)
    return ray.train.Checkpoint(path=target, filesystem=fs)


def gradient_norm(parameters: list[Tensor], max_norm: float | None) -> Tensor:
    """The global L2 norm of the gradients (clipped to ``max_norm`` when given)."""
    if max_norm is not None:
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    return nn.utils.get_total_norm(grads) if grads else torch.zeros(())


# ---- the worker loop --------------------------------------------------------------------------


class Worker:
    """State of one training worker; ``train_loop_per_worker`` builds and runs it."""

    def __init__(self, config_dict: dict[str, Any]) -> None:
        import ray
        import ray.train
        import ray.train.torch

        import architectures
        from segplatform.data.format import DatasetInfo

        self.plan = plan = config_dict["plan"]
        self.storage = plan.storage_options()  # [ray] credentials from the object store
        cfg = TrainConfig.from_dict(config_dict["config"], source="train loop config")
        self.cfg = cfg = cfg.replace(storage_options=self.storage)
        context = ray.train.get_context()  # [ray] who am I in the worker group
        self.rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()  # [ray]
        self.device = ray.train.torch.get_device()  # [ray] cuda:<local> or cpu
        self.info = DatasetInfo.from_json(plan.dataset, cfg.data)
        self.ignore_index = self.info.ignore_index

        self.model_config = cfg.model_config(num_classes=plan.num_classes)
        seed_everything(cfg.seed)  # the same initial weights on every rank and in every run
        model = architectures.build_from_config(cfg.arch, self.model_config)
        self.instance = getattr(model, "task", "semantic") == "instance"
        self.in_channels = int(getattr(self.model_config, "in_channels", 3))
        # Instance models normalize inside (torchvision's transform): they take [0, 1] pixels.
        self.normalization = (
            {"mean": [0.0] * self.in_channels, "std": [1.0] * self.in_channels}
            if self.instance
            else cfg.normalization(self.in_channels)
        )
        self.recipe = cfg.inference_recipe()
        self.loss_weights = dict(model.loss_weights())
        for key, weight in (cfg.aux_weights or {}).items():
            if key not in self.loss_weights:
                raise ValueError(
                    f"TrainConfig.aux_weights: {cfg.arch} has no output {key!r} "
                    f"(its loss terms: {sorted(self.loss_weights)})"
                )
            self.loss_weights[key] = float(weight)

        # ---- resume ---------------------------------------------------------------------------
        self.state = TrainState()
        self.epoch = 0
        saved: dict[str, Any] | None = None
        checkpoint = ray.train.get_checkpoint()  # [ray] latest registered checkpoint, or None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:  # [ray] local copy of the checkpoint
                saved = load_checkpoint(model, Path(directory), self.device)
            self.state = TrainState.resumed(saved)
        elif cfg.init_checkpoint:  # a new run that starts from another run's weights (strict)
            from segplatform.data import io as dio

            fs, path = dio.resolve(cfg.init_checkpoint, self.storage)
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as directory:  # [ray]
                load_checkpoint(model, Path(directory), self.device)
        seed_everything(cfg.seed + 1000 * self.rank + 7919 * self.state.step)
        if saved is not None and len(saved.get("rng") or []) == self.world_size:
            set_rng_state(saved["rng"][self.rank])

        # ---- model, optimizer, schedule ---------------------------------------------------------
        if cfg.use_gpu and self.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # NHWC: convolutions run on tensor cores without layout transposes (instance models
        # take lists of images of different sizes and keep the default layout).
        self.memory_format = (
            torch.channels_last
            if cfg.resolved_channels_last() and not self.instance
            else torch.contiguous_format
        )
        model = model.to(memory_format=self.memory_format)
        self.model = ray.train.torch.prepare_model(  # [ray] to device + DDP when world_size > 1
            model,
            parallel_strategy_kwargs={"find_unused_parameters": self.instance},
        )
        self.bare = unwrap(self.model)
        self.parameters = [p for p in self.bare.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.bare, cfg)
        self.scheduler = PolyLR.from_config(self.optimizer, cfg, plan.max_iters)
        self.amp_dtype = AMP_DTYPES.get(cfg.amp) if cfg.amp else None
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=cfg.amp == "fp16" and self.device.type == "cuda"
        )
        self.resume_error: str | None = None
        if saved is not None:
            stored = json.loads(saved.get("fingerprint") or "{}")
            differences = compare_fingerprints(stored, plan.fingerprint)
            if differences:
                self.resume_error = (
                    f"checkpoint at step {self.state.step} was written under other settings: "
                    + "; ".join(differences)
                )
            else:
                self.optimizer.load_state_dict(saved["optimizer"])
                self.scheduler.load_state_dict(saved["scheduler"])
                if saved.get("scaler"):
                    self.scaler.load_state_dict(saved["scaler"])
        class_weights = plan.class_weights
        self.criterion = SegmentationLoss(
            cfg.loss,
            ignore_index=self.ignore_index,
            class_weights=(
                None
                if class_weights is None
                else torch.tensor(class_weights, dtype=torch.float32, device=self.device)
            ),
            ohem_thresh=cfg.ohem_thresh,
            ohem_min_kept=cfg.ohem_min_kept,
            dice_weight=cfg.dice_weight,
        )
        self.batches = TrainBatches(
            plan.train,
            BatchSpec.from_config(
                cfg,
                in_channels=self.in_channels,
                normalization=self.normalization,
                ignore_index=self.ignore_index,
                instances=self.instance,
            ),
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            world_size=self.world_size,
            rank=self.rank,
            tasks=cfg.loader_tasks,
            task_cpus=cfg.loader_task_cpus,
            node_id=self.node_id,
        )
        self.evaluator = Evaluator(
            plan.val,
            info=self.info,
            num_classes=plan.num_classes,
            in_channels=self.in_channels,
            normalization=self.normalization,
            recipe=self.recipe,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=cfg.eval_batch_size,
            amp_dtype=self.amp_dtype,
            overlay_count=plan.overlay_count,
        )
        self.workers = all_gather_object(  # where every worker of this attempt runs
            {
                "rank": self.rank,
                "local_rank": self.local_rank,
                "node_id": self.node_id,
                "node_ip": ray.util.get_node_ip_address(),  # [ray]
                "pid": os.getpid(),
            }
        )
        self.tracker = self._make_tracker()
        self._log_placement()

    # ---- tracking (rank 0 only, never blocking) ----------------------------------------------

    def _make_tracker(self) -> Any:
        from segplatform.tracking import RunTracker

        uri = self.plan.mlflow_uri
        if self.rank != 0 or not uri:
            return RunTracker.disabled()
        root = self.plan.tracking_buffer
        buffer = tracking_buffer_root(self.cfg.name, root) / f"worker-{uuid.uuid4().hex[:8]}"
        try:
            tracker = RunTracker(
                uri,
                self.cfg.experiment,
                self.cfg.name,
                buffer_dir=buffer,
                run_key=self.cfg.name,
                tags=self.plan.tags,
            )
        except Exception as err:  # tracking must never stop training
            logger.warning("MLflow tracking disabled: %s", err)
            return RunTracker.disabled()
        if self.state.attempt == 1:
            import architectures

            params = {f"train.{k}": v for k, v in self.cfg.to_dict().items()}  # redacted
            params.update(
                {
                    f"model.{k}": v
                    for k, v in architectures.config_to_dict(self.model_config).items()
                },
            )
            params.update(
                {
                    "plan.max_iters": self.plan.max_iters,
                    "plan.iters_per_epoch": self.plan.iters_per_epoch,
                    "plan.total_batch": self.cfg.batch_size * self.cfg.grad_accum * self.world_size,
                    "plan.world_size": self.world_size,
                    "plan.optimizer": self.cfg.optimizer_settings(),
                }
            )
            tracker.log_params(params)
        return tracker

    def _log_placement(self) -> None:
        """Rank 0: where this attempt's workers run (printed, MLflow tags and table)."""
        from segplatform.train.placement import placement_summary, placement_table

        if self.rank != 0:
            return
        summary = placement_summary(self.workers)
        say(f"{self.cfg.name} attempt {self.state.attempt}: {summary}")
        self.tracker.set_tags(
            {"placement": summary, "placement_strategy": self.cfg.placement_strategy}
        )
        self.tracker.log_table(
            placement_table(self.workers),
            f"attempt{self.state.attempt}.json",
            artifact_path="placement",
        )

    # ---- training -----------------------------------------------------------------------------

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images = batch["image"]  # (N, C, h, w)
        if self.instance:
            from segplatform.detection import targets_from_masks

            targets = []
            for i in range(images.shape[0]):
                instances = batch["instances"][i]
                targets.append(
                    {
                        k: v.to(self.device)
                        for k, v in targets_from_masks(
                            batch["mask"][i].cpu(),
                            None if int(instances.min()) < 0 else instances.cpu(),
                            ignore_index=self.ignore_index,
                        ).items()
                    }
                )
            losses = self.model(list(images), targets)  # torchvision detection loss dict
            total = sum(self.loss_weights.get(k, 1.0) * v for k, v in losses.items())
            return total, {k: float(v.detach()) for k, v in losses.items()}
        images = images.contiguous(memory_format=self.memory_format)
        outputs = self.model(images)  # {"out": (N, K, h, w), aux...}
        return total_loss(
            outputs,
            batch["mask"],
            self.loss_weights,
            self.criterion,
            pixel_weights=batch.get("weight"),
        )

    def _next_micro_batches(self, loader: Any) -> tuple[int, list[dict[str, Tensor]]]:
        """This step's micro-batches; ``StopRun`` on every rank when any rank's data is bad."""
        from segplatform.data.format import DatasetError

        batches, epoch, problem = [], 0, None
        try:
            for _ in range(self.cfg.grad_accum):
                _, epoch, _, batch = next(loader)
                batches.append(batch)
        except DatasetError as err:
            problem = f"step {self.state.step + 1}: {err}"
        # One number over all ranks: whether anyone's data failed (before any collective of the
        # forward/backward pass, so no rank waits in DDP for one that stopped).
        stop_if_any(problem, "bad data", self.device)
        return epoch, batches

    def _diverged(self, grad_norm: float, losses: dict[str, float]) -> StopRun:
        per_rank = all_gather_object(losses)
        described = "; ".join(
            f"rank {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
            for r, terms in enumerate(per_rank)
        )
        return StopRun(
            "diverged",
            f"loss is not finite at step {self.state.step + 1} (gradient norm {grad_norm}; "
            f"{described}): lower the learning rate (--lr), clip gradients (--clip-grad-norm) "
            f"or use the from-scratch recipe (lr {self.cfg.lr:g}, {self.cfg.optimizer})",
        )

    def fit(self) -> None:
        import ray.train

        cfg, plan, state = self.cfg, self.plan, self.state
        if self.resume_error:
            raise StopRun("resume mismatch", self.resume_error)
        accum = cfg.grad_accum
        loader = self.batches(state.step, self.device, stop_step=plan.max_iters)
        self.model.train()
        running: dict[str, float] = {}
        running_count = 0
        images_seen = 0
        window_start = time.monotonic()
        last_report = time.monotonic()
        is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        while state.step < plan.max_iters:
            self.epoch, micro_batches = self._next_micro_batches(loader)
            self.optimizer.zero_grad(set_to_none=True)
            step_losses: dict[str, float] = {}
            for micro, batch in enumerate(micro_batches):
                last_micro = micro == accum - 1
                # Gradients are all-reduced on the last micro-batch only.
                sync = (
                    self.model.no_sync() if is_ddp and not last_micro else contextlib.nullcontext()
                )
                with sync:
                    with torch.autocast(
                        self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                    ):
                        loss, terms = self._loss(batch)
                    self.scaler.scale(loss / accum).backward()
                value = float(loss.detach())
                step_losses = {"loss": value, **terms}
                running["loss"] = running.get("loss", 0.0) + value
                for key, term in terms.items():
                    running[f"loss_{key}"] = running.get(f"loss_{key}", 0.0) + term
                running_count += 1
                images_seen += batch["image"].shape[0]
            if self.scaler.is_enabled() or cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = float(gradient_norm(self.parameters, cfg.grad_clip))
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                # DDP gave every rank the same gradients: every rank stops here.
                raise self._diverged(grad_norm, step_losses)
            running["grad_norm"] = running.get("grad_norm", 0.0) + grad_norm * accum
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            state.step += 1
            maybe_inject_fault(cfg, plan, self.rank, state.step, self.storage)

            metrics: dict[str, Any] = {}
            report_due = False
            if state.step % cfg.log_every == 0 or state.step == plan.max_iters:
                keys = sorted(running)
                means = mean_over_workers(
                    [running[k] / max(running_count, 1) for k in keys]
                    + [time.monotonic() - last_report],
                    self.device,
                )
                # The mean over workers: every worker takes the same decision.
                report_due = means.pop() >= REPORT_INTERVAL_S
                elapsed = max(time.monotonic() - window_start, 1e-9)
                metrics.update(dict(zip(keys, means)))
                metrics["images_per_s"] = images_seen * self.world_size / elapsed
                running, running_count, images_seen = {}, 0, 0
                window_start = time.monotonic()
            metrics.update(self._progress())
            evaluate = state.step % plan.eval_every == 0 or state.step == plan.max_iters
            checkpoint = bool(plan.checkpoint_every) and state.step % plan.checkpoint_every == 0
            if evaluate or checkpoint:
                if evaluate:
                    self._evaluate_and_checkpoint(metrics)
                else:
                    self.tracker.log_metrics(metrics, step=state.step)
                    self._checkpoint(metrics, score=RESUME_ONLY_SCORE)
                # Images per second count training only.
                last_report = window_start = time.monotonic()
                images_seen = 0
            elif "loss" in metrics:
                self.tracker.log_metrics(metrics, step=state.step)
                if report_due:
                    ray.train.report(metrics)  # [ray] training metrics (every worker calls it)
                    last_report = time.monotonic()
            if self.rank == 0 and ("loss" in metrics or "val_miou" in metrics):
                say(progress_line(cfg.name, plan.max_iters, metrics, self.info.classes))
            maybe_pause(cfg, plan, self.rank, state.step, self.storage, self.workers, state.attempt)
        self._log_reads()
        self.tracker.finish("FINISHED")

    def _log_reads(self) -> None:
        """Rank 0: which nodes read this attempt's training rows from the dataset, and how much
        (printed and an MLflow tag ``data_reads``: node id -> [row groups, bytes])."""
        per_node: dict[str, list[int]] = {}
        for reads in all_gather_object(self.batches.reads):
            for node, (groups, read) in reads.items():
                total = per_node.setdefault(node or self.node_id or "local", [0, 0])
                total[0] += groups
                total[1] += read
        if self.rank != 0:
            return
        say(reads_line(self.cfg.name, self.cfg.data, per_node))
        self.tracker.set_tags({"data_reads": json.dumps(per_node, sort_keys=True)})

    def _progress(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "epoch": self.epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "attempt": self.state.attempt,
            "start_step": self.state.start_step,
            "world_size": self.world_size,
            "worker_ranks": [w["rank"] for w in self.workers],
            "worker_local_ranks": [w["local_rank"] for w in self.workers],
            "worker_node_ids": [w["node_id"] for w in self.workers],
            "num_nodes": len({w["node_id"] for w in self.workers}),
        }

    def _evaluate_and_checkpoint(self, metrics: dict[str, Any]) -> None:
        state = self.state
        result, matrix, overlays = self.evaluator(self.bare)
        metrics.update(
            {
                "val_miou": finite(result["miou"], 0.0),
                "val_pixel_acc": finite(result["pixel_acc"], 0.0),
                "val_mean_acc": finite(result["mean_acc"], 0.0),
                "val_fwiou": finite(result["fwiou"], 0.0),
            }
        )
        for name, value in zip(self.info.classes, result["iou"]):
            metrics[f"val_iou_{_metric_name(name)}"] = finite(value)
        metrics["val_top_class_frac"] = finite(max(result["predicted_frac"]), 0.0)
        only = one_class_everywhere(result)
        if only is not None:
            metrics["val_one_class"] = only  # the class it predicts everywhere (progress line)
        if math.isnan(state.best_miou) or metrics["val_miou"] > state.best_miou:
            state.best_miou = metrics["val_miou"]
        metrics["best_val_miou"] = state.best_miou
        if state.step >= self.plan.max_iters:
            checksums = all_gather_object(parameter_checksum(self.bare))
            metrics["param_checksums"] = checksums
            metrics["param_checksum"] = checksums[self.rank]
            # One number per rank, so that MLflow (numbers only) keeps them all.
            metrics.update({f"param_checksum_rank{r}": value for r, value in enumerate(checksums)})
        self.tracker.log_metrics(metrics, step=state.step)
        if self.rank == 0:
            log_evaluation(self.tracker, state.step, self.info, result, matrix, overlays)
        self._checkpoint(metrics, score=metrics["val_miou"])

    def _checkpoint(self, metrics: dict[str, Any], *, score: float) -> None:
        """Write a checkpoint (rank 0) and report it with ``metrics`` (every rank)."""
        import ray.train

        from segplatform.package import save_package

        state, plan = self.state, self.plan
        metrics["checkpoint_score"] = score
        rngs = all_gather_object(rng_state())
        dir_name = f"checkpoint_step{state.step:08d}_{uuid.uuid4().hex[:6]}"
        with tempfile.TemporaryDirectory(prefix="segplatform-ckpt-") as directory:
            checkpoint = None
            if self.rank == 0:
                save_package(
                    Path(directory) / MODEL_DIR,
                    self.bare,
                    self.cfg.arch,
                    self.model_config,
                    classes=self.info.classes,
                    palette=self.info.palette,
                    ignore_index=self.ignore_index,
                    normalization=self.normalization,
                    inference=self.recipe.to_dict(),
                    metrics={k: v for k, v in metrics.items() if k.startswith("val_")},
                    extra={
                        "run_name": self.cfg.name,
                        "step": state.step,
                        "dataset": self.cfg.data,
                        "dataset_name": self.info.name,
                        "manifest_version": self.info.version,
                        "dataset_revision": self.info.revision,
                    },
                )
                write_train_state(
                    Path(directory),
                    state,
                    world_size=self.world_size,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    scaler=self.scaler,
                    rngs=rngs,
                    fingerprint=plan.fingerprint,
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)  # [ray]
                if plan.local_mode:  # local mode keeps no checkpoint: persist it here
                    checkpoint = _persist(Path(directory), plan, dir_name, self.storage)
            ray.train.report(  # [ray] metrics + checkpoint (rank 0 uploads it to storage)
                metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name
            )
        if self.rank == 0 and not plan.local_mode:
            # [ray] Wait until Ray Train has committed the checkpoint, so that a failure right
            # after this point resumes from it rather than from the one before.
            try:
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                    timeout_s=COMMIT_TIMEOUT_S,
                )
            except Exception as err:  # the run goes on; a resume may start one checkpoint earlier
                logger.warning("checkpoint at step %d not confirmed: %s", state.step, err)

    def stop(self, stop: StopRun) -> None:
        """End the run on a failure that is not a fault (module docstring); every rank calls it."""
        if self.rank == 0:
            record = {"kind": stop.kind, "step": self.state.step, "message": str(stop)}
            write_run_file(self.plan, FAILURE_FILE, json.dumps(record), self.storage)
            say(f"{self.cfg.name} stopped ({stop.kind}): {stop}")
            self.tracker.set_tags({"failure": f"{stop.kind}: {stop}"[:5000]})
        self.tracker.finish("FAILED", timeout=30.0)


def progress_line(
    name: str, max_iters: int, metrics: dict[str, Any], classes: Sequence[str] = ()
) -> str:
    """One line of training progress for the job log, e.g. ``unet-x step 40/400 epoch 2
    loss 0.5312 lr 0.00941 25.3 img/s val mIoU 0.4123 (best 0.4123)``; an evaluation whose
    predictions are one class says so: ``... (best 0.0849), predicts background everywhere``."""
    parts = [f"{name} step {metrics['step']}/{max_iters} epoch {metrics['epoch']}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f} lr {metrics['lr']:.3g}")
        parts.append(f"{metrics['images_per_s']:.1f} img/s")
    if "val_miou" in metrics:
        parts.append(f"val mIoU {metrics['val_miou']:.4f} (best {metrics['best_val_miou']:.4f})")
        if "val_one_class" in metrics:
            parts[-1] += f", predicts {class_name(classes, metrics['val_one_class'])} everywhere"
    return " ".join(parts)


def reads_line(name: str, data: str, per_node: Mapping[str, Sequence[int]]) -> str:
    """``NAME data: training rows read from DATA where they were decoded: node ID G row groups
    (M MB), ...`` (node ids shortened to 8 characters; a cache hit reads nothing)."""
    parts = [
        f"node {node[:8]} {groups} row group(s) ({read / 1e6:.1f} MB)"
        for node, (groups, read) in sorted(per_node.items())
    ]
    return f"{name} data: training rows read from {data} where they were decoded: " + (
        ", ".join(parts) or "nothing (every row group was in the decoding processes' caches)"
    )


def class_name(classes: Sequence[str], index: Any) -> str:
    """``classes[index]``, or ``class INDEX`` where the names do not reach it."""
    index = int(index)
    return classes[index] if 0 <= index < len(classes) else f"class {index}"


def say(line: str) -> None:
    """Print one line to the process's real stdout, once. (In a Ray Train worker a plain
    ``print`` goes both to the wrapped ``sys.stdout`` and, through Ray Train's patched print, to
    the console log handler: every line would show twice.)"""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def quiet_ray_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` of every worker, the whole metrics dict, at
    INFO; rank 0's ``progress_line`` says what matters, so that log is raised to WARNING."""
    try:
        from ray.train.v2._internal.execution import context  # its logger is named by __file__

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception as err:  # a private module: a newer Ray may move it
        logger.debug("Ray Train report log left as it is: %s", err)


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    quiet_ray_report_log()
    if not config_dict["config"].get("verbose"):
        # MLflow's database set-up notices (read when mlflow is first imported, below).
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    worker = Worker(config_dict)
    try:
        worker.fit()
    except StopRun as stop:
        worker.stop(stop)  # returns normally: not a fault, nothing to retry
    except BaseException:
        worker.tracker.finish("FAILED", timeout=10.0)
        raise


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
