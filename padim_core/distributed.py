"""Fit and score on a Ray cluster, with results equal to the single-process run.

Fit: each worker adds its share of the images to its own streamed statistics
(:class:`~padim_core.gaussian.RunningGaussian`); the driver merges the
partials, which are plain sums, so the merged fit equals the single-process
fit up to float rounding. Predict: a pool of workers, each holding the model
once, scores batches; the driver hands the batches back in the order of the
input, so the CSV and heatmaps match the single-process run.

The driver reads the image files and ships their bytes, and it ships the
network's weights, so workers need neither the files nor any weights file:
only the packages. Each call carries one batch of ``batch_size`` files, the
same batches as the single-process run.

A worker process that dies is restarted by Ray and its call retried. Scores
are keyed by batch, so a retried batch replaces and never adds. A fit worker
keeps its sums between calls, so a restart loses them: the driver asks every
worker at the end which batches its sums hold and sends the missing ones
again, until each batch is held by exactly one worker. A worker that dies
more often than ``MAX_RESTARTS`` allows ends the job with
:class:`WorkerLostError`, which names the worker, its batch and the images
left undone.

Ray Data is not used: a fit returns one partial per worker rather than rows
(a per-batch partial would be as large as the model), and on a two-core
machine its start-up took 4 s against 1 s for plain actors.

Ray's driver prints notices about dead workers on standard output and offers
no switch to move them; the command line diverts standard output to standard
error while Ray runs, so a CSV written there stays clean.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    import ray
except ImportError as error:  # the extra is optional
    raise ImportError(
        "the ray engine needs Ray: pip install -r requirements-ray.txt"
    ) from error

# The switch that keeps a local cluster on 127.0.0.1 has no public home.
from ray._private import ray_constants

import padim_core
from padim_core.gaussian import Gaussian, RunningGaussian
from padim_core.images import MAX_FILE_BYTES, Skipped
from padim_core.loader import Batch, iter_batches
from padim_core.model import FitReport, Padim, PadimConfig, Prediction, ProgressCallback

logger = logging.getLogger(__name__)

# A local cluster listens on the loopback interface only.
LOOPBACK = "127.0.0.1"

# One torch thread per worker; the cluster's CPUs set the number of workers.
CPUS_PER_WORKER = 1

# A dead worker is restarted, and its calls retried, this often before the
# job fails.
MAX_RESTARTS = 3

# Calls queued on one worker: one running and one waiting, so a worker never
# idles while the driver reads the next files.
CALLS_PER_WORKER = 2

# Scored batches held back, per worker, while an earlier one is retried; bounds
# the driver's memory when it hands batches back in input order.
REORDER_WINDOW_PER_WORKER = 8

# Seconds to wait for a TCP answer at ``address`` before calling Ray, which
# would otherwise retry for minutes.
CONNECT_TIMEOUT = 5.0

# Testing aid: when set, the first worker to start its third call creates
# this file and kills its own process, so tests can watch the recovery. By
# then the driver holds the reply to that worker's first call, so a fit
# worker takes sums with it that the driver has counted as done. After that
# first death, workers kill themselves at the start of any call until
# _CRASHES deaths in all (one by default), so tests can exhaust the restarts.
_CRASH_MARKER: Path | None = None
_CRASHES = 1

# Files named in a lost worker's message before the rest are only counted.
NAMED_FILES = 3

# What this module and Ray set in the environment for the length of a
# connection; the previous values come back afterwards.
_RAY_VARIABLES = (
    "RAY_USAGE_STATS_ENABLED",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
)

Source = tuple[str, bytes | Path]


class WorkerLostError(RuntimeError):
    """A worker died more often than its restarts allow; the job is incomplete."""


@contextmanager
def connect(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join the cluster at ``address``, or start a local one, for the block.

    A Ray connection already open in this process is used as it is and left
    open. Otherwise the connection is closed at the end of the block, which
    also stops a local cluster.

    Args:
        address: A cluster's address (``HOST:PORT`` of its head, or ``auto``);
            None starts a local cluster bound to 127.0.0.1.
        num_cpus: CPUs of a local cluster; all of this machine's if None.

    Raises:
        ValueError: If no Ray cluster answers at ``address``, or it refuses
            this process.
        RuntimeError: If a local cluster did not bind to 127.0.0.1.
    """
    if ray.is_initialized():
        yield
        return
    saved = {name: os.environ.get(name) for name in _RAY_VARIABLES}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        if address is None:
            _start_local_cluster(num_cpus or os.cpu_count() or 1)
        else:
            _join_cluster(address)
        yield
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_local_cluster(num_cpus: int) -> None:
    """Start a cluster of this machine alone, listening on 127.0.0.1 only.

    Raises:
        RuntimeError: If Ray still chose another address for the node.
    """
    # Ray turns token authentication on for a new local cluster; a token in
    # this process's environment keeps it from writing one to the home folder.
    if not any(
        name in os.environ
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray replaces a node address of 127.0.0.1 by the machine's outside one,
    # and then listens on every interface, unless its cluster mode is off.
    # Ray has no argument for that: the switch is an environment variable,
    # read by each process the cluster starts and, in this process, when Ray
    # was imported, so the value read then is overridden for the start.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray warns, on every start, that it turned authentication on.
    notices = logging.getLogger("ray._private.authentication")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        notices.setLevel(level)

    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {LOOPBACK}:
        ray.shutdown()
        raise RuntimeError(f"Ray bound the local cluster to {sorted(addresses)}")
    logger.info("started a local Ray cluster on %s with %d CPUs", LOOPBACK, num_cpus)


def _join_cluster(address: str) -> None:
    _check_answers(address)
    # The package travels with the job, so nodes need only its requirements.
    package = str(Path(padim_core.__file__).parent)
    try:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=False,  # standard output is the CSV's; logs stay on the nodes
            runtime_env={"py_modules": [package]},
        )
    except ConnectionError as error:  # a refused token comes as the cause
        reason = error.__cause__ or error
        raise ValueError(f"--address {address}: cannot join ({reason})") from None
    logger.info("joined the Ray cluster at %s", address)


