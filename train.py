"""Train DELF in two stages, or DELG in one, on GLDv2 MindRecord shards (src/build_image_dataset.py builds them).

    python train.py --train_state=tuning --traindata_path=DATA --imagenet_checkpoint=resnet50_..._notop.h5
    python train.py --train_state=attn --traindata_path=DATA --checkpoint_path=ckpt/checkpoint_delf_tuning-4_20000.ckpt
    python train.py --train_state=delg --traindata_path=DATA --imagenet_checkpoint=resnet50_..._notop.h5

- tuning: ResNet50 backbone from `imagenet_checkpoint` (Keras .h5 or converted .ckpt) + descriptor
  classifier; the attention side is frozen.
- attn: everything from `checkpoint_path` (the tuning result); only the attention head, its
  classifier (and the autoencoder) train; the backbone, including its BatchNorm statistics, is frozen.
- delg: DELG (src/model/delg.py) from `imagenet_checkpoint`, all of it at once: ArcFace loss
  (arcface_margin, arcface_scale) on the global descriptor + attention_loss_weight x the attention
  classifier's loss + reconstruction_loss_weight x the autoencoder's (src/training/losses.py); the
  local losses stop at block3, so only the global loss trains the backbone.
The number of classes comes from the data (dataset_info.json / relabeling.csv beside the shards).
Every loss line also logs the classifiers' batch accuracy; at step `chance_check_step` a warning
names the class count and the learning rate when the accuracy is still at chance level.

Resuming: give a checkpoint of the same stage as `checkpoint_path`. Weights, optimizer moments and
the step (hence the learning rate) continue from it (`start_iter` > 0 overrides the step). The data
continue exactly where they were: epoch e is shuffled and cropped with seed `seed + e`, and the
batches of the current epoch that were already used are drawn again and skipped, so a resumed run
repeats the uninterrupted run's losses (the skipped batches cost at most one epoch of data loading).

Data parallel (scripts/run_8p_train.sh, scripts/run_distributed_train.sh): when started by msrun or
with RANK_SIZE > 1, every rank reads its own part of the shards with batch_size / RANK_SIZE images,
gradients are averaged, and only rank 0 writes checkpoints and summaries. BatchNorm statistics are
per rank (no synchronised BatchNorm, as the reference); rank 0's are saved.

Curves: at every checkpoint, `<save_ckpt>/training_curves.png` plots the log's loss, the classifier's
batch accuracy and the learning rate against the step (`python -m src.plot_training LOG...` plots
one or several logs).

Mixed precision (amp_level O1-O3, Ascend/GPU only) casts the network with MindSpore's amp lists;
the loss stays float32 and there is no loss scaling (the reference trained with O3 the same way).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from model_utils.cli import cli_main, setup_logging
from model_utils.config import get_config_and_args
from model_utils.device import setup_device
from model_utils.files import require_writable, require_writable_dir
from src.training.run import check_inputs, init_data_parallel, run_training


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train DELF (tuning or attn stage) or DELG (delg) on GLDv2 "
                                                 "MindRecord shards. All delf_config.yaml keys can be given as "
                                                 "--key=value.")
    parser.add_argument("--log_path", default="",
                        help="log file (default: <save_ckpt>/train_<stage>.log, _rank<i> for other ranks)")
    config, args = get_config_and_args(argv, parser)
    # Checkpoints, logs and summaries are written hours in: check their places before any work.
    require_writable_dir(config.save_ckpt, "checkpoint folder (save_ckpt)")
    if args.log_path:
        require_writable(args.log_path, "log file")
    if config.need_summary or config.need_profile:
        require_writable_dir(config.save_summary, "summary folder (save_summary)")
    target = setup_device(config.device_target, config.device_id, graph_mode=config.mode == "graph")
    check_inputs(config, target)
    rank_id, rank_size = init_data_parallel()
    suffix = f"_rank{rank_id}" if rank_id else ""
    log_path = args.log_path or Path(config.save_ckpt) / f"train_{config.train_state}{suffix}.log"
    setup_logging(log_path, terminal_level=logging.INFO)
    result = run_training(config, target, rank_id, rank_size, log_path)
    losses = np.array(list(result.losses.values()))
    if losses.size:
        logging.getLogger("delf.train").info("loss: first %.7f, last %.7f over %d steps",
                                             losses[0], losses[-1], losses.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
