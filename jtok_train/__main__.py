"""`python -m jtok_train ...` is `jtok-train ...` (the form torchrun launches)."""

from jtok_train.cli.train import main

if __name__ == "__main__":   # the checkpoint writer's spawn workers re-import __main__: keep this guard
    main()
