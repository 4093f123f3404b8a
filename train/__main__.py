"""`accelerate launch [options] -m train --config FILE [key=value ...]`: one training process.

The same training as `phonetune train`; Accelerate's launcher starts one of these per device and
sets up the process group they share.
"""

import sys

from train.loop import main

if __name__ == "__main__":
    sys.exit(main())
