"""The Ray engine on a local cluster bound to 127.0.0.1, with real images.

One cluster of two CPUs serves the module. Fits and scores on it are checked
against the single-process run on the same images, also after a worker
process dies mid-job.
"""

import csv as csv_module
import io
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip(
    "ray", reason="the Ray extra is not installed (requirements-ray.txt)"
)

from padim_core import distributed
from padim_core.cli import main
from padim_core.model import Padim
from padim_core.model_file import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
BSDATA = ROOT.parent / "shared" / "datasets" / "bsdata"

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not BSDATA.is_dir(), reason=f"{BSDATA} not found"),
]

IMAGE_SIZE = 128
N_FEATURES = 20
BATCH_SIZE = 4


def _padim() -> Padim:
    return Padim(
        backbone="efficientnet_lite0", n_features=N_FEATURES, image_size=IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def cluster():
    with distributed.connect(num_cpus=2):
        yield


@pytest.fixture
def one_thread():
    """Score here with one thread, as each worker does.

    Float32 convolutions round differently with other thread counts, which
    moves the fourth decimal of some scores; with equal threads the output
    must be equal to the byte.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(distributed.CPUS_PER_WORKER)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_paths() -> list[Path]:
    return sorted((BSDATA / "train" / "good").iterdir())[:12]


@pytest.fixture(scope="module")
def test_folder(tmp_path_factory) -> Path:
    """Good and pitted images in two folders, and one file that is no image."""
    root = tmp_path_factory.mktemp("lot")
    for kind, count in (("good", 4), ("pitting", 5)):
        (root / kind).mkdir()
        for file in sorted((BSDATA / "test" / kind).iterdir())[:count]:
            (root / kind / file.name).symlink_to(file)
    (root / "good" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def plain(train_paths) -> Padim:
    padim = _padim()
    padim.fit(train_paths, BATCH_SIZE)
    return padim


@pytest.fixture(scope="module")
def model_file(plain, tmp_path_factory) -> Path:
    return save_model(plain, tmp_path_factory.mktemp("model") / "m.safetensors")


def _assert_same_fit(merged: Padim, plain: Padim, images: list[Path]) -> None:
    assert merged.stats.count == plain.stats.count
    torch.testing.assert_close(merged.stats.mean, plain.stats.mean)
    # Float32 sums, added in another order and with other thread counts:
    # equal to a millionth of the covariance's scale.
    expected = plain.stats.covariance()
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        merged.stats.covariance(), expected, rtol=1e-4, atol=1e-6 * scale
    )
    merged_scores = merged.predict(images, BATCH_SIZE)[0].scores
    plain_scores = plain.predict(images, BATCH_SIZE)[0].scores
    torch.testing.assert_close(merged_scores, plain_scores, rtol=1e-4, atol=1e-4)


def _predict(args: list[str], csv: Path) -> str:
    assert main(["-q", "predict", "--csv", str(csv), *args]) == 0
    return csv.read_text()


def _process_tree(root: int) -> set[int]:
    """``root`` and all its descendants, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grown = {root}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in tree}
        grown = not children <= tree
        tree |= children
    return tree