def _check_answers(address: str) -> None:
    """Raise ``ValueError`` early if no server listens at ``address``."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--address {address!r} is not allowed: give HOST:PORT of the "
            "cluster's head, or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT).close()
    except OSError as error:
        raise ValueError(
            f"--address {address}: no Ray cluster answers there ({error})"
        ) from None


def fit(
    padim: Padim,
    paths: Sequence[str | Path],
    batch_size: int,
    progress: ProgressCallback | None = None,
    address: str | None = None,
    workers: int | None = None,
) -> FitReport:
    """Fit (or extend the fit of) ``padim`` on image files, on Ray workers.

    The counterpart of :meth:`padim_core.model.Padim.fit`: afterwards
    ``padim`` holds the merged statistics, finalised, ready to save or score.

    Args:
        padim: The model; its network is copied to the workers.
        paths: Image files; unusable ones are skipped and reported.
        batch_size: Images per forward pass, and per call to a worker.
        progress: Called with (images done, images total) after each batch.
        address: A cluster to join; None starts a local one.
        workers: Worker processes; one per CPU of the cluster if None.

    Returns:
        A report of the images used and skipped.

    Raises:
        ValueError: If no image at all could be used, or nothing answers at
            ``address``.
    """
    start = time.perf_counter()
    chunks = _chunks(paths, batch_size)
    with connect(address):
        batches, partials = _fit_on_workers(
            padim, chunks, batch_size, progress, workers
        )

    report = FitReport()
    for index in sorted(batches):
        images, skipped = batches[index]
        report.images += images
        report.skipped.extend(skipped)
    if report.images == 0 and padim.n_images == 0:
        raise ValueError(
            f"none of the {len(report.skipped)} files could be used as an image"
        )

    for stats in partials:
        if padim.stats is None:
            padim.stats = RunningGaussian.empty(stats.positions, stats.channels)
        padim.stats.merge(stats)
    padim.finalize()
    report.seconds = time.perf_counter() - start
    padim.metadata["fit_seconds"] = report.seconds
    return report


def _fit_on_workers(
    padim: Padim,
    chunks: list[list[Path]],
    batch_size: int,
    progress: ProgressCallback | None,
    workers: int | None,
) -> tuple[dict[int, tuple[int, list[Skipped]]], list[RunningGaussian]]:
    """Images used and skipped by batch index, and each worker's statistics.

    Batches lost with a restarted worker are sent again until every batch is
    held by exactly one worker. The statistics come in the order of each
    worker's first batch, and only those of workers that used an image.
    """
    total = sum(len(chunk) for chunk in chunks)
    shared = [ray.put({"network": _network_state(padim)})]
    actors = _start_workers(_FitWorker, workers, len(chunks), padim.config)
    missing = list(range(len(chunks)))
    try:
        for _ in range(MAX_RESTARTS + 1):
            done = total - sum(len(chunks[index]) for index in missing)
            jobs = [(index, chunks[index]) for index in missing]
            for index, _ in _dispatch(actors, "add", shared, jobs, batch_size):
                done += len(chunks[index])
                if progress is not None:
                    progress(done, total)
            reports = _collect(actors)
            batches, partials = _gather(reports)
            missing = [index for index in range(len(chunks)) if index not in batches]
            if not missing:
                return batches, partials
            logger.warning(
                "%d batches were lost with a worker; sent again", len(missing)
            )
    except WorkerLostError as error:
        raise WorkerLostError(f"{error}; the fit was abandoned") from None
    finally:
        _stop(actors)
    lost = [path for index in missing for path in chunks[index]]
    raise WorkerLostError(
        f"{len(missing)} batches were lost with a worker {MAX_RESTARTS + 1} "
        f"times ({_some_files(lost)}); the fit was abandoned"
    )


def _collect(actors: list) -> list:
    """Each fit worker's batches and sums; WorkerLostError if one is gone."""
    calls = [actor.collect.remote() for actor in actors]
    reports = []
    for slot, call in enumerate(calls):
        try:
            reports.append(ray.get(call))
        except ray.exceptions.RayActorError:
            raise WorkerLostError(
                f"{_worker_died(slot, actors)}, before handing in its sums"
            ) from None
    return reports


