"""``flexar-sample`` as a script: ``python scripts/sample.py --pipeline PIPELINE`` (see flexar/cli/sample.py)."""
import sys

from flexar.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
