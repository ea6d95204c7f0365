"""The studio's engine room: request validation, per-model workers with bounded queues, kept results.

Kept free of the web framework so the rules (what a request may ask, when it is refused, which result
belongs to which request) are testable without a server; ``app.py`` is only routing around this.
"""

from __future__ import annotations

import dataclasses
import io
import math
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FreqarError, InvalidOption
from ..imageio import to_pil
from ..pipeline import Pipeline
from ..policies import list_policies, make_policy

SEED_MAX = 2**63 - 1
ACCELS = ("none", "sparsevar", "fastvar")
FIELDS = ("model", "label", "seed", "cfg", "top_k", "top_p", "temperature", "accel", "knobs", "compare")
# Mask codes as the SparseVAR policy draws them (computed, anchor, copied/restored, zeroed).
COMPUTED, RESTORED = 0, 2


@dataclass(frozen=True)
class ServeSettings:
    """Server limits; the defaults suit one person on a CPU laptop."""

    concurrency: int = 1  # generations running at once per model
    queue: int = 8  # requests allowed to wait per model beyond those running
    max_body: int = 16 * 1024  # bytes of a request body
    max_jobs: int = 64  # finished jobs whose pictures are kept for the page
    threads: int | None = None  # torch intra-op threads in each worker (None: torch's default)
    warmup: bool = True  # one throw-away generation per model at start, so timings are not cold

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise InvalidOption(f"concurrency must be >= 1, got {self.concurrency}")
        if self.queue < 0:
            raise InvalidOption(f"queue must be >= 0, got {self.queue}")
        if self.max_body < 256:
            raise InvalidOption(f"max body must be >= 256 bytes, got {self.max_body}")
        if self.max_jobs < 1:
            raise InvalidOption(f"max jobs must be >= 1, got {self.max_jobs}")
        if self.threads is not None and self.threads < 1:
            raise InvalidOption(f"threads must be >= 1, got {self.threads}")


