"""Polling for a condition that another thread (the viser server, a browser) makes true."""

import time


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", poll: float = 0.05) -> None:
    """Return once `predicate()` is true; fail naming `what` after `timeout` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