def _listening_addresses(pids: set[int]) -> list[ipaddress.IPv4Address]:
    """Local addresses of the TCP sockets that ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                address = ipaddress.ip_address(b"".join(words))
                addresses.append(getattr(address, "ipv4_mapped", None) or address)
    return addresses


def test_the_local_cluster_listens_on_127_0_0_1_only(cluster):
    addresses = _listening_addresses(_process_tree(os.getpid()))

    assert len(addresses) >= 3  # at least the GCS, the raylet and this driver
    assert {str(address) for address in addresses} == {"127.0.0.1"}


def test_merged_fit_equals_plain_fit(cluster, train_paths, test_folder, plain):
    merged = _padim()
    report = distributed.fit(merged, train_paths, BATCH_SIZE, workers=2)

    assert report.images == len(train_paths) and report.skipped == []
    _assert_same_fit(merged, plain, sorted(test_folder.glob("pitting/*")))


def test_fit_command_writes_the_same_model(cluster, train_paths, plain, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for file in train_paths:
        (train / file.name).symlink_to(file)
    out = tmp_path / "ray.safetensors"
    options = ["--image-size", str(IMAGE_SIZE), "--n-features", str(N_FEATURES)]
    command = ["-q", "fit", "--train", str(train), "--out", str(out), *options]

    assert main([*command, "--batch-size", str(BATCH_SIZE), "--engine", "ray"]) == 0

    loaded = load_model(out)
    assert loaded.config == plain.config
    assert loaded.metadata["n_images"] == len(train_paths)
    torch.testing.assert_close(loaded.stats.mean, plain.stats.mean)


def test_predict_command_writes_the_same_csv_and_heatmaps(
    cluster, model_file, test_folder, tmp_path, one_thread
):
    common = ["--model", str(model_file), "--batch-size", "3", str(test_folder)]
    local = _predict([*common, "--out", str(tmp_path / "local")], tmp_path / "l.csv")
    ray = _predict(
        [*common, "--out", str(tmp_path / "ray"), "--engine", "ray"],
        tmp_path / "r.csv",
    )

    assert ray == local
    assert len(local.splitlines()) == 1 + 9  # header, 9 images, broken.png skipped
    names = sorted(path.name for path in (tmp_path / "local").iterdir())
    assert sorted(path.name for path in (tmp_path / "ray").iterdir()) == names
    for name in names:
        expected = np.asarray(Image.open(tmp_path / "local" / name))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ray" / name)), expected)


def test_a_dead_scoring_worker_loses_and_repeats_no_image(
    cluster, model_file, test_folder, monkeypatch, tmp_path
):
    padim = load_model(model_file)
    paths = sorted(test_folder.rglob("*.jpg"))
    marker = tmp_path / "crashed"
    monkeypatch.setattr(distributed, "_CRASH_MARKER", marker)

    results = list(distributed.predict_batches(padim, paths, 2, workers=2))

    assert marker.exists()  # a worker did die
    names = [name for prediction, _, _ in results for name in prediction.names]
    assert names == [str(path) for path in paths]
    scores = torch.cat([prediction.scores for prediction, _, _ in results])
    torch.testing.assert_close(scores, padim.predict(paths, 2)[0].scores)


def test_a_dead_fitting_worker_is_refitted_once(
    cluster, train_paths, test_folder, plain, monkeypatch, tmp_path, caplog
):
    marker = tmp_path / "crashed"
    monkeypatch.setattr(distributed, "_CRASH_MARKER", marker)
    merged = _padim()

    with caplog.at_level(logging.WARNING, logger=distributed.__name__):
        report = distributed.fit(merged, train_paths, 2, workers=2)

    assert marker.exists()
    assert "lost with a worker" in caplog.text  # its sums were lost and redone
    assert report.images == len(train_paths)
    _assert_same_fit(merged, plain, sorted(test_folder.glob("pitting/*"))[:2])


def test_scoring_without_maps_sends_scores_and_distances_only(
    cluster, model_file, test_folder, one_thread
):
    padim = load_model(model_file)
    paths = sorted(test_folder.glob("pitting/*"))

    results = list(distributed.predict_batches(padim, paths, 2, workers=1, maps=False))

    expected = padim.predict(paths, 2)[0]
    assert [tuple(prediction.maps.shape) for prediction, _, _ in results] == [
        (2, 0, 0),
        (2, 0, 0),
        (1, 0, 0),
    ]
    distances = torch.cat([prediction.distances for prediction, _, _ in results])
    assert torch.equal(distances, expected.distances)
    scores = torch.cat([prediction.scores for prediction, _, _ in results])
    assert torch.equal(scores, expected.scores)


def test_a_scoring_worker_out_of_restarts_names_what_was_not_scored(
    cluster, model_file, test_folder, monkeypatch, tmp_path
):
    padim = load_model(model_file)
    paths = sorted(test_folder.rglob("*.jpg"))
    monkeypatch.setattr(distributed, "_CRASH_MARKER", tmp_path / "crashed")
    monkeypatch.setattr(distributed, "_CRASHES", distributed.MAX_RESTARTS + 1)
    scored = []

    with pytest.raises(distributed.WorkerLostError) as lost:
        for prediction, _, _ in distributed.predict_batches(padim, paths, 2, workers=1):
            scored.extend(prediction.names)

    # The worker dies at the start of its third call, and at every retry; the
    # reply to its second call may or may not have left before the first death.
    first = _lost_batch(lost.value, 5)
    assert first in (2, 3)
    done = 2 * (first - 1)
    assert scored == [str(path) for path in paths[:done]]
    assert str(lost.value).endswith(
        f"({paths[done]}, {paths[done + 1]}); {9 - done} of 9 images were not "
        f"scored, from {paths[done]} on"
    )


def test_the_predict_command_ends_with_one_line_when_workers_are_lost(
    cluster, model_file, test_folder, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(distributed, "_CRASH_MARKER", tmp_path / "crashed")
    # Enough deaths for one of the two workers to run out of restarts.
    monkeypatch.setattr(distributed, "_CRASHES", 2 * (distributed.MAX_RESTARTS + 1))
    csv = tmp_path / "lot.csv"
    command = ["-q", "predict", "--engine", "ray", "--batch-size", "1"]

    status = main(
        [*command, "--model", str(model_file), "--csv", str(csv), str(test_folder)]
    )

    error = capsys.readouterr().err
    assert status == 2
    assert len(error.splitlines()) == 1
    assert re.fullmatch(
        r"error: Ray worker [12] of 2 died more often than its 3 restarts allow, "
        r"on batch \d+ of 10 \(\S+\); \d+ of 10 images were not scored, "
        r"from \S+ on\n",
        error,
    )
    assert not csv.exists()


def test_a_fitting_worker_out_of_restarts_abandons_the_fit(
    cluster, train_paths, monkeypatch, tmp_path
):
    monkeypatch.setattr(distributed, "_CRASH_MARKER", tmp_path / "crashed")
    monkeypatch.setattr(distributed, "_CRASHES", distributed.MAX_RESTARTS + 1)
    merged = _padim()

    with pytest.raises(distributed.WorkerLostError) as lost:
        distributed.fit(merged, train_paths, 2, workers=1)

    first = _lost_batch(lost.value, 6)
    assert first in (2, 3)  # as when scoring
    named = train_paths[2 * first - 2 : 2 * first]
    assert str(lost.value).endswith(f"({named[0]}, {named[1]}); the fit was abandoned")
    assert merged.stats is None


def _lost_batch(error: distributed.WorkerLostError, batches: int) -> int:
    """The batch that ``error`` names, checking the worker it names."""
    found = re.match(
        r"Ray worker 1 of 1 died more often than its 3 restarts allow, on batch "
        rf"(\d+) of {batches} ",
        str(error),
    )
    assert found, str(error)
    return int(found[1])


def test_predict_joins_a_cluster_at_an_address(
    model_file, test_folder, tmp_path, one_thread
):
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # servers on 127.0.0.1 only
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    head = _start_head(port, tmp_path, env)
    try:
        command = [sys.executable, "-m", "padim_core", "-q", "predict"]
        command += ["--model", str(model_file), "--batch-size", "3", str(test_folder)]
        address = ["--engine", "ray", "--address", f"127.0.0.1:{port}"]
        joined = subprocess.run(
            [*command, *address],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(_head_temp_dir(port), ignore_errors=True)
    local = _predict(command[5:], tmp_path / "local.csv")

    assert joined.returncode == 0, joined.stderr
    assert joined.stdout == local


def _head_temp_dir(port: int) -> Path:
    return Path(f"/tmp/ray-{os.getpid()}-{port}")  # socket paths must stay short


def _start_head(port: int, tmp_path: Path, env: dict) -> subprocess.Popen:
    """``ray start --head`` on 127.0.0.1:port, in its own process group."""
    temp = _head_temp_dir(port)
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return head
        except OSError:
            time.sleep(0.2)
    os.killpg(head.pid, signal.SIGKILL)
    raise RuntimeError(f"ray start --head did not answer; see {tmp_path / 'head.log'}")


def test_address_needs_the_ray_engine(model_file, test_folder, capsys):
    status = main(
        [
            "predict",
            "--model",
            str(model_file),
            "--address",
            "127.0.0.1:1",
            str(test_folder),
        ]
    )

    assert status == 2
    assert "--address needs --engine ray" in capsys.readouterr().err


def test_an_address_where_nothing_answers_is_refused(model_file, test_folder):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    command = [sys.executable, "-m", "padim_core", "predict", "--engine", "ray"]
    command += ["--model", str(model_file), "--address", f"127.0.0.1:{port}"]

    # A process of its own: this one already holds the module's cluster.
    refused = subprocess.run(
        [*command, str(test_folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )

    assert refused.returncode == 2
    assert f"127.0.0.1:{port}: no Ray cluster answers" in refused.stderr


def test_the_ray_engine_without_ray_names_the_extra(
    model_file, test_folder, monkeypatch, capsys
):
    import padim_core

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "padim_core.distributed")
    monkeypatch.delattr(padim_core, "distributed")
    command = ["predict", "--engine", "ray", "--model", str(model_file)]

    assert main([*command, str(test_folder)]) == 2
    assert "pip install -r requirements-ray.txt" in capsys.readouterr().err


def test_predict_to_standard_output_stays_a_clean_csv_when_a_worker_dies(
    model_file, test_folder, tmp_path
):
    # A process of its own, so that every notice Ray prints while the command
    # runs, up to its exit, is in the captured output.
    marker = tmp_path / "crashed"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from padim_core import distributed\n"
        f"distributed._CRASH_MARKER = Path({str(marker)!r})\n"
        "from padim_core.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = ["-q", "predict", "--engine", "ray", "--batch-size", "1"]
    run = subprocess.run(
        [sys.executable, "-c", script, *command, "--model", str(model_file)]
        + [str(test_folder)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    assert marker.exists()  # a worker did die
    assert "(raylet)" in run.stderr  # Ray's notice went to standard error
    rows = list(csv_module.reader(io.StringIO(run.stdout)))
    assert rows[0] == ["path", "score", "verdict"]
    assert len(rows) == 1 + 9
    assert all(len(row) == 3 and Path(row[0]).exists() for row in rows[1:])


@pytest.mark.parametrize("raised", [RuntimeError, ValueError, ZeroDivisionError])
def test_an_error_in_a_workers_own_code_ends_the_command_with_one_line(
    cluster, model_file, test_folder, monkeypatch, capsys, raised
):
    import ray

    @ray.remote
    def fail() -> None:
        raise raised("the worker's own message")

    def predict_batches(*args, **kwargs):
        ray.get(fail.remote())
        yield from ()

    monkeypatch.setattr(distributed, "predict_batches", predict_batches)
    command = ["-q", "predict", "--engine", "ray", "--model", str(model_file)]

    status = main([*command, str(test_folder)])

    error = capsys.readouterr().err
    assert status == 2
    assert error == (
        f"error: a Ray worker failed: {raised.__name__}: the worker's own message\n"
    )
