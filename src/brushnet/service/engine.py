"""The serving engine: owns the loaded methods, a bounded job queue and one worker thread per device.

Usable without HTTP::

    engine = Engine({"brushnet": load_method("brushnet", paths)}, Limits(max_queue=8))
    job = engine.submit("brushnet", image, mask, InpaintRequest(prompt="a cat", seed=1))
    job.wait(60)
    job.result.images[0].save("out.png")

Each device has exactly one worker running one job at a time (the device's lock), so two methods on the
same GPU never run together and results are the same as a direct :func:`~brushnet.methods.inpaint` call
with the same seed.

**What the job timeout guarantees.** A denoising step cannot be interrupted inside PyTorch, so the limit is
enforced in two parts: at ``job_timeout_s`` after a job started, a watchdog marks it failed ("timed out"), and
every client waiting for it gets that answer at once; the worker stops the job at its next safe point (the
next denoising step) and drops its result. Until then the device stays busy (``/health`` counts it as running)
and queued jobs wait. So a job's *answer* never comes later than its limit (to within the watchdog's wake-up,
milliseconds), while the device time a job takes is its limit plus at most one step, or plus what runs outside
the steps (text encoding before the first, decoding and paste-back after the last). Cancelling a running job
takes effect at its next step, or, cancelled after its last step, when it ends (it ends cancelled, without a
result); a queued job is cancelled at once and leaves the queue.

Finished jobs are kept for ``result_ttl_s``, at most ``max_history`` of them, and at most
``max_result_bytes`` of result pixels (least recently used go first); a request whose images alone would
exceed that is refused (413) before it is queued.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..errors import GenerationError, InputError, RequestError
from ..methods.api import prepare, run
from ..methods.base import InpaintMethod, InpaintRequest, InpaintResult, PreparedJob
from ..methods.processing import crop_padding_for, plan_region

logger = logging.getLogger(__name__)

__all__ = [
    "Limits",
    "Job",
    "JobState",
    "Engine",
    "ServiceError",
    "InvalidInput",
    "SchemaError",
    "TooLarge",
    "QueueFull",
    "UnknownJob",
    "JobConflict",
    "Forbidden",
]


class Limits(BaseModel):
    """Service limits; shared by the engine (pixels, queue, timeout, history) and the API (bytes)."""

    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int = Field(20 * 2**20, ge=1, description="Largest request body / uploaded file.")
    max_pixels: int = Field(4096 * 4096, ge=1, description="Largest image, width x height.")
    max_queue: int = Field(32, ge=1, description="Most jobs waiting (not running); more answer 429.")
    job_timeout_s: float = Field(600.0, gt=0, description="Longest a job may run once started.")
    max_history: int = Field(100, ge=1, description="Finished jobs kept in memory (least recently used go).")
    max_result_bytes: int = Field(
        2 * 2**30,
        ge=1,
        description="Result pixels kept in memory, bytes (least recently used jobs go first); a request whose "
        "images alone exceed it is refused.",
    )
    result_ttl_s: float = Field(
        3600.0, gt=0, description="Finished jobs are dropped this long after finishing."
    )


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status the API answers with."""

    status = 400


class InvalidInput(ServiceError):
    status = 400


class SchemaError(ServiceError):
    status = 422


class TooLarge(ServiceError):
    status = 413


class QueueFull(ServiceError):
    status = 429


class UnknownJob(ServiceError):
    status = 404


class JobConflict(ServiceError):
    status = 409


class Forbidden(ServiceError):
    status = 403


def _result_bytes(job: Job) -> int:
    """Bytes of a finished job's result images in memory."""
    if job.result is None:
        return 0
    return sum(image.width * image.height * len(image.getbands()) for image in job.result.images)


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINISHED = frozenset({DONE, FAILED, CANCELLED})


