"""Every example runs on tiny synthetic data and does what its docstring claims."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOGGED = {"ce/0", "ce/1", "kl/0", "kl/1", "feature/0", "feature/1", "teacher", "teacher_share/0", "teacher_share/1"}


def _main(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_lightning_manual_logs_counts_steps_and_resumes_bitwise():
    pytest.importorskip("lightning")
    out = _main("lightning_manual")(["--smoke"])
    assert out["bitwise_resume"]
    assert out["global_step"] == 2 * out["batches"]  # N = 2 optimizer steps per batch
    assert out["group_steps"] == out["batches"]
    assert LOGGED <= set(out["logged"])
    assert out["adapters"] == ["0_1", "1_0"] and sum(out["perturbed"]) > 0


def test_accelerate_loop_trains_accumulates_and_resumes_bitwise():
    pytest.importorskip("accelerate")
    out = _main("accelerate_loop")(["--smoke"])
    assert out["moved"] and out["bitwise_resume"]
    assert LOGGED <= set(out["logged"])


def test_timm_pair_trains_both_families_through_adapters():
    pytest.importorskip("timm")
    out = _main("timm_pair")(["--smoke"])
    assert out["adapters"] == {"0_1": "[256, 2, 2] -> [160, 2, 2]", "1_0": "[160, 2, 2] -> [256, 2, 2]"}
    assert out["moved"] == out["weights"] > 0
    assert {"ce/0", "ce/1", "kl/0", "feature/1"} <= set(out["last"])


def test_offline_kd_keeps_the_teacher_frozen_and_teaching():
    out = _main("offline_kd")(["--smoke"])
    assert out["teacher_unchanged"]
    assert out["teacher_count"][1] == 0 and out["teacher_count"][0] > 0
    assert out["last"]["kl/1"] > 0 and out["last"]["kl/0"] == 0


def test_segmentation_pair_has_a_teacher_per_pixel():
    out = _main("segmentation_pair")(["--smoke"])
    result, y = out["result"], out["targets"]
    assert list(result.teacher.shape) == list(y.shape) and list(result.weights.shape) == [*y.shape, 2, 2]
    assert (result.teacher[y == 255] == -1).all() and set(result.teacher[y != 255].unique().tolist()) <= {0, 1}
    logged = out["logged"]
    assert logged["teacher_share/0"] + logged["teacher_share/1"] == pytest.approx(1.0)  # of the valid pixels
    assert {"ce/0", "ce/1", "kl/0", "kl/1", "cwd/0", "cwd/1"} <= set(logged)
    assert all(v == v for v in logged.values())  # no NaN anywhere
    assert out["stats"]["steps"] == 2 and sum(out["stats"]["teacher_count"]) == pytest.approx(2.0)


def test_hf_causal_lm_trains_two_families_token_by_token():
    pytest.importorskip("transformers")
    out = _main("hf_causal_lm")(["--smoke"])
    log, teacher, ids = out["log"], out["teacher"], out["ids"]
    assert list(teacher.shape) == [ids.shape[0], ids.shape[1] - 1]  # shift_targets: T - 1 positions
    assert set(teacher.unique().tolist()) <= {0, 1}  # every byte counts: no -100 in these labels
    assert {"ce/0", "ce/1", "kl/0", "kl/1", "teacher_share/0", "teacher_share/1"} <= set(log[-1])
    assert all(v == v for entry in log for v in entry.values())  # no NaN
    assert log[-1]["teacher_share/0"] + log[-1]["teacher_share/1"] == pytest.approx(1.0)
    assert out["stats"]["steps"] == 3


SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_example_takes_a_device_defaulting_to_cuda_when_available(name, capsys):
    with pytest.raises(SystemExit):
        _main(name)(["--help"])
    shown = capsys.readouterr().out
    assert "--device" in shown and "default: cuda when available" in " ".join(shown.split())


@pytest.mark.parametrize("name", ["train", "lm", "step", "perturb"])
def test_every_benchmark_takes_a_device(name):
    import subprocess
    import sys

    script = EXAMPLES.parent / "benchmarks" / f"{name}.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--device" in shown.stdout


def test_detection_pair_competes_on_each_detectors_own_losses():
    pytest.importorskip("torchmetrics")
    pytest.importorskip("pycocotools")
    out = _main("detection_pair")(["--smoke", "--settings", "independent,competitive", "--device", "cpu"])
    for setting in ("independent", "competitive"):
        run = out[setting][0]
        assert all(0 <= m <= 1 for m in run["map"]) and all(v == v for v in run["loss"])  # mAP in [0, 1], no NaN
        assert sum(run["teacher_share"]) == pytest.approx(1.0)
    # the same initial weights and first batch in both settings: the same losses before any update
    assert out["independent"][0]["first_loss"] == out["competitive"][0]["first_loss"]


def test_multilabel_pair_learns_with_bce_and_the_bernoulli_kl():
    out = _main("multilabel_pair")(["--smoke", "--device", "cpu"])
    last = out["last"]
    assert {"ce/0", "ce/1", "kl/0", "kl/1"} <= set(last) and all(v == v for v in last.values())
    assert last[f"kl/{int(last['teacher'])}"] == 0  # the teacher learns from its labels only
    assert all(0 <= f <= 1 for f in out["f1"]) and out["stats"]["steps"] == 4
