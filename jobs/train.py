"""Ray job entrypoint for the training stage alone.

ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train-bible.yaml

`ray job stop` ends the run; its last checkpoint stays, and `--set resume=true` continues it.
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "train", *sys.argv[1:]]
    main()