def _gather(
    reports: list[tuple[dict[int, tuple[int, list[Skipped]]], RunningGaussian | None]],
) -> tuple[dict[int, tuple[int, list[Skipped]]], list[RunningGaussian]]:
    batches: dict[int, tuple[int, list[Skipped]]] = {}
    for held, _ in reports:
        for index, outcome in held.items():
            if index in batches:
                raise RuntimeError(f"batch {index} was fitted by two workers")
            batches[index] = outcome
    used = [(min(held), stats) for held, stats in reports if stats is not None]
    return batches, [stats for _, stats in sorted(used, key=lambda item: item[0])]


def predict_batches(
    padim: Padim,
    paths: Sequence[str | Path],
    batch_size: int,
    address: str | None = None,
    workers: int | None = None,
    maps: bool = True,
) -> Iterator[tuple[Prediction | None, list[Skipped], Batch]]:
    """Score image files on Ray workers, batch by batch, in input order.

    The counterpart of :meth:`padim_core.model.Padim.predict_batches`, and it
    yields the same tuples; ``Batch.tensor`` is None, since the images stay
    on the workers. The connection stays open until the generator is
    exhausted or closed.

    Args:
        padim: A fitted model; its network and Gaussians go to the workers.
        paths: Image files; unusable ones are skipped and reported.
        batch_size: Images per forward pass, and per call to a worker.
        address: A cluster to join; None starts a local one.
        workers: Worker processes; one per CPU of the cluster if None.
        maps: Whether the workers send the anomaly maps (N, H, W) back. If
            False, ``Prediction.maps`` is empty, of shape (N, 0, 0), and only
            scores and patch distances (N, h, w) travel: 16 times less at a
            patch stride of 4. The maps can be rebuilt from the distances
            with :func:`padim_core.anomaly_map.anomaly_maps`.

    Yields:
        ``(prediction or None, skipped files, batch)`` for each batch.

    Raises:
        WorkerLostError: If a worker died more often than its restarts allow;
            the message names the worker, its batch and the first image not
            scored.
    """
    gaussian = _fitted_gaussian(padim)
    chunks = _chunks(paths, batch_size)
    total, done = sum(len(chunk) for chunk in chunks), 0
    with connect(address):
        model = {"network": _network_state(padim), "gaussian": gaussian}
        shared = [ray.put(model)]
        actors = _start_workers(_ScoreWorker, workers, len(chunks), padim.config, maps)
        try:
            jobs = list(enumerate(chunks))
            results = _dispatch(actors, "score", shared, jobs, batch_size, ordered=True)
            for index, (prediction, skipped) in _reporting_undone(results, chunks):
                done += len(chunks[index])
                names = [] if prediction is None else prediction.names
                sizes = [] if prediction is None else prediction.sizes
                yield (
                    prediction,
                    skipped,
                    Batch(names, None, sizes, skipped, done, total),
                )
        finally:
            _stop(actors)


def _reporting_undone(
    results: Iterator[tuple[int, Any]], chunks: list[list[Path]]
) -> Iterator[tuple[int, Any]]:
    """``results``, in job order; a lost worker's error adds what was not scored."""
    done = 0
    try:
        for index, result in results:
            done = index + 1
            yield index, result
    except WorkerLostError as error:
        undone = [path for chunk in chunks[done:] for path in chunk]
        total = sum(len(chunk) for chunk in chunks)
        raise WorkerLostError(
            f"{error}; {len(undone)} of {total} images were not scored, "
            f"from {undone[0]} on"
        ) from None


