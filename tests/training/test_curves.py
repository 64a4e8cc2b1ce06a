"""Training curves from log text: the reference's prefix, any named values after it, stages, resumed runs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model_utils.cli import InputError
from src import plot_training
from src.training.curves import parse_loss_line, plot_training_curves, read_training_log

PREFIX = "2026-01-01 10:00:00,000 INFO delf.train: "


def test_the_reference_line_and_any_named_values_are_read():
    assert parse_loss_line("epoch: 1 step: 39000, loss is 1.5936852") == (39000, {"loss": 1.5936852})
    step, values = parse_loss_line(PREFIX + "epoch: 3 step: 12, loss is 0.5000000, step time: 81.2 ms, lr: 0.0099, "
                                   "accuracy: 0.75")
    assert step == 12 and values == {"loss": 0.5, "step time": 81.2, "lr": 0.0099, "accuracy": 0.75}
    # A DELG-like line: more loss terms and accuracies, whatever their names
    _, values = parse_loss_line("epoch: 1 step: 5, loss is 9.1, desc_loss: 6.5, attn_loss: 2.0, recon_loss: 0.06, "
                                "desc_accuracy: 0.1, attn_accuracy: 0.05, lr: 0.1")
    assert values == {"loss": 9.1, "desc_loss": 6.5, "attn_loss": 2.0, "recon_loss": 0.06, "desc_accuracy": 0.1,
                      "attn_accuracy": 0.05, "lr": 0.1}
    assert parse_loss_line(PREFIX + "saved checkpoint ckpt/x.ckpt") is None
    assert parse_loss_line("epoch: 1 step: 2, loss is nan") is None


def test_a_resumed_run_continues_its_stage_curve(tmp_path):
    log = tmp_path / "train.log"
    lines = [PREFIX + "tuning stage, rank 0 of 1: 3 classes, ..."]
    lines += [PREFIX + f"epoch: 1 step: {step}, loss is {10 - step:.7f}, lr: 0.01" for step in range(1, 6)]
    lines += ["Traceback (most recent call last): killed", PREFIX + "tuning stage, rank 0 of 1: resuming ..."]
    lines += [PREFIX + f"epoch: 1 step: {step}, loss is {20 - step:.7f}, lr: 0.01" for step in range(4, 8)]
    lines += [PREFIX + "attn stage, rank 0 of 1: 3 classes, ..."]
    lines += [PREFIX + f"epoch: 1 step: {step}, loss is 1.0000000, accuracy: 0.5" for step in range(1, 3)]
    log.write_text("\n".join(lines) + "\n")
    tuning, attention = read_training_log(log)
    assert (tuning.label, attention.label) == ("train.log (tuning)", "train.log (attn)")
    steps, losses = tuning.series("loss")
    assert steps.tolist() == [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(losses, [9, 8, 7, 16, 15, 14, 13])  # steps done again: the resumed values
    assert attention.series("accuracy")[1].tolist() == [0.5, 0.5] and "accuracy" not in tuning.values


def test_plot_has_one_panel_per_quantity(tmp_path):
    log = tmp_path / "delg.log"
    log.write_text("".join(f"epoch: 1 step: {step}, loss is {1 / step:.7f}, step time: 5.0 ms, desc_loss: 0.5, "
                           f"attn_loss: 0.25, accuracy: {step / 10}, lr: {0.1 - step / 100}\n" for step in range(1, 9)))
    png = plot_training_curves(read_training_log(log), tmp_path / "curves.png")
    width, height = Image.open(png).size
    assert (width, height) == (1500, 380)  # loss (all three loss terms), accuracy, learning rate; no step time


def test_cli_plots_several_logs_and_refuses_bad_ones_in_one_line(tmp_path, capsys):
    logs = []
    for run in range(2):
        logs.append(tmp_path / f"run{run}.log")
        logs[-1].write_text("".join(f"epoch: 1 step: {step}, loss is {run + 1 / step:.7f}, lr: 0.1\n"
                                    for step in range(1, 4)))
    assert plot_training.main([*map(str, logs), "--output", str(tmp_path / "both.png")]) == 0
    assert Image.open(tmp_path / "both.png").size == (1000, 380)  # loss and learning rate
    empty = tmp_path / "empty.log"
    empty.write_text("nothing to see\n")
    for bad, message in [(empty, "holds no loss lines"), (tmp_path / "absent.log", "does not exist")]:
        with pytest.raises(SystemExit) as stop:
            plot_training.main([str(bad), "--output", str(tmp_path / "x.png")])
        error = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and message in error and str(bad) in error and "\n" not in error
    with pytest.raises(InputError):
        read_training_log(tmp_path)
