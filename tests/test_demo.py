"""``python -m dbprop demo``: a one-epoch study writes its table, JSON and figure, and repeats bit for bit."""
import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
from dbprop.demo import study  # noqa: E402
from dbprop.demo.data import class_separation  # noqa: E402

TINY = ["--epochs", "1", "--lambdas", "0,0.1", "--jacobian-lambda", "0.01", "--attack-samples", "6"]


def _without_times(path):
    record = json.loads(path.read_text())
    for run in record["runs"]:
        assert run.pop("ms_per_step") > 0
    return record["runs"]


@pytest.fixture
def deterministic():
    """Chunk sizes and convolution formulations are chosen by timing unless deterministic algorithms are on; the
    second run builds new programs, which a loaded machine can time differently (README, "Run the demo")."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_demo_writes_table_and_figure_and_is_deterministic(tmp_path, capsys, deterministic):
    attacks = ["--attacks", "gradient" if study._foolbox_available() else "none"]
    runs = study.main(TINY + attacks + ["--out", str(tmp_path / "a")])
    assert [r.name for r in runs] == ["plain cross-entropy", "DoubleBackpropLoss λ=0.1", "JacobianPenalty λ=0.01"]
    for r in runs:
        assert 0 < r.accuracy <= 1 and r.rho_linearized > 0 and r.alignment > 0 and r.binarized_alignment > 0
        assert (r.rho_measured > 0) if study._foolbox_available() else r.rho_measured != r.rho_measured
    assert "| plain cross-entropy" in capsys.readouterr().out
    a = tmp_path / "a"
    assert (a / "results.md").read_text().count("\n| ") == 3   # one row per run after the header
    assert (a / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study.main(TINY + attacks + ["--out", str(tmp_path / "b")])
    assert _without_times(a / "results.json") == _without_times(tmp_path / "b" / "results.json")


@pytest.mark.parametrize("argv, message", [
    (["--lambdas", "0,-1"], "weights >= 0"), (["--lambdas", "a"], "comma-separated numbers"),
    (["--attacks", "fgsm"], "unknown attacks"), (["--epochs", "0"], "must be positive"),
    (["--jacobian-lambda", "nan"], "finite weight"), (["--device", "nonsense"], "--device")])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_device_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_class_separation_is_half_the_nearest_other_class_distance():
    x_train = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]).view(3, 1, 2)
    y_train = torch.tensor([0, 1, 1])
    x_test = torch.tensor([[0.0, 0.0], [3.0, 0.0], [6.0, 8.0]]).view(3, 1, 2)
    y_test = torch.tensor([0, 0, 0])
    # nearest class-1 training points: (1, 0) at 1, (1, 0) at 2, (3, 4) at 5 -> halves 0.5, 1, 2.5
    assert class_separation(((x_train, y_train), (x_test, y_test))) == 1.0