def _fitted_gaussian(padim: Padim) -> Gaussian:
    """The Gaussians the workers score with, fitted now if need be."""
    gaussian = padim.model.gaussian
    if gaussian is None or not gaussian.usable:
        if padim.stats is None:
            raise RuntimeError("the model is not fitted yet")
        padim.finalize()
    return padim.model.gaussian


def _chunks(paths: Sequence[str | Path], batch_size: int) -> list[list[Path]]:
    """The files in batches of ``batch_size``, as the single-process run cuts them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    paths = [Path(path) for path in paths]
    return [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]


def _network_state(padim: Padim) -> dict[str, Tensor]:
    """The network's weights and channel indices, on the CPU."""
    state = padim.model.state_dict()
    return {key: value.detach().cpu() for key, value in state.items()}


def _start_workers(
    worker_class: type,
    workers: int | None,
    jobs: int,
    config: PadimConfig,
    *options: Any,
) -> list:
    """Start ``workers`` actors (one per cluster CPU if None), at most ``jobs``.

    Each is built with ``(config, crash aid, *options)``.
    """
    if workers is None:
        cpus = int(ray.cluster_resources().get("CPU", CPUS_PER_WORKER))
        workers = max(1, cpus // CPUS_PER_WORKER)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    actor_class = ray.remote(worker_class).options(
        num_cpus=CPUS_PER_WORKER,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,
    )
    count = min(workers, jobs)
    logger.info("starting %d Ray workers", count)
    crash = None if _CRASH_MARKER is None else (_CRASH_MARKER, _CRASHES)
    return [actor_class.remote(config, crash, *options) for _ in range(count)]


