"""benchmarks/image_methods.py (make bench-mnist): the requested-label accuracy column and the markdown rows."""
import pytest

from benchmarks import image_methods


def test_classify_reads_mnist_test_digits_and_accuracy_is_per_step_count():
    from datamodules import MNISTDataModule

    images, labels = MNISTDataModule().split("test")[:2]
    predicted = image_methods.classify(images[:300])
    assert (predicted == labels[:300]).float().mean().item() > 0.97  # the shipped classifier: 99.3% on the test split
    record = {"label_accuracy_by_nfe": {"1": 0.9123, "4": 0.98}}
    assert image_methods.accuracy(record, [1, 2, 4]) == "0.912/0.980"
    assert image_methods.accuracy({}, [1, 2, 4]) == ""


def test_markdown_row_has_every_column_of_the_header():
    record = {"method": "pso", "fid": 3.0, "fid_by_nfe": {"1": 3.0, "2": 2.5, "4": 2.0},
              "label_accuracy_by_nfe": {"1": 0.9, "2": 0.95, "4": 0.99}, "seconds_per_generator_update": 1.5,
              "images_per_second": 250.0, "optimizer_steps": 200,
              "networks": {"student": {"parameters": 10, "trainable": 10}},
              "optimizer_state_mb": {"generator": 1.0}, "peak_memory_mb": 900.0}
    protocol = {"generator_updates": 200, "nfe": [1, 2, 4], "num_samples": 1000, "seed_eval": 1234}
    table = [line for line in image_methods.markdown([record, {"method": "bad", "error": "x"}], protocol).splitlines()
             if line.startswith("|")]
    header, _, row, failed = table
    assert header.count("|") == row.count("|") == failed.count("|")
    assert "| pso | 3.00 | 2.50 | 2.00 | 1.500 | 250 | 200 |" in row and row.endswith("| 0.900/0.950/0.990 |")


@pytest.mark.parametrize("nfe", [[0], [1, -2]])
def test_step_counts_below_one_are_refused(nfe, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["image_methods.py", "--nfe", *map(str, nfe)])
    with pytest.raises(SystemExit):
        image_methods.main()
    assert "nfe" in capsys.readouterr().err.lower()
