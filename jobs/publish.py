"""Ray job entrypoint that publishes a trained model folder to the registry.

ray job submit --working-dir . -- python jobs/publish.py bible /shared/model-bible --root s3://bucket/registry
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "registry", "publish", *sys.argv[1:]]
    main()
