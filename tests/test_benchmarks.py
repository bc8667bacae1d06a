"""The benchmark harness: data decoding and caching, device batches, and the model zoo."""

import io
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("torchvision")
from data import CIFAR10_CLASSES, DeviceLoader, load_cifar  # noqa: E402
from models import build  # noqa: E402


def _fake_archive(path: Path, per_class: int = 2) -> None:
    from PIL import Image

    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c, name in enumerate(CIFAR10_CLASSES):
                for k in range(per_class):
                    buffer = io.BytesIO()
                    Image.new("RGB", (32, 32), (25 * c, 10 * k, 200)).save(buffer, format="JPEG", quality=100)
                    info = tarfile.TarInfo(f"{split}/{name}/{k:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)


def test_jpeg_archive_is_decoded_once_and_cached(tmp_path):
    _fake_archive(tmp_path / "cifar10-jpg.tar.gz")
    data = load_cifar(tmp_path, cache=tmp_path / "cache")
    images, labels = data["train"]
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == sorted(labels.tolist()) and set(labels.tolist()) == set(range(10))
    # red channel encodes the class: decoding put each image under its own label
    assert torch.allclose(images[:, 0].float().mean(dim=(1, 2)), 25.0 * labels.float(), atol=3)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    (tmp_path / "cifar10-jpg.tar.gz").unlink()  # the cache answers now
    assert torch.equal(load_cifar(tmp_path, cache=tmp_path / "cache")["test"][0], data["test"][0])


def test_missing_data_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No CIFAR-10 found at .*Pass --data \(or set CIFAR_ROOT\)"):
        load_cifar(tmp_path / "nowhere", cache=tmp_path)


def test_device_loader_batches_and_augments():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    train = DeviceLoader(images, labels, batch_size=16, device=torch.device("cpu"), classes=10, train=True)
    batches = list(train)
    assert len(batches) == len(train) == 3
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    test = DeviceLoader(
        images, labels, batch_size=16, device=torch.device("cpu"), classes=10, train=False, drop_last=False
    )
    assert sum(len(y) for _, y in test) == 50


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "mobilenet0.25", "resnet18tv"])
def test_models_and_their_feature_hooks(name):
    model, hook = build(name)
    seen = []
    model.get_submodule(hook).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(seen) == 1 and len(seen[0]) == 4


def test_resnet_depths():
    with pytest.raises(ValueError, match=r"Invalid depth 21"):
        build("resnet21")
    params = sum(p.numel() for p in build("resnet32")[0].parameters())
    assert 0.45e6 < params < 0.48e6  # the paper's Table 1: 0.47M


def test_class_balanced_batches_give_every_anchor_positives():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=g)
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(
        images, labels, batch_size=16, device=torch.device("cpu"), classes=10, train=True, per_class=4
    )
    batches = [y for _, y in loader]
    assert batches and all(len(y) == 16 for y in batches)
    for y in batches:  # chunks of 4 same-class images: every class present has a multiple of 4
        assert all(c % 4 == 0 for c in torch.bincount(y, minlength=10).tolist())
    seen = torch.cat(batches)
    assert len(seen.unique()) == 10 and len(torch.cat([b for b in batches])) <= 400


def test_perturbation_benchmark_runs_the_pool_as_the_group_does(tmp_path, monkeypatch):
    import json

    import perturb

    threads = torch.get_num_threads()
    args = ["perturb.py", "--device", "cpu", "--model", "resnet8", "--batch", "4", "--warmup", "0", "--steps", "1"]
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(tmp_path)])
    try:
        perturb.main()
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(next(tmp_path.glob("perturb-*.json")).read_text())
    assert "pool (draw + apply)" in json.dumps(rows) and "mixup" in json.dumps(rows)


def test_lm_benchmark_runs_every_setting_and_merges_split_seeds(tmp_path):
    import json

    pytest.importorskip("transformers")
    import lm

    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(32, 127)) * 20)
    small = ["--steps", "3", "--eval-every", "2", "--eval-windows", "4", "--context", "16", "--batch", "2",
             "--width", "16", "--data", str(text)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        for seed in (0, 1):
            lm.main([*small, "--seeds", str(seed), "--out", str(tmp_path / f"s{seed}")])
        merged = [str(tmp_path / f"s{seed}" / "results.json") for seed in (0, 1)]
        lm.main([*small, "--seeds", "0,1", "--out", str(tmp_path / "merged"), "--merge", *merged])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "merged" / "results.json").read_text())["results"]
    assert sorted(results) == sorted(lm.SETTINGS) and all(sorted(r) == ["0", "1"] for r in results.values())
    run = results["competitive-position"]["0"]
    assert run["step"] == [2, 3] and len(run["val"][-1]) == 2 and len(run["ce"]) == 3
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "competitive-position-jsd" in table and (tmp_path / "merged" / "val_loss.png").exists()
    # a seed gives every setting the same initial weights and first batch: the same CE before any update
    first = {setting: runs["0"]["ce"][0] for setting, runs in results.items()}
    assert len({tuple(v) for v in first.values()}) == 1, first


def test_train_runs_settings_and_seeds_as_concurrent_jobs_and_merges_them(tmp_path):
    import json
    import subprocess

    _fake_archive(tmp_path / "cifar10-jpg.tar.gz", per_class=4)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train.py"
    command = [sys.executable, str(script), "--preset", "quick", "--models", "resnet8,resnet8", "--epochs", "1",
               "--train-subset", "0", "--test-subset", "0", "--batch-size", "8", "--data", str(tmp_path),
               "--cache", str(tmp_path / "cache"), "--device", "cpu", "--settings", "independent,competitive",
               "--seeds", "0,1", "--jobs", "3", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--jobs 3: 4 runs, 4 epochs" in done.stdout and "epochs per minute" in done.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert {s: sorted(r) for s, r in results.items()} == {"independent": ["0", "1"], "competitive": ["0", "1"]}
    # each worker ran its own share of the runs (round-robin), and nothing twice
    shares = [json.loads((tmp_path / "out" / f"job-{k}" / "results.json").read_text())["results"] for k in range(3)]
    counts = [sum(len(r) for r in share.values()) for share in shares]
    assert counts == [2, 1, 1]
    assert (tmp_path / "out" / "table.md").exists()


def test_jobs_must_be_positive():
    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--jobs", "0"])


def test_graph_benchmark_times_the_group_against_its_members_steps(tmp_path):
    import json

    import step_graph

    step_graph.main(["--device", "cpu", "--groups", "2 x resnet8", "--batch", "4", "--warmup", "1", "--steps", "2",
                     "--out", str(tmp_path)])  # fmt: skip
    data = json.loads((tmp_path / "graph.json").read_text())
    rows = data["group"]["2 x resnet8"]
    assert list(rows) == ["(a) limit, eager", "(c) group, eager"]  # the graphed variants need CUDA
    assert rows["(a) limit, eager"]["ratio"] == 1.0 and len(rows["(c) group, eager"]["samples_ms"]) == 2
    assert data["setup"]["timing"] == "perf_counter"
