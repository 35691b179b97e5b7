"""``flexar-train``: the LightningCLI entry point for every model (tokenizers, generators, classifiers).

    flexar-train fit --config configs/tokenizers/titok_digits.yaml --trainer.default_root_dir runs/titok

Configs map one-to-one onto constructors through ``class_path`` / ``init_args``; the config.yaml that LightningCLI
writes into the run folder rebuilds the run.
"""
from __future__ import annotations

import os
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI


class FlexarCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"seed_everything": 0})


def run(args: list[str] | None = None) -> FlexarCLI:
    """Run the CLI and return it (tests and scripts use this; the console script calls :func:`main`)."""
    # Lightning warns about dataloader workers on every CPU run; flexar's defaults are deliberate there
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # flexar passes args from Python on purpose (scripts, tests); CSV logging without TensorBoard is the default here
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*tensorboardX.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return FlexarCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    run(args)


if __name__ == "__main__":
    main()
