"""The `llamaflex` command (installed by `pip install -e .`): the model commands and elastic training.

    llamaflex convert --parent PARENT --out FLEX_DIR        # = python -m modeling_llamaflex convert ...
    llamaflex architecture | extract | parent ...           # = python -m modeling_llamaflex ...
    llamaflex train training/configs/cpu.yaml [--flag value ...]   # = python training/run.py ...
    llamaflex serve FLEX_DIR [--port 8000 ...]               # = python -m serving ... (docs/serving.md)

It lives outside `modeling_llamaflex` on purpose: the model package (copied into every checkpoint) imports
nothing from `training`.
"""

from __future__ import annotations

import sys

USAGE = """usage: llamaflex {convert,architecture,extract,parent,train,serve} ...

  convert, architecture, extract, parent   the model commands (llamaflex <command> --help)
  train                                    elastic training: training/run.py's arguments (llamaflex train --help)
  serve                                    the OpenAI API for every budget, one copy of the weights (llamaflex serve --help)
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        if not argv:
            sys.exit(2)
        return
    if argv[0] == "train":
        from training import run

        sys.argv = ["llamaflex train", *argv[1:]]  # HfArgumentParser's usage line
        run.main(argv[1:])
        return
    if argv[0] == "serve":
        from serving.__main__ import main as serve_main

        serve_main(argv[1:], prog="llamaflex serve")
        return
    from modeling_llamaflex.__main__ import main as model_main

    model_main(argv, prog="llamaflex")


if __name__ == "__main__":
    main()
