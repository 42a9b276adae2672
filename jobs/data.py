"""Ray job entrypoint for the curation stage alone.

ray job submit --working-dir . -- python jobs/data.py --config jobs/configs/data-bible.yaml
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "data", *sys.argv[1:]]
    main()
