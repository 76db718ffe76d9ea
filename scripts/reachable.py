"""Exit 0 when the URL given answers within a few seconds, 1 otherwise (used by the Makefile to decide
whether PyTorch's CPU wheel index can be used)."""

import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5):
        pass
except Exception:
    sys.exit(1)
