"""``flexar-fid`` as a script: ``python scripts/eval_fid.py --pipeline PIPELINE`` (see flexar/cli/fid.py)."""
import sys

from flexar.cli.fid import main

if __name__ == "__main__":
    sys.exit(main())
