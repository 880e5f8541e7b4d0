"""`accelerate launch` with vicap's environment guard installed first.

    python -m vicap.launch --multi_gpu --num_processes 8 -m vicap.cli train RECIPE [--resume]

It takes exactly `accelerate launch`'s arguments and runs Accelerate's own launcher. The `accelerate`
console command imports parts of transformers that import torchvision before any vicap code runs; on a
machine whose torchvision build does not match torch (see vicap._compat) that import fails, so this
entry point imports vicap (and its guard) first. Where torchvision matches, `accelerate launch` itself
behaves the same.
"""

from __future__ import annotations

import vicap  # noqa: F401  (the torchvision guard, before Accelerate's imports)


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    launch_command(args)


if __name__ == "__main__":
    main()
