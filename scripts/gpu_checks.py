#!/usr/bin/env python3
"""Every GPU check in one run: `python3 scripts/gpu_checks.py --help`.

The checks live in `lmcd.gpucheck` (also behind `lmcd bench --workload cuda`).
"""

import sys

from lmcd.gpucheck import main

sys.exit(main())
