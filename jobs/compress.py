"""Ray job entrypoint that compresses a registry version and publishes the result.

ray job submit --working-dir . -- python jobs/compress.py --config jobs/configs/compress-w4a16.yaml --set registry=/shared/work/registry
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "compress", *sys.argv[1:]]
    main()
