"""FSDP on 2 CPU processes (gloo): the EMA update, the export and the sample grid with parameters really sharded.

Lightning's Trainer refuses ``strategy: fsdp`` without a GPU, and torch's FSDP runs on the CPU when given
``device_id=cpu``, so the child script wraps a :class:`flexar.train.GeneratorModule` in FSDP itself (FULL_SHARD,
``use_orig_params=True``, as Lightning's FSDPStrategy does) and hands the module a stand-in trainer whose strategy
is a real ``FSDPStrategy`` holding the wrapped module. Three optimiser steps on both ranks (the same batch, so the
averaged gradient is the single-process one) are compared with the same steps on an unwrapped copy: the EMA,
updated on whole weights, and the export, gathered on every rank and rebuilt on rank zero, match; the sample grid
draws on both ranks and rank zero writes it.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import copy, json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank, folder, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    from flexar.generators import RasterAR
    from flexar.tokenizers import TiTok
    from flexar.train import GeneratorModule, SampleGrid
    from flexar.train.export import gathered_state_dict

    torch.manual_seed(0)
    generator = RasterAR(vocab_size=32, max_tokens=6, num_classes=10, dim=32, depth=1, num_heads=2, class_dropout=0.0)
    module = GeneratorModule(generator, ema_decay=0.5)
    reference = copy.deepcopy(module)
    # what Lightning's forward redirection does for training_step: the loss is computed inside FSDP's forward
    module.forward = lambda ids, labels, lengths: module.generator.training_loss(ids, labels, lengths)[0]
    wrapped = FSDP(module, device_id=torch.device("cpu"), use_orig_params=True,
                   sharding_strategy=ShardingStrategy.FULL_SHARD)
    strategy = FSDPStrategy()
    strategy.model = wrapped

    class Trainer:
        is_global_zero, global_rank, world_size = rank == 0, rank, 2
        sanity_checking, current_epoch, global_step, loggers = False, 0, 0, []
        log_dir = default_root_dir = folder

    Trainer.strategy = strategy
    module._trainer = Trainer()
    # the generator and its EMA copy, as this rank holds them outside the forward pass, and whole
    record = {"sharded": sum(p.numel() for p in module.parameters()),
              "whole": sum(p.numel() for p in reference.parameters())}
    optimizer = torch.optim.SGD(module.parameter_groups(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameter_groups(), lr=0.1)
    draws = torch.Generator().manual_seed(1)
    for step in range(3):
        ids, labels = torch.randint(0, 32, (8, 6), generator=draws), torch.randint(0, 10, (8,), generator=draws)
        lengths = torch.full((8,), 6)
        torch.manual_seed(step)  # the same draws in both losses (class dropout reads the global stream)
        wrapped(ids, labels, lengths).backward()
        optimizer.step()
        optimizer.zero_grad()
        module.update_ema()
        torch.manual_seed(step)
        reference.generator.training_loss(ids, labels, lengths)[0].backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        reference.update_ema()
    state = gathered_state_dict(module)
    exported = module.exported_network()
    if rank == 0:
        ours, theirs = exported.state_dict(), reference.exported_network().state_dict()
        record["export_difference"] = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
        trained = reference.generator.state_dict()
        record["ema_moved"] = max(float((theirs[k] - trained[k]).abs().max()) for k in trained)
        record["prefixes"] = sorted({key.split(".", 1)[0] for key in state})
    else:
        record["exported"], record["state"] = exported is None, state is None
    callback = SampleGrid(per_class=1)
    torch.manual_seed(0)
    callback._tokenizer = TiTok(image_size=16, channels=1, patch_size=4, num_latent_tokens=6, width=32, depth=1,
                                num_heads=2, codebook_size=32, code_dim=8)
    callback.on_validation_epoch_end(module._trainer, module)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ema_export_and_sample_grid_under_fsdp_on_two_processes(tmp_path):
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(free_port())], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    zero, one = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    # the parameters really are sharded: each rank holds part of them outside the forward pass
    assert zero["sharded"] + one["sharded"] == zero["whole"] and 0 < zero["sharded"] < zero["whole"]
    assert zero["export_difference"] < 1e-6 and zero["ema_moved"] > 1e-3, zero
    assert zero["prefixes"] == ["ema", "generator"], "the gathered state dict names the module's own keys"
    assert one == {**one, "exported": True, "state": True}, "rank one takes part and receives nothing"
    assert [path.name for path in tmp_path.rglob("*.png")] == ["samples_epoch000.png"]
