"""Ray job entrypoint that serves registry versions for as long as the job runs.

ray job submit --working-dir . -- python jobs/serve.py --config serve.yaml

`ray job stop` removes the app. For an app that outlives any job, deploy the file
`rayllm serve --export-config` writes with `serve deploy` (or a RayService).
"""

import sys

from rayllm.cli import main

if __name__ == "__main__":
    sys.argv = ["rayllm", "serve", *sys.argv[1:]]
    main()
