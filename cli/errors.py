"""One way for every command to end: its output, or one line naming what went wrong."""
from __future__ import annotations

import sys
from collections.abc import Callable


def one_line(command: str, work: Callable[[], str]) -> int:
  """Prints work()'s result; errors become `command: error: ...` (exit 1), never a traceback.

  An interrupt says how to resume (exit 130): every command here picks up where it stopped.
  """
  try:
    print(work())
  except KeyboardInterrupt:
    print(f"{command}: interrupted; re-run the same command to resume", file=sys.stderr)
    return 130
  except (ValueError, OSError, ConnectionError, ImportError) as e:
    message = " ".join(str(e).split())
    print(f"{command}: error: {message}", file=sys.stderr)
    return 1
  return 0
