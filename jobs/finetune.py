"""Ray job entrypoint that fine-tunes a registry version on chat data and publishes the result.

ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune-chat.yaml --set registry=/shared/work/registry
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "finetune", *sys.argv[1:]]
    main()
