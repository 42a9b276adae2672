"""Ray job entrypoint for the whole lifecycle.

    ray job submit --working-dir . -- python jobs/lifecycle.py --config jobs/configs/lifecycle.yaml

Inside a Ray job RAY_ADDRESS is set, so every stage runs on that cluster.
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "lifecycle", *sys.argv[1:]]
    main()