def _stop(actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _dispatch(
    actors: list,
    method: str,
    shared: list,
    jobs: Iterable[tuple[int, list[Path]]],
    batch_size: int,
    ordered: bool = False,
) -> Iterator[tuple[int, Any]]:
    """Run ``method(shared, index, sources, batch_size)`` of the least busy actor.

    ``shared`` holds a reference to the model, in a list so that Ray passes
    the reference and the worker fetches the model only once. Yields
    ``(job index, result)`` as results come, or in job order if ``ordered``.
    Warnings raised on a worker are raised again here.

    Raises:
        WorkerLostError: If an actor died more often than its restarts allow.
    """
    queue = deque(jobs)
    files = dict(queue)
    order = deque(index for index, _ in queue)
    busy = [0] * len(actors)
    pending: dict[Any, tuple[int, int]] = {}  # reference -> (actor, job index)
    finished: dict[int, Any] = {}
    window = REORDER_WINDOW_PER_WORKER * len(actors)
    while queue or pending:
        while queue and min(busy) < CALLS_PER_WORKER:
            if ordered and len(pending) + len(finished) >= window:
                break
            index, paths = queue.popleft()
            slot = busy.index(min(busy))
            call = getattr(actors[slot], method)
            sources = _read_sources(paths)
            pending[call.remote(shared, index, sources, batch_size)] = (slot, index)
            busy[slot] += 1

        (reference,), _ = ray.wait(list(pending), num_returns=1)
        slot, index = pending.pop(reference)
        busy[slot] -= 1
        try:
            finished[index], caught = ray.get(reference)
        except ray.exceptions.RayActorError:
            # Its calls fail in no set order; name the first batch it held.
            first = min([index, *(job for at, job in pending.values() if at == slot)])
            raise WorkerLostError(
                f"{_worker_died(slot, actors)}, on batch {first + 1} of "
                f"{len(files)} ({_some_files(files[first])})"
            ) from None
        for message, category in caught:
            warnings.warn(message, category, stacklevel=2)

        while finished and (not ordered or order[0] in finished):
            index = order.popleft() if ordered else next(iter(finished))
            yield index, finished.pop(index)


def _worker_died(slot: int, actors: list) -> str:
    return (
        f"Ray worker {slot + 1} of {len(actors)} died more often than its "
        f"{MAX_RESTARTS} restarts allow"
    )


def _some_files(paths: Sequence[Path]) -> str:
    """The first ``NAMED_FILES`` of ``paths``, and how many more."""
    named = ", ".join(str(path) for path in paths[:NAMED_FILES])
    more = len(paths) - NAMED_FILES
    return named if more <= 0 else f"{named} and {more} more"


def _read_sources(paths: list[Path]) -> list[Source]:
    """Each file's name and bytes, named as the single-process run names it.

    A file that is missing, unreadable or too large goes as its path, so the
    worker reports it with the same reason as the single-process run.
    """
    sources: list[Source] = []
    for path in paths:
        data: bytes | Path = path
        try:
            if path.stat().st_size <= MAX_FILE_BYTES:
                data = path.read_bytes()
        except OSError:
            pass
        sources.append((str(path), data))
    return sources


class _Worker:
    """A copy of the driver's model in a Ray worker process.

    The model comes with the first call, not with the constructor, so a
    restarted worker needs nothing kept alive for it beyond the job itself.

    Args:
        config: The model's configuration.
        crash: ``(_CRASH_MARKER, _CRASHES)``, or None; see ``_CRASH_MARKER``.
    """

    def __init__(
        self, config: PadimConfig, crash: tuple[Path, int] | None = None
    ) -> None:
        torch.set_num_threads(CPUS_PER_WORKER)
        torch.set_grad_enabled(False)
        self.config = config
        self.crash = crash
        self.padim: Padim | None = None
        self.calls = 0

    def _begin_call(self, shared: list) -> Padim:
        """Count the call, build the model on the first one, and return it."""
        if self.crash is not None:
            marker, crashes = self.crash
            if self.calls >= 2 or marker.exists():
                _crash(marker, crashes)
        self.calls += 1
        if self.padim is None:
            self.padim = self._build(ray.get(shared[0]))
        return self.padim

    def _build(self, model: dict[str, Any]) -> Padim:
        config = self.config
        padim = Padim(
            backbone=config.backbone,
            layers=config.layers,
            pre_trained=False,  # the driver's weights follow
            n_features=config.n_features,
            image_size=config.image_size,
            seed=config.seed,
        )
        padim.model.load_state_dict(model["network"])
        padim.model.gaussian = model.get("gaussian")
        return padim


def _crash(marker: Path, crashes: int) -> None:
    """Kill this process unless ``crashes`` deaths are on record already.

    Each death is recorded first, atomically: ``marker``, then ``marker.1``,
    ``marker.2`` and so on.
    """
    for death in range(crashes):
        record = marker.with_name(f"{marker.name}.{death}") if death else marker
        try:
            os.close(os.open(record, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os._exit(1)


def _warnings_raised(caught: list[warnings.WarningMessage]) -> list[tuple]:
    return [(str(item.message), item.category) for item in caught]


class _FitWorker(_Worker):
    """Adds batches to its own statistics, and says which batches they hold."""

    def __init__(
        self, config: PadimConfig, crash: tuple[Path, int] | None = None
    ) -> None:
        super().__init__(config, crash)
        self.batches: dict[int, tuple[int, list[Skipped]]] = {}

    def add(
        self, shared: list, index: int, sources: list[Source], batch_size: int
    ) -> tuple[None, list[tuple]]:
        """Add the images of batch ``index``; return (None, warnings raised)."""
        padim = self._begin_call(shared)
        images, skipped = 0, []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in iter_batches(sources, self.config.image_size, batch_size):
                skipped.extend(batch.skipped)
                if batch.tensor is not None:
                    padim.partial_fit(batch.tensor)
                    images += len(batch.names)
        self.batches[index] = (images, skipped)
        return None, _warnings_raised(caught)

    def collect(
        self,
    ) -> tuple[dict[int, tuple[int, list[Skipped]]], RunningGaussian | None]:
        """The batches held, by index, as (images used, skipped), and the sums."""
        return self.batches, None if self.padim is None else self.padim.stats


class _ScoreWorker(_Worker):
    """Scores batches with the driver's fitted Gaussians.

    Args:
        config: The model's configuration.
        crash: See :class:`_Worker`.
        maps: Whether to send the anomaly maps back, or leave them empty.
    """

    def __init__(
        self,
        config: PadimConfig,
        crash: tuple[Path, int] | None = None,
        maps: bool = True,
    ) -> None:
        super().__init__(config, crash)
        self.maps = maps

    def score(
        self, shared: list, index: int, sources: list[Source], batch_size: int
    ) -> tuple[tuple[Prediction | None, list[Skipped]], list[tuple]]:
        """Score one batch; return ((prediction, skipped), warnings raised)."""
        padim = self._begin_call(shared)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prediction, skipped = padim.predict(sources, batch_size)
        if prediction is not None and not self.maps:
            empty = prediction.maps.new_empty((len(prediction.names), 0, 0))
            prediction = replace(prediction, maps=empty)
        return (prediction, skipped), _warnings_raised(caught)
