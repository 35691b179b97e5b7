"""Console scripts that run a saved pipeline: ``flexar-sample`` (:mod:`flexar.cli.sample`) and ``flexar-fid``
(:mod:`flexar.cli.fid`). Each exposes ``main(argv) -> int``; ``scripts/sample.py`` and ``scripts/eval_fid.py`` call
the same functions."""