class _Stop(Exception):
    """Raised inside ``on_step`` to stop a running job (timeout or cancel)."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state
        self.message = message


@dataclass(eq=False)
class Job:
    """One inpainting job. Read its fields freely; only the engine writes them."""

    id: str
    method: str
    request: InpaintRequest
    prepared: PreparedJob | None = field(repr=False)  # the checked inputs; released when the job finishes
    state: str = JobState.QUEUED
    step: int = 0
    total: int = 0
    error: str | None = None
    error_kind: str | None = None  # "timeout", "cancelled", "input", "generation", "internal"
    result: InpaintResult | None = field(default=None, repr=False)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = field(default=None, repr=False)  # time.monotonic() when it times out
    version: int = 0  # bumped on every change (progress or state); SSE streams watch it
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in JobState.FINISHED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done, failed or cancelled; False if ``timeout`` passed first."""
        return self._finished.wait(timeout)

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary (no images)."""
        out: dict[str, Any] = {
            "job_id": self.id,
            "state": self.state,
            "method": self.method,
            "progress": {"step": self.step, "total": self.total},
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }
        if self.result is not None:
            out["result"] = {**self.result.metadata(), "num_images": len(self.result.images)}
        return out


class _Worker:
    """One thread per device: takes the oldest queued job for its device and runs it."""

    def __init__(self, engine: Engine, device: str):
        self.engine = engine
        self.device = device
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._run, name=f"brushnet-worker-{device}", daemon=True)

    def _next(self) -> Job | None:
        cond = self.engine._cond
        with cond:
            while True:
                if self.engine._closing:
                    return None
                while self.queue:
                    job = self.queue.popleft()
                    if job.state == JobState.QUEUED:
                        job.state = JobState.RUNNING
                        job.started_at = time.time()
                        job.deadline = time.monotonic() + self.engine.limits.job_timeout_s
                        job.version += 1
                        self.current = job
                        cond.notify_all()  # the watchdog learns the new deadline
                        return job
                cond.wait()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            self.engine._execute(job)
            with self.engine._cond:
                self.current = None
                self.engine._cond.notify_all()


class Engine:
    """Owns loaded methods, the queue, the workers and the finished-job history.

    Args:
        methods: loaded methods by name (the first is the default). Jobs for methods on the same device
            share that device's single worker.
        limits: see :class:`Limits`.
    """

    def __init__(self, methods: Mapping[str, InpaintMethod], limits: Limits | None = None):
        if not methods:
            raise ValueError("the engine needs at least one loaded method")
        self.methods = dict(methods)
        self.limits = limits or Limits()
        self._cond = threading.Condition()
        self._closing = False
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._workers: dict[str, _Worker] = {}
        for method in self.methods.values():
            device = str(method.device)
            if device not in self._workers:
                self._workers[device] = _Worker(self, device)
        for worker in self._workers.values():
            worker.thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="brushnet-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def default_method(self) -> str:
        return next(iter(self.methods))

    # ------------------------------------------------------------------ submit / query / cancel

    def check_image_size(self, width: int, height: int, what: str = "image") -> None:
        if width * height > self.limits.max_pixels:
            raise TooLarge(
                f"{what} is {width}x{height} = {width * height} pixels; the limit is {self.limits.max_pixels}"
            )

    def prepare(
        self,
        method: str | None,
        image: Image.Image,
        mask: Any,
        request: InpaintRequest,
        control_image: Image.Image | None = None,
    ) -> PreparedJob:
        """Check everything that can be checked before queuing (:func:`brushnet.methods.prepare`): the method is
        loaded, the request and its options fit it, the image and the working size (after ``resolution``,
        ``crop_to_mask`` and rounding) are within the pixel limit, the mask fits the image and is not empty. CPU
        work (mask grow/shrink): call it off the event loop."""
        name = method or self.default_method
        if name not in self.methods:
            raise SchemaError(f"method {name!r} is not loaded; loaded: {', '.join(self.methods)}")
        self.check_image_size(*image.size)
        result_bytes = image.width * image.height * 3 * request.num_images
        if result_bytes > self.limits.max_result_bytes:
            raise TooLarge(
                f"{request.num_images} result image(s) of {image.width}x{image.height} take {result_bytes} bytes; "
                f"the server keeps at most {self.limits.max_result_bytes}"
            )
        loaded = self.methods[name]
        if control_image is not None and not loaded.accepts_control_image:
            raise InvalidInput(
                f"method {name!r} takes no control image here (brushnet with a guide ControlNet does: serve "
                "--guide-controlnet)"
            )
        if control_image is None and loaded.accepts_control_image:
            raise InvalidInput(f"method {name!r} runs a guide ControlNet here: send a control_image")
        try:
            job = prepare(
                loaded, image, mask, request, max_pixels=self.limits.max_pixels, control_image=control_image
            )
        except RequestError as exc:
            raise SchemaError(str(exc)) from None
        except InputError as exc:
            raise InvalidInput(str(exc)) from None
        if job.transparent is not None and result_bytes * 4 // 3 > self.limits.max_result_bytes:
            # a transparent input gives RGBA results: 4 bytes a pixel, which the history counts
            raise TooLarge(
                f"{request.num_images} RGBA result image(s) of {image.width}x{image.height} (the input has "
                f"transparent pixels) take {result_bytes * 4 // 3} bytes; the server keeps at most "
                f"{self.limits.max_result_bytes}"
            )
        # the size the model works at (what run() plans) is held to the limit too: resolution can ask for more
        request = job.request
        plan = plan_region(
            job.hole,
            request.crop_to_mask,
            crop_padding_for(request),
            request.resolution,
            loaded.native_resolution,
            multiple=loaded.size_multiple,
        )
        width, height = plan.size
        # the image itself was held to the limit; its rounding up to the model's multiple is not counted
        if width * height > self.limits.max_pixels and (
            request.resolution is not None or request.crop_to_mask
        ):
            if request.resolution is not None:
                reason = f"resolution {request.resolution}"
            else:
                reason = f"crop_to_mask at the model's native resolution {loaded.native_resolution}"
            raise TooLarge(
                f"working size {width}x{height} = {width * height} pixels ({reason}); the limit is "
                f"{self.limits.max_pixels}: ask for a lower resolution"
            )
        return job

    def submit(
        self,
        method: str | None,
        image: Image.Image,
        mask: Any,
        request: InpaintRequest | None = None,
        control_image: Image.Image | None = None,
    ) -> Job:
        """Prepare and queue a job. Raises a :class:`ServiceError` subclass for a refused request."""
        prepared = self.prepare(method, image, mask, request or InpaintRequest(), control_image)
        return self.enqueue(prepared)

    def enqueue(self, prepared: PreparedJob) -> Job:
        """Queue a prepared job (see :meth:`prepare`). Raises :class:`QueueFull` when the queue is full."""
        job = Job(
            id=uuid.uuid4().hex,
            method=prepared.method,
            request=prepared.request,
            prepared=prepared,
            total=prepared.request.steps,
        )
        worker = self._workers[str(self.methods[prepared.method].device)]
        with self._cond:
            if self._closing:
                raise ServiceError("the engine is shutting down")
            if self.queued_count() >= self.limits.max_queue:
                raise QueueFull(f"queue is full ({self.limits.max_queue} jobs waiting); retry later")
            self._jobs[job.id] = job
            worker.queue.append(job)
            self._trim_history()
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self._cond:
            self._trim_history()
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJob(f"no job {job_id!r} (unknown, or dropped from the history)")
            self._jobs.move_to_end(job_id)
            return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop at its next step."""
        with self._cond:
            job = self.get(job_id)
            if job.finished:
                raise JobConflict(f"job {job_id} is already {job.state}")
            job._cancel.set()
            if job.state == JobState.QUEUED:
                for worker in self._workers.values():  # out of the queue now, not when a worker reaches it
                    if job in worker.queue:
                        worker.queue.remove(job)
                self._finish(job, JobState.CANCELLED, "cancelled before it started", "cancelled")
            return job

    def queued_count(self) -> int:
        with self._cond:
            return sum(job.state == JobState.QUEUED for w in self._workers.values() for job in w.queue)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "queued": self.queued_count(),
                "running": sum(w.current is not None for w in self._workers.values()),
                "jobs_in_memory": len(self._jobs),
                "workers": sorted(self._workers),
            }

    def close(self, timeout: float = 10.0) -> None:
        """Cancel queued jobs, stop the running ones at their next step, and join the workers."""
        self.stop_jobs()
        for worker in self._workers.values():
            worker.thread.join(timeout)
        self._watchdog.join(timeout)

    def stop_jobs(self) -> None:
        """The first half of :meth:`close`, without waiting: take no new job, cancel the queued ones, ask the
        running ones to stop at their next step. A server calls it when shutdown begins, so that the requests
        waiting for those jobs are answered and its graceful shutdown does not wait for them."""
        with self._cond:
            self._closing = True
            for worker in self._workers.values():
                for job in worker.queue:
                    if job.state == JobState.QUEUED:
                        self._finish(job, JobState.CANCELLED, "server shutting down", "cancelled")
                if worker.current is not None:
                    worker.current._cancel.set()
            self._cond.notify_all()

    # ------------------------------------------------------------------ running

    def _watch(self) -> None:
        """Fail every running job at its deadline, at once, whatever its worker is doing (see the module
        docstring); the worker stops it at its next step."""
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                waits = []
                for worker in self._workers.values():
                    job = worker.current
                    if job is None or job.finished or job.deadline is None:
                        continue
                    if now >= job.deadline:
                        job._cancel.set()
                        self._finish(
                            job,
                            JobState.FAILED,
                            f"timed out after {self.limits.job_timeout_s:g} s (at step {job.step}/{job.total})",
                            "timeout",
                        )
                    else:
                        waits.append(job.deadline - now)
                self._cond.wait(min(waits) if waits else None)

    def _finish(self, job: Job, state: str, error: str | None = None, kind: str | None = None) -> None:
        # caller holds self._cond; the state last, as readers that do not take the lock look at it first
        job.error = error
        job.error_kind = kind
        job.finished_at = time.time()
        job.state = state
        job.prepared = None  # inputs are not needed any more; keep only the result
        if job.id in self._jobs:
            self._jobs.move_to_end(job.id)  # just finished: the last to be dropped for space
        job.version += 1
        job._finished.set()
        self._trim_history()
        self._cond.notify_all()

    def _trim_history(self) -> None:
        # caller holds self._cond; drops expired finished jobs, then the least recently used over the count,
        # then the least recently used until the kept result images fit max_result_bytes
        expired_before = time.time() - self.limits.result_ttl_s
        for jid in [j.id for j in self._jobs.values() if j.finished and j.finished_at < expired_before]:
            del self._jobs[jid]
        finished = [jid for jid, job in self._jobs.items() if job.finished]
        for jid in finished[: max(0, len(finished) - self.limits.max_history)]:
            del self._jobs[jid]
        sizes = {jid: _result_bytes(job) for jid, job in self._jobs.items() if job.finished}
        total = sum(sizes.values())
        for jid, size in sizes.items():  # least recently used first
            if total <= self.limits.max_result_bytes:
                break
            del self._jobs[jid]
            total -= size

    def _finish_unless_finished(
        self, job: Job, state: str, error: str | None = None, kind: str | None = None
    ):
        # the watchdog may have failed the job (timeout) while its last step ran: that answer stands
        with self._cond:
            if not job.finished:
                self._finish(job, state, error, kind)

    def _execute(self, job: Job) -> None:
        deadline = job.deadline if job.deadline is not None else time.monotonic() + self.limits.job_timeout_s

        def on_step(step: int, total: int) -> None:
            if job.finished:  # failed by the watchdog: stop here, at the first safe point
                raise _Stop(job.state, job.error or job.state)
            job.step, job.total = step, total
            job.version += 1
            if job._cancel.is_set():
                raise _Stop(JobState.CANCELLED, f"cancelled at step {step}/{total}")
            if time.monotonic() > deadline:
                raise _Stop(
                    JobState.FAILED,
                    f"timed out after {self.limits.job_timeout_s:g} s (at step {step}/{total})",
                )

        try:
            result = run(self.methods[job.method], job.prepared, on_step=on_step)
        except _Stop as stop:
            kind = "cancelled" if stop.state == JobState.CANCELLED else "timeout"
            self._finish_unless_finished(job, stop.state, stop.message, kind)
            return
        except InputError as exc:
            self._finish_unless_finished(job, JobState.FAILED, str(exc), "input")
            return
        except GenerationError as exc:  # NaN output: the models' fault, said as it is (no traceback needed)
            logger.warning("job %s (%s) failed: %s", job.id, job.method, exc)
            self._finish_unless_finished(job, JobState.FAILED, str(exc)[:300], "generation")
            return
        except Exception as exc:  # noqa: BLE001 - a failed job must not kill the worker
            logger.exception("job %s (%s) failed", job.id, job.method)
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            message = f"internal error: {exc.__class__.__name__}" + (f": {first_line}" if first_line else "")
            self._finish_unless_finished(job, JobState.FAILED, message, "internal")
            return
        with self._cond:
            if job.finished:  # timed out by the watchdog during the last step: the result is dropped
                return
            if job._cancel.is_set():  # cancelled after its last step (decoding, paste-back): the 202 stands
                self._finish(
                    job, JobState.CANCELLED, f"cancelled after step {job.step}/{job.total}", "cancelled"
                )
                return
            if time.monotonic() > deadline:
                self._finish(
                    job, JobState.FAILED, f"timed out after {self.limits.job_timeout_s:g} s", "timeout"
                )
                return
            job.result = result
            job.step = job.total = max(job.total, job.step)
            self._finish(job, JobState.DONE)
