"""Probe (not a test): the project's trainer under FSDP on two CPU processes (gloo), with accelerate's distributed type
forced to FSDP (accelerate 1.15 routes FSDP on GPU-like devices only). docs/training.md has the findings.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_cpu_probe.py VERSION WRAP teacher --config tiny-teacher \\
        --models.base tiny --data.source synthetic --output-dir OUT --train.ema_decay 0 ...

VERSION: 1 or 2 (FSDP1 / FSDP2); WRAP: no_wrap (root only) or transformer_based_wrap (per Wan block: fails).
"""

import argparse
import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

import engine.training.trainer as trainer
from engine.training import cli


def fsdp_accelerator(version: int, wrap: str):
    def make_accelerator(cfg):
        per_block = {"transformer_cls_names_to_wrap": ["WanTransformerBlock"]} if wrap == "transformer_based_wrap" else {}
        fsdp1 = {"use_orig_params": True, "sync_module_states": False} if version == 1 else {}  # no GPU to sync on
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy=wrap,
                                                state_dict_type="SHARDED_STATE_DICT", **per_block, **fsdp1)
        acc = Accelerator(cpu=True, fsdp_plugin=plugin, step_scheduler_with_optimizer=False)
        # accelerate leaves a CPU run MULTI_CPU (DDP); both shared states must say FSDP for prepare / save_state
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        return acc

    return make_accelerator


if __name__ == "__main__":
    trainer.make_accelerator = fsdp_accelerator(int(sys.argv[1]), sys.argv[2])
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    sys.exit(cli.run(parser.parse_args(sys.argv[3:])))
