"""Ray job entrypoint that scores a registry version's held-out perplexity on a shard set.

ray job submit --working-dir . -- python jobs/eval.py --set model=bible --set data=/shared/work/data-bible
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "eval", *sys.argv[1:]]
    main()