class FieldError(Exception):
    """A request the server refuses, with the field to blame (the page highlights it)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


class QueueFull(Exception):
    """The model's queue is full: the client should come back after ``retry_after`` seconds."""

    def __init__(self, model: str, retry_after: int) -> None:
        super().__init__(f"model '{model}' is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request with every default filled in, so the response says exactly what ran."""

    model: str
    label: int | None
    seed: int
    cfg: float
    top_k: int
    top_p: float
    temperature: float
    accel: str
    knobs: dict[str, Any]
    compare: bool

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----- validation ----------------------------------------------------------------------------------------
def _number(body: dict, name: str, default: Any, *, integer: bool, lo: float, hi: float, lo_open=False):
    """One numeric field: JSON numbers only (not booleans, not strings), finite, inside [lo, hi]."""
    v = body.get(name, None)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise FieldError(name, f"{name} must be a number, got {type(v).__name__}")
    if integer:
        if isinstance(v, float):
            if not v.is_integer():
                raise FieldError(name, f"{name} must be an integer, got {v}")
            v = int(v)
    elif not math.isfinite(v):
        raise FieldError(name, f"{name} must be finite")
    low_ok = v > lo if lo_open else v >= lo
    if not (low_ok and v <= hi):
        left = "(" if lo_open else "["
        raise FieldError(name, f"{name} must be in {left}{lo:g}, {hi:g}], got {v}")
    return int(v) if integer else float(v)


def _knob_kind(cfg_cls: type, name: str) -> str:
    """'int', 'float' or 'list' from the policy config's annotation (they are strings under PEP 563)."""
    f = {f.name: f for f in dataclasses.fields(cfg_cls)}[name]
    t = str(f.type)
    if "tuple" in t or "list" in t:
        return "list"
    return "int" if "int" in t and "float" not in t else "float"


def policy_defaults(accel: str) -> dict[str, Any]:
    """Knob names and defaults of a policy (``none``: no knobs), for the page's form."""
    if accel == "none":
        return {}
    cfg = getattr(make_policy(accel), "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _knobs(body: dict, accel: str, pipe: Pipeline) -> dict[str, Any]:
    raw = body.get("knobs", None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FieldError("knobs", "knobs must be an object of policy options")
    if accel == "none":
        if raw:
            raise FieldError("knobs", "knobs need an accel other than 'none'")
        return {}
    cfg_cls = type(make_policy(accel).cfg)
    allowed = list(policy_defaults(accel))
    knobs: dict[str, Any] = {}
    for name, v in raw.items():
        where = f"knobs.{name}"
        if name not in allowed:
            raise FieldError(where, f"{accel} has no option '{name}' (options: {', '.join(allowed)})")
        if v is None:
            continue
        kind = _knob_kind(cfg_cls, name)
        if kind == "list":
            if not isinstance(v, list) or not 1 <= len(v) <= 64:
                raise FieldError(where, f"{name} must be a list of 1 to 64 numbers")
            vals = [_number({name: x}, name, None, integer=False, lo=-1e6, hi=1e6) for x in v]
            if None in vals:
                raise FieldError(where, f"{name} must be a list of numbers")
            v = vals
        else:
            try:
                v = _number({name: v}, name, None, integer=kind == "int", lo=-1e6, hi=1e6)
            except FieldError as e:
                raise FieldError(where, e.message) from None
        knobs[name] = v
    grids = pipe.tokenizer.stage_grids()
    depth = int(getattr(pipe.transformer, "depth", 1))
    for name, v in knobs.items():  # one knob at a time first, so the error names the culprit
        _try_policy(accel, {name: v}, grids, depth, f"knobs.{name}")
    _try_policy(accel, knobs, grids, depth, "knobs")
    return knobs


def _try_policy(accel: str, knobs: dict, grids: list, depth: int, where: str) -> None:
    """Build the policy and resolve it for this model now, not minutes later in the worker."""
    try:
        policy = make_policy(accel, **{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})
        policy.begin(grids, 1, depth, torch.device("cpu"))
    except (InvalidOption, TypeError, ValueError) as e:
        raise FieldError(where, str(e)) from None


def parse_request(body: Any, models: dict[str, Pipeline]) -> GenerateRequest:
    """Validate a JSON body (ranges as in the CLI) into a request; raises :class:`FieldError`."""
    if not isinstance(body, dict):
        raise FieldError("body", "the request body must be a JSON object", 400)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise FieldError(unknown[0], f"unknown field '{unknown[0]}' (fields: {', '.join(FIELDS)})")
    name = body.get("model", None)
    if name is None:
        name = next(iter(models))
    if not isinstance(name, str) or name not in models:
        shown = name if isinstance(name, str) and len(name) <= 64 else "(value)"
        raise FieldError("model", f"unknown model '{shown}' (served: {', '.join(models)})")
    pipe = models[name]
    d = pipe.defaults
    label = body.get("label", None)
    if isinstance(label, str):
        names = pipe.class_names or []
        if label not in names:
            raise FieldError("label", f"model '{name}' has no class named '{label[:64]}'")
        label = names.index(label)
    elif label is not None:
        label = _number(body, "label", None, integer=True, lo=0, hi=pipe.num_classes - 1)
    seed = body.get("seed", None)
    seed = (
        secrets.randbelow(2**31)
        if seed is None
        else _number(body, "seed", 0, integer=True, lo=0, hi=SEED_MAX)
    )
    vocab = getattr(getattr(pipe.transformer, "cfg", None), "vocab_size", 10**6)
    accel = body.get("accel", "none")
    if accel == "dense":
        accel = "none"
    if (
        not isinstance(accel, str)
        or accel not in ACCELS
        or (accel != "none" and accel not in list_policies())
    ):
        raise FieldError("accel", f"accel must be one of {', '.join(ACCELS)}")
    compare = body.get("compare", False)
    if not isinstance(compare, bool):
        raise FieldError("compare", "compare must be true or false")
    return GenerateRequest(
        model=name,
        label=label,
        seed=seed,
        cfg=_number(body, "cfg", d.cfg, integer=False, lo=0, hi=100),
        top_k=_number(body, "top_k", d.top_k, integer=True, lo=0, hi=vocab),
        top_p=_number(body, "top_p", d.top_p, integer=False, lo=0, hi=1),
        temperature=_number(body, "temperature", d.temperature, integer=False, lo=0, hi=100, lo_open=True),
        accel=accel,
        knobs=_knobs(body, accel, pipe),
        compare=compare and accel != "none",
    )


# ----- masks ---------------------------------------------------------------------------------------------
class MaskRecorder:
    """Wraps any policy and records which positions each stage computed (FastVAR keeps no masks)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", "policy")
        self.computed: dict[int, torch.Tensor] = {}  # stage -> (h*w,) bool for sample 0
        if hasattr(inner, "observe_input"):
            self.observe_input = inner.observe_input

    def begin(self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device) -> Any:
        self.grids = grids
        return self.inner.begin(grids, batch, depth, device)

    def select(self, stage: int, state: Any) -> Any:
        sel = self.inner.select(stage, state)
        if sel.index is not None:
            h, w = self.grids[stage]
            idx = sel.index[0] if sel.valid is None else sel.index[0][sel.valid[0]]
            mask = torch.zeros(h * w, dtype=torch.bool)
            mask[idx.cpu()] = True
            self.computed[stage] = mask
        return sel

    def fill(self, stage: int, sel: Any, logits: torch.Tensor, out: Any, state: Any) -> Any:
        return self.inner.fill(stage, sel, logits, out, state)

    def stats(self, state: Any) -> list[dict]:
        return self.inner.stats(state)

    def masks(self, state: Any) -> list[torch.Tensor]:
        """Per shown stage, (1, h, w) uint8 codes: the policy's own pictures when it keeps them."""
        own = getattr(state, "masks", None)
        if own:
            return [m[:1] for m in own]
        if not self.computed:
            return []
        first = min(self.computed)
        out = []
        for k in range(first, len(self.grids)):
            h, w = self.grids[k]
            comp = self.computed.get(k, torch.ones(h * w, dtype=torch.bool))
            code = torch.where(comp, COMPUTED, RESTORED).to(torch.uint8)
            out.append(code.view(1, h, w))
        return out


def mask_png(masks: list[torch.Tensor], image: torch.Tensor) -> bytes | None:
    """The masks over the image, drawn as ``freqar generate --save-masks`` does (SparseVAR's Figure 7)."""
    if not masks:
        return None
    from ..policies.sparsevar import mask_picture

    side = max(96, min(256, image.shape[-1]))
    return png_bytes(mask_picture(masks, 0, image, side=side))


def png_bytes(img_3HW: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(img_3HW).save(buf, format="PNG")
    return buf.getvalue()


def fidelity(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | None]:
    """PSNR/SSIM as ``freqar bench`` reports them (PSNR None when the images are identical)."""
    from ..bench import psnr, ssim

    p = psnr(a, b)
    win_ok = min(a.shape[-2:]) >= 11  # bench's SSIM window is 11x11
    if not win_ok:
        size = (11 * math.ceil(11 / min(a.shape[-2:])),) * 2
        a, b = (F.interpolate(t, size=size, mode="nearest") for t in (a, b))
    return {"psnr": None if math.isinf(p) else round(p, 3), "ssim": round(ssim(a, b), 5)}


# ----- jobs and workers ----------------------------------------------------------------------------------
@dataclass
class Job:
    """One request's life: queued -> running -> done | error; its pictures live here until evicted."""

    id: str
    request: GenerateRequest
    created: float = field(default_factory=time.perf_counter)
    status: str = "queued"
    phase: str = ""
    stages: list[dict] = field(default_factory=list)
    num_stages: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        """What the page polls: status, progress of the current phase, and the result once done."""
        r = self.request
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "model": r.model,
            "seed": r.seed,
            "settings": r.settings(),
            "progress": {"phase": self.phase, "stages": list(self.stages), "num_stages": self.num_stages},
        }
        if self.result is not None:
            out.update(self.result)
        if self.error is not None:
            out["error"] = {"field": None, "message": self.error}
        return out


class ModelWorker:
    """One model's executor and admission count: at most ``concurrency`` running, ``queue`` waiting."""

    def __init__(self, name: str, pipe: Pipeline, settings: ServeSettings) -> None:
        self.name = name
        self.pipe = pipe
        self.capacity = settings.concurrency + settings.queue
        self.concurrency = settings.concurrency
        self.pending = 0
        self.avg_seconds = 1.0
        self.lock = threading.Lock()
        threads = settings.threads
        self.pool = ThreadPoolExecutor(
            max_workers=settings.concurrency,
            thread_name_prefix=f"freqar-{name}",
            initializer=(lambda: torch.set_num_threads(threads)) if threads else None,
        )

    def admit(self) -> None:
        with self.lock:
            if self.pending >= self.capacity:
                wait = self.avg_seconds * (self.pending - self.concurrency + 1) / self.concurrency
                raise QueueFull(self.name, max(1, min(600, math.ceil(wait))))
            self.pending += 1

    def release(self, seconds: float | None) -> None:
        with self.lock:
            self.pending -= 1
            if seconds is not None:
                self.avg_seconds = 0.7 * self.avg_seconds + 0.3 * seconds


class Studio:
    """Everything the server holds: the models it was started with, their workers, recent jobs."""

    def __init__(self, models: dict[str, Pipeline], settings: ServeSettings | None = None) -> None:
        if not models:
            raise InvalidOption("the studio needs at least one model")
        for name, pipe in models.items():  # text-to-image families take prompts: not served yet
            if not isinstance(pipe, Pipeline):
                raise InvalidOption(
                    f"model '{name}' ({type(pipe).__name__}) is not a class-conditional freqar Pipeline; "
                    "freqar serve serves class-conditional models"
                )
        self.settings = settings or ServeSettings()
        self.models = dict(models)
        self.workers = {n: ModelWorker(n, p, self.settings) for n, p in self.models.items()}
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        if self.settings.warmup:
            for w in self.workers.values():  # queued first on each worker, ahead of any request
                w.pool.submit(_warmup, w.pipe)

    # ----- public --------------------------------------------------------------------------------------
    def models_info(self) -> list[dict[str, Any]]:
        out = []
        for name, pipe in self.models.items():
            w = self.workers[name]
            d = pipe.defaults
            out.append(
                {
                    "name": name,
                    "family": pipe.family,
                    "image_size": pipe.image_size,
                    "num_classes": pipe.num_classes,
                    "class_names": pipe.class_names,
                    "num_stages": len(pipe.tokenizer.stage_grids()),
                    "defaults": {
                        "cfg": d.cfg,
                        "top_k": d.top_k,
                        "top_p": d.top_p,
                        "temperature": d.temperature,
                    },
                    "accel": {a: policy_defaults(a) for a in ACCELS if a == "none" or a in list_policies()},
                    "queue": {"pending": w.pending, "capacity": w.capacity, "concurrency": w.concurrency},
                }
            )
        return out

    def parse(self, body: Any) -> GenerateRequest:
        return parse_request(body, self.models)

    def submit(self, req: GenerateRequest) -> tuple[Job, Future]:
        """Queue a request or raise :class:`QueueFull`; the future resolves to the finished job."""
        worker = self.workers[req.model]
        worker.admit()
        job = Job(secrets.token_urlsafe(12), req)
        with self.lock:
            self.jobs[job.id] = job
            self._evict()
        try:
            fut = worker.pool.submit(self._run, worker, job)
        except RuntimeError:  # shutting down
            worker.release(None)
            raise QueueFull(req.model, 5) from None
        return job, fut

    def job(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def close(self) -> None:
        for w in self.workers.values():
            w.pool.shutdown(wait=False, cancel_futures=True)

    # ----- internals -----------------------------------------------------------------------------------
    def _evict(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.status in ("done", "error")]
        for k in finished[: max(0, len(finished) - self.settings.max_jobs)]:
            del self.jobs[k]

    def _run(self, worker: ModelWorker, job: Job) -> Job:
        t0 = time.perf_counter()
        job.status = "running"
        queued = t0 - job.created
        ok = False
        try:
            result = self._generate_all(worker.pipe, job)
            result["queue_seconds"] = round(queued, 4)
            result["total_seconds"] = round(time.perf_counter() - job.created, 4)
            job.result = result  # published whole: the page may be polling this job right now
            job.status = "done"
            ok = True
        except FreqarError as e:
            job.error, job.status = str(e), "error"
        except Exception as e:  # a bug must not take the worker down; the client still gets an answer
            job.error, job.status = f"generation failed ({type(e).__name__}: {e})", "error"
        finally:
            worker.release(time.perf_counter() - t0 if ok else None)
            with self.lock:
                self._evict()
        return job

    def _generate_all(self, pipe: Pipeline, job: Job) -> dict[str, Any]:
        r = job.request
        job.num_stages = len(pipe.tokenizer.stage_grids())
        dense = self._one(pipe, job, "dense", None) if r.compare else None
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in r.knobs.items()}
        rec = MaskRecorder(make_policy(r.accel if r.accel != "none" else "dense", **knobs))
        out = self._one(pipe, job, "accelerated" if r.accel != "none" else "dense", rec)
        img = out.images[0]
        job.files["image"] = png_bytes(img)
        masks = mask_png(rec.masks(out.policy_state), img)
        if masks is not None:
            job.files["masks"] = masks
        base = f"/api/jobs/{job.id}"
        result: dict[str, Any] = {
            "label": int(out.labels[0]),
            "class_name": _class_name(pipe, int(out.labels[0])),
            "image": f"{base}/image.png",
            "masks": f"{base}/masks.png" if masks is not None else None,
            **_timings(out),
            "policy_stats": out.policy_stats,
            "dense": None,
            "compare": None,
        }
        if dense is not None:
            job.files["dense"] = png_bytes(dense.images[0])
            result["dense"] = {"image": f"{base}/dense.png", "label": int(dense.labels[0]), **_timings(dense)}
            speed = dense.transformer_seconds / max(out.transformer_seconds, 1e-9)
            tok = result["dense"]["tokens_computed"] / max(result["tokens_computed"], 1)
            result["compare"] = {
                "speedup": round(speed, 3),
                "token_ratio": round(tok, 3),
                **fidelity(dense.images[:1], out.images[:1]),
            }
        return result

    def _one(self, pipe: Pipeline, job: Job, phase: str, policy: Any) -> Any:
        r = job.request
        job.phase, job.stages = phase, []

        def on_stage(info: Any) -> None:
            job.stages = [
                *job.stages,
                _stage_row(info.stage, info.grid, info.seconds, info.tokens_computed[0]),
            ]

        return pipe.generate(
            None if r.label is None else [r.label],
            batch=1,
            seed=r.seed,
            cfg=r.cfg,
            top_k=r.top_k,
            top_p=r.top_p,
            temperature=r.temperature,
            policy=policy,
            callback=on_stage,
        )


def _warmup(pipe: Pipeline) -> None:
    """The first generation pays for allocations and lazy init; without this, compare's dense run (which
    goes first) would look slower than it is and inflate the speed-up."""
    try:
        pipe.generate(None, batch=1, seed=0)
    except Exception:  # a model that cannot generate fails its real requests with a clear message
        pass


def _stage_row(stage: int, grid: Any, seconds: float, tokens: int) -> dict[str, Any]:
    h, w = grid
    return {"stage": stage, "grid": [h, w], "seconds": round(seconds, 5), "tokens": tokens, "total": h * w}


def _timings(out: Any) -> dict[str, Any]:
    stages = [
        _stage_row(k, g, s, c[0])
        for k, (g, s, c) in enumerate(zip(out.grids, out.stage_seconds, out.tokens_computed, strict=True))
    ]
    return {
        "stages": stages,
        "transformer_seconds": round(out.transformer_seconds, 5),
        "decode_seconds": round(out.decode_seconds, 5),
        "tokens_computed": sum(s["tokens"] for s in stages),
        "tokens_total": sum(s["total"] for s in stages),
    }


def _class_name(pipe: Pipeline, label: int) -> str | None:
    names = pipe.class_names
    return names[label] if names and 0 <= label < len(names) else None
