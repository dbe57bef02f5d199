"""eva-ray's launch layer: the command line, the driver and cluster placement."""

import os

# Ray reads this when it is first imported. Without it, a node started on 127.0.0.1 also binds the machine's outside
# address, and a driver on the loopback address retries that GCS for minutes. Importing anything of launch sets it
# (`eva-ray run`, `python -m launch`, a job's driver), so it is in place before any path imports ray; an explicit
# value in the environment wins.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
